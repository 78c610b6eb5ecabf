"""The vocabulary of a policy file: the keys an operator may write, names' syntax and limits.

This module owns what :mod:`cim_place.policies.policy_reader` and
:mod:`cim_place.policies.placement_rules` accept and :mod:`cim_place.policies.schema` publishes:
the keys of a policy and of each of its sections, the syntax of policy names, tags and node ids,
and the bounds of counts (replicas, priority, weights, kept versions).
"""

from __future__ import annotations

import re

__all__ = [
    "CONSTRAINT_KEYS",
    "LOCALITY_KEYS",
    "MATCH_KEYS",
    "MAX_KEEP_VERSIONS",
    "MAX_PRIORITY",
    "MAX_REPLICAS",
    "MAX_WEIGHT",
    "NAME_HINT",
    "NAME_RE",
    "NODE_RE",
    "POLICY_KEYS",
    "REPAIR_KEYS",
    "SET_KEYS",
    "TAG_RE",
]

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
NAME_HINT = "use 1-63 lowercase letters, digits, _ or -, starting with a letter or digit"
TAG_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
NODE_RE = re.compile(r"^\S{1,255}$")

MAX_REPLICAS = 100
MAX_PRIORITY = 1_000_000
MAX_WEIGHT = 1000
MAX_KEEP_VERSIONS = 64
"""The names bucket keeps 64 revisions per name (cluster/nats/kv.py MAX_HISTORY)."""

POLICY_KEYS = (
    "name",
    "description",
    "priority",
    "match",
    "replicas",
    "spread",
    "constraints",
    "preferences",
    "locality",
    "expire_after",
    "repair",
    "protected",
    "keep_versions",
    "demand",
)
SET_KEYS = ("policies", "consumers")
MATCH_KEYS = ("name", "owner", "labels", "size", "content_type", "bucket")
CONSTRAINT_KEYS = ("tags", "labels", "exclude_nodes")
LOCALITY_KEYS = ("near", "min_local", "mode")
REPAIR_KEYS = ("grace", "max_concurrent", "bandwidth")

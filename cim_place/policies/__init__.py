"""Replication policies: YAML schema, validation and selectors (pure; the KV store is in cluster).

Read in this order: :mod:`~cim_place.policies.model` (what a policy says),
:mod:`~cim_place.policies.validate` (loading files, checks across policies, every problem at once),
:mod:`~cim_place.policies.policy_reader` (the per-field rules of the file format),
:mod:`~cim_place.policies.selectors` (which policy applies to an object) and
:mod:`~cim_place.cluster.state.policies` (the applied set in KV ``cim-place-policies``).

Only the pure parts are re-exported here, so importing the model (as the planner's adapter does)
never loads the NATS client; import the store from :mod:`cim_place.cluster.state.policies`.
"""

from cim_place.policies.explain import Explanation, explain
from cim_place.policies.model import (
    BUILTIN_DEFAULT,
    FAILURE_DOMAINS,
    Constraints,
    Consumer,
    LabelRequirement,
    Locality,
    Match,
    Policy,
    PolicySet,
    Preference,
    Repair,
    Replicas,
    Spread,
)
from cim_place.policies.problems import PolicyValidationError, Problem
from cim_place.policies.selectors import ObjectFacts, match_policy
from cim_place.policies.validate import LoadedPolicies, load_paths, load_text

__all__ = [
    "BUILTIN_DEFAULT",
    "FAILURE_DOMAINS",
    "Constraints",
    "Consumer",
    "Explanation",
    "LabelRequirement",
    "LoadedPolicies",
    "Locality",
    "Match",
    "ObjectFacts",
    "Policy",
    "PolicySet",
    "PolicyValidationError",
    "Preference",
    "Problem",
    "Repair",
    "Replicas",
    "Spread",
    "explain",
    "load_paths",
    "load_text",
    "match_policy",
]

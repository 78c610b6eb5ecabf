"""The canonical JSON form of policies and consumers, as stored in KV and compared by `diff`.

The canonical form is itself a valid policy document (same keys as the YAML file, with seconds
and bytes as integers and label requirements as strings), so it is read back with the validator
and a stored policy can never be something a file could not say.
"""

from __future__ import annotations

from typing import Any

from cim_place.policies.demand import demand_to_dict
from cim_place.policies.model import Consumer, Match, Policy, Preference


def policy_to_dict(policy: Policy) -> dict[str, Any]:
    """The canonical dict of ``policy``; ``policy_from_dict`` reads it back unchanged."""
    out: dict[str, Any] = {
        "name": policy.name,
        "description": policy.description,
        "priority": policy.priority,
        "replicas": {"min": policy.replicas.min, "max": policy.replicas.max},
        "spread": {
            "domain": policy.spread.domain,
            "max_per_domain": policy.spread.max_per_domain,
        },
        "constraints": {
            "tags": list(policy.constraints.tags),
            "labels": [str(r) for r in policy.constraints.labels],
            "exclude_nodes": list(policy.constraints.exclude_nodes),
        },
        "preferences": [_preference(p) for p in policy.preferences],
        "repair": {
            "grace": policy.repair.grace_seconds,
            "max_concurrent": policy.repair.max_concurrent,
        },
    }
    if policy.repair.bandwidth_bytes_per_second is not None:
        out["repair"]["bandwidth"] = policy.repair.bandwidth_bytes_per_second
    if policy.match is not None:
        out["match"] = _match(policy.match)
    if policy.locality is not None:
        out["locality"] = {
            "near": list(policy.locality.near),
            "min_local": policy.locality.min_local,
            "mode": policy.locality.mode,
        }
    if policy.expire_after_seconds is not None:
        out["expire_after"] = policy.expire_after_seconds
    # Only when set: the stored form of policies without them stays as it was.
    if policy.protected:
        out["protected"] = True
    if policy.keep_versions is not None:
        out["keep_versions"] = policy.keep_versions
    if policy.demand is not None:
        out["demand"] = demand_to_dict(policy.demand)
    # Empty lists say nothing; leaving them out keeps stored values and diffs short.
    for section in ("constraints",):
        out[section] = {k: v for k, v in out[section].items() if v}
        if not out[section]:
            del out[section]
    if not out["preferences"]:
        del out["preferences"]
    return out


def consumers_to_dict(consumers: tuple[Consumer, ...]) -> dict[str, dict[str, str]]:
    return {c.name: _consumer(c) for c in sorted(consumers, key=lambda c: c.name)}


def _consumer(consumer: Consumer) -> dict[str, str]:
    out = dict(sorted(consumer.labels.items()))
    if consumer.service is not None:
        out["service"] = consumer.service
    return out


def _preference(p: Preference) -> dict[str, Any]:
    if p.tag is not None:
        return {"tag": p.tag, "weight": p.weight}
    return {"label": str(p.label), "weight": p.weight}


def _match(m: Match) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if m.names:
        out["name"] = list(m.names)
    if m.owners:
        out["owner"] = list(m.owners)
    if m.labels:
        out["labels"] = [str(r) for r in m.labels]
    if m.size_min is not None or m.size_max is not None:
        out["size"] = {k: v for k, v in (("min", m.size_min), ("max", m.size_max)) if v is not None}
    if m.content_types:
        out["content_type"] = list(m.content_types)
    if m.buckets:
        out["bucket"] = list(m.buckets)
    return out

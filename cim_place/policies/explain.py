"""Explaining which policy applies to an object and why (pure: no I/O).

Until the planner is wired in, an explanation holds the chosen policy, the reasons for the choice
and every policy's verdict; the desired placement will be added beside them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cim_place.policies.codec import policy_to_dict
from cim_place.policies.demand import summarize_demand
from cim_place.policies.model import Policy, PolicySet
from cim_place.policies.quantities import format_duration, format_size
from cim_place.policies.selectors import MatchResult, ObjectFacts, evaluate, match_policy


@dataclass(frozen=True, slots=True)
class Explanation:
    obj: ObjectFacts
    policy: Policy
    reasons: tuple[str, ...]
    verdicts: tuple[MatchResult, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "object": {
                "cid": self.obj.cid,
                "name": self.obj.name,
                "owner": self.obj.owner,
                "metadata": dict(self.obj.metadata),
                "size": self.obj.size,
                "content_type": self.obj.content_type,
            },
            "policy": self.policy.name,
            "reasons": list(self.reasons),
            "policy_spec": policy_to_dict(self.policy),
            "evaluated": [
                {"policy": v.policy.name, "matched": v.matched, "reasons": list(v.reasons)}
                for v in self.verdicts
            ],
        }


def explain(policy_set: PolicySet, obj: ObjectFacts) -> Explanation:
    """Which policy of ``policy_set`` applies to ``obj``, why, and what every policy said."""
    policy, reasons = match_policy(policy_set.policies, obj)
    verdicts = tuple(evaluate(p, obj) for p in sorted(policy_set.policies, key=lambda p: p.name))
    return Explanation(obj=obj, policy=policy, reasons=tuple(reasons), verdicts=verdicts)


def summarize(policy: Policy) -> str:
    """One line saying what ``policy`` asks for, e.g. ``3 copies, 1 per zone, ssd``."""
    r = policy.replicas
    count = str(r.min) if r.min == r.max else f"{r.min}-{r.max}"
    parts = [f"{count} {'copy' if count == '1' else 'copies'}"]
    parts.append(f"max {policy.spread.max_per_domain} per {policy.spread.domain}")
    if policy.constraints.tags:
        parts.append("tags " + ",".join(policy.constraints.tags))
    parts.extend(f"`{req}`" for req in policy.constraints.labels)
    if policy.constraints.exclude_nodes:
        parts.append("not on " + ",".join(policy.constraints.exclude_nodes))
    if policy.locality is not None:
        loc = policy.locality
        parts.append(f"{loc.min_local} near {','.join(loc.near)} ({loc.mode})")
    if policy.expire_after_seconds is not None:
        parts.append(f"expires after {format_duration(policy.expire_after_seconds)}")
    if policy.protected:
        parts.append("protected from `cim-place rm`")
    if policy.keep_versions is not None:
        parts.append(f"names keep {policy.keep_versions} versions")
    if policy.repair.bandwidth_bytes_per_second is not None:
        parts.append(f"repair <= {format_size(policy.repair.bandwidth_bytes_per_second)}/s")
    if policy.demand is not None:
        parts.append(summarize_demand(policy.demand))
    return ", ".join(parts)


def render(explanation: Explanation) -> str:
    """The explanation as text for a terminal."""
    obj = explanation.obj
    subject = obj.name or obj.cid or "object"
    lines = [
        f"object   {subject}" + (f" ({obj.cid})" if obj.cid and obj.name else ""),
        f"policy   {explanation.policy.name}: {summarize(explanation.policy)}",
        "why",
        *(f"  - {reason}" for reason in explanation.reasons),
    ]
    if explanation.verdicts:
        lines.append("policies evaluated")
        for verdict in explanation.verdicts:
            mark = "match" if verdict.matched else "no   "
            lines.append(f"  {mark} {verdict.policy.name}")
            lines.extend(f"          {why}" for why in verdict.reasons)
    return "\n".join(lines)

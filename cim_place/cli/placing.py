"""Where the planner would place an object in a running domain, for `cim-place policy explain`.

Reads the object's status (locations KV), the node heartbeats and drain flags, compiles the
matching policy and asks the planner, with a reason for every volume. Nothing is changed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

from nats.js import JetStreamContext

from cim_place.cli.status import LATE_AFTER
from cim_place.cluster.controller.service import draining_nodes
from cim_place.cluster.state.locations import LocationStore
from cim_place.cluster.state.name_record import UnknownNameError
from cim_place.cluster.state.names import NameRegistry
from cim_place.cluster.state.nodes import NODE_TTL, list_nodes
from cim_place.errors import InvalidCidError, TransportError
from cim_place.objectstore import cid as cids
from cim_place.placement.model import PlacedObject, Reason
from cim_place.placement.planner import plan
from cim_place.placement.rules import compile_policy, node_map_from
from cim_place.policies.model import PolicySet
from cim_place.policies.selectors import ObjectFacts, match_policy


@dataclass(frozen=True, slots=True)
class Placing:
    policy: str
    desired: tuple[str, ...]
    current: tuple[str, ...]
    reasons: tuple[Reason, ...]
    degraded: tuple[str, ...]
    cached: tuple[tuple[str, str], ...] = ()
    """Cached copies (volume, the demand that caused it): never part of the placement."""
    demand: tuple[str, ...] = ()
    """The leading controller's reads and last demand decision (``api.demand``), in words."""

    def to_dict(self) -> dict[str, object]:
        return {
            "policy": self.policy,
            "desired": list(self.desired),
            "current": list(self.current),
            "volumes": [
                {
                    "volume": r.volume,
                    "taken": r.taken,
                    "verdict": r.verdict.value,
                    "detail": r.detail,
                    "rank": r.rank,
                }
                for r in self.reasons
            ],
            "degraded": list(self.degraded),
            "cached": [{"volume": volume, "cause": cause} for volume, cause in self.cached],
            "demand": list(self.demand),
        }

    def render(self) -> str:
        lines = [
            "",
            f"placement under {self.policy!r}: {', '.join(self.desired) or 'nowhere'}",
            f"  current copies: {', '.join(self.current) or 'none'}",
        ]
        lines += [f"  {reason}" for reason in self.reasons]
        lines += [f"  degraded: {message}" for message in self.degraded]
        lines += [
            f"  cached on {volume}: {cause or 'demand'} (an extra copy, not counted towards "
            "the policy's copies; dropped when the reads stop)"
            for volume, cause in self.cached
        ]
        if self.demand:
            lines += ["", "demand (the leading controller):"]
            lines += [f"  {line}" for line in self.demand]
        return "\n".join(lines)


@dataclass(frozen=True, slots=True)
class Found:
    facts: ObjectFacts
    placing: Placing | None


async def place_in_domain(
    js: JetStreamContext, ref: str, facts: ObjectFacts, policy_set: PolicySet
) -> Found:
    """The object's facts completed from the domain, and where the planner places it.

    An object the domain does not know (no such name, no status yet) is still explained from
    the facts given; its placement is then planned as for a new object.
    """
    try:
        root = cids.parse(ref)
    except InvalidCidError:
        try:
            root = await NameRegistry(js).resolve(ref)
        except UnknownNameError:
            return Found(facts, None)
    try:
        status = await (await LocationStore(js).open(create=False)).get(root)
    except TransportError:
        status = None
    if status is not None:
        facts = replace(
            facts,
            cid=status.cid,
            name=facts.name or status.name,
            owner=facts.owner or status.owner,
            metadata={**status.metadata, **facts.metadata},
            size=facts.size if facts.size is not None else status.size,
        )
    policy = match_policy(policy_set.policies, facts)[0]
    compiled = compile_policy(policy, policy_set.consumers)
    records = await list_nodes(js)
    node_map = node_map_from(
        records,
        now=time.time(),
        late_after=LATE_AFTER,
        down_after=NODE_TTL,
        draining=await draining_nodes(js),
    )
    current = tuple(
        f"{loc.node}/{loc.volume}"
        for loc in (status.locations if status else ())
        if loc.state in ("pinned", "late")
    )
    placement = plan(PlacedObject(root, facts.size or 0), compiled.rule, node_map, current)
    cached = tuple(
        (f"{loc.node}/{loc.volume}", loc.cause)
        for loc in (status.locations if status else ())
        if loc.state == "cached"
    )
    return Found(
        facts,
        Placing(
            policy.name, placement.desired, current, placement.reasons, placement.degraded, cached
        ),
    )

"""Demand-driven cached copies: where an object gains an extra copy, and when it loses one.

Pure: no NATS, no clock (``now`` is passed in), no disk. Read counts come from
:mod:`cim_place.placement.demand_window`; this module decides. docs/DEMAND.md has the model.

Steps of :func:`decide`, for one object:

1. The object's cached copies (from the :class:`CacheLedger`) on a volume that the planner now
   requires are *adopted*: they stop being cached and are never dropped here. Copies on volumes
   gone from the node map or down are dropped from the ledger.
2. Reads are summed per *locus*: the reading node (``follow: readers``) or its zone
   (``follow: zone``). A cached copy's last read moves to the latest read at its locus.
3. A cached copy not read for ``keep`` is dropped; above ``max_extra`` (the policy changed), the
   least recently read ones are dropped.
4. Every locus with at least ``min_reads`` reads in the window, the last within ``keep``, and
   no copy (required or cached) is a candidate, most reads first (ties: latest read, then
   name). While the object has fewer than ``max_extra`` cached copies, a candidate gets one on
   a volume there that passes the policy's hard constraints, is up, holds no copy and has room:
   on the reading node itself, or in the zone on the node that read most. The node's budget
   (a share of its capacity, or bytes) bounds its cached bytes across all objects; to make
   room, cached copies on that node read less recently than the candidate are evicted, least
   recently read first. A candidate that fits nowhere is reported in ``skipped``.

What this never does: add a copy on a volume the planner requires, drop a required copy, or
change what the planner is given. The controller passes the planner only the object's
non-cached copies as ``current`` (:func:`required_current`), so its output is the same with
and without demand, and ``min`` counts required copies only.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Literal

from cim_place.objectstore.cid import Cid
from cim_place.placement.demand_cache import (
    CacheAdd,
    CachedCopy,
    CacheDrop,
    CacheLedger,
    DemandDecision,
    required_current,
)
from cim_place.placement.demand_window import Reads
from cim_place.placement.eligibility import Eligibility
from cim_place.placement.model import (
    NodeMap,
    PlacementRule,
    SpreadLevel,
    Volume,
    VolumeId,
    VolumeState,
)
from cim_place.placement.status import Location
from cim_place.policies.model import Consumer, Demand
from cim_place.policies.quantities import format_duration

__all__ = [
    "CacheAdd",
    "CacheDrop",
    "CacheLedger",
    "CachedCopy",
    "DemandContext",
    "DemandDecision",
    "DemandRule",
    "Locus",
    "cached_locations",
    "decide",
    "describe",
    "locate_consumers",
    "node_zones",
    "required_current",
    "touch",
]

Locus = str
"""Where demand is counted: a node id, or ``region/zone`` for ``follow: zone``."""


@dataclass(frozen=True, slots=True, kw_only=True)
class DemandRule:
    """The decision's view of a policy's ``demand:`` section (times in seconds)."""

    follow: Literal["readers", "zone"] = "readers"
    min_reads: int = 5
    window: float = 600.0
    max_extra: int = 2
    keep: float = 3600.0
    budget_fraction: float | None = 0.2
    budget_bytes: int | None = None

    @classmethod
    def of(cls, demand: Demand) -> DemandRule:
        return cls(
            follow=demand.follow,
            min_reads=demand.min_reads,
            window=float(demand.window_seconds),
            max_extra=demand.max_extra,
            keep=float(demand.keep_seconds),
            budget_fraction=(
                None if demand.budget_percent is None else demand.budget_percent / 100.0
            ),
            budget_bytes=demand.budget_bytes,
        )

    def budget(self, node_capacity: int) -> int:
        """Bytes a node with ``node_capacity`` bytes may spend on cached copies."""
        if self.budget_bytes is not None:
            return self.budget_bytes
        return int(node_capacity * (self.budget_fraction or 0.0))


def zone_locus(volume: Volume) -> Locus:
    return "/".join(volume.domain(SpreadLevel.ZONE))


def node_zones(node_map: NodeMap) -> dict[str, Locus]:
    """The zone locus of every node in the map (for :meth:`DemandWindow.by_zone`)."""
    return {v.node: zone_locus(v) for v in node_map.volumes}


@dataclass(frozen=True, slots=True)
class DemandContext:
    """What :func:`decide` derives from a policy and the node map, computed once per pass."""

    rule: DemandRule
    eligibility: Eligibility
    locus_of: Mapping[str, Locus]
    """Reading node -> locus (itself, or its zone); nodes outside the map have none."""
    at_locus: Mapping[Locus, tuple[Volume, ...]]
    """Eligible, up volumes per locus, in id order."""
    capacity: Mapping[str, int]

    @classmethod
    def of(
        cls,
        rule: DemandRule,
        placement_rule: PlacementRule,
        node_map: NodeMap,
        eligibility: Eligibility | None = None,
    ) -> DemandContext:
        el = eligibility if eligibility is not None else Eligibility.of(placement_rule, node_map)
        if rule.follow == "zone":
            locus_of = node_zones(node_map)
        else:
            locus_of = {v.node: v.node for v in node_map.volumes}
        at_locus: dict[Locus, list[Volume]] = {}
        for v in el.eligible:
            if v.state is VolumeState.UP:
                at_locus.setdefault(locus_of[v.node], []).append(v)
        capacity: dict[str, int] = {}
        for v in node_map.volumes:
            capacity[v.node] = capacity.get(v.node, 0) + v.capacity
        return cls(
            rule=rule,
            eligibility=el,
            locus_of=locus_of,
            at_locus={k: tuple(vs) for k, vs in at_locus.items()},
            capacity=capacity,
        )


def decide(
    *,
    cid: Cid,
    size: int,
    rule: DemandRule,
    placement_rule: PlacementRule,
    node_map: NodeMap,
    required: Collection[VolumeId],
    reads: Mapping[str, Reads],
    ledger: CacheLedger,
    now: float,
    eligibility: Eligibility | None = None,
    context: DemandContext | None = None,
) -> DemandDecision:
    """The cached copies of ``cid`` to add and drop (module docstring). ``reads``: the object's
    reads per reading node over ``rule.window``; ``required``: the planner's desired volumes.
    Pass a ``context`` (:meth:`DemandContext.of`, same rule and map) to decide many objects."""
    ctx = context or DemandContext.of(rule, placement_rule, node_map, eligibility)
    locus_of = ctx.locus_of
    required = frozenset(required)
    by_locus: dict[Locus, Reads] = {}
    for node, r in reads.items():
        locus = locus_of.get(node)
        if locus is not None and r.count > 0:
            by_locus[locus] = by_locus.get(locus, Reads()).plus(r.count, r.bytes, r.last_read)

    adopted: list[CachedCopy] = []
    drop: list[CacheDrop] = []
    kept: list[CachedCopy] = []
    for copy in ledger.of_object(cid):
        volume = node_map.get(copy.volume)
        if copy.volume in required:
            adopted.append(copy)
        elif volume is None or copy.volume in ctx.eligibility.refused:
            # Gone, down, draining or no longer allowed by the policy's constraints.
            reason = (
                "volume gone from the node map"
                if volume is None
                else ctx.eligibility.refused[copy.volume][0].value
            )
            drop.append(CacheDrop(cid, copy.volume, reason))
        else:
            seen = by_locus.get(locus_of.get(volume.node, ""), Reads())
            kept.append(replace(copy, last_read=max(copy.last_read, seen.last_read)))
    for copy in [c for c in kept if now - c.last_read >= rule.keep]:
        kept.remove(copy)
        drop.append(CacheDrop(cid, copy.volume, f"no reads for {format_duration(int(rule.keep))}"))
    kept.sort(key=lambda c: (-c.last_read, c.volume))
    for copy in kept[rule.max_extra :]:
        drop.append(CacheDrop(cid, copy.volume, f"more than max_extra ({rule.max_extra})"))
    kept = kept[: rule.max_extra]

    holding = required | {c.volume for c in kept}
    nodes_holding = {v.split("/", 1)[0] for v in holding}
    served = {locus_of[n] for n in nodes_holding if n in locus_of}
    candidates = sorted(
        (
            (locus, r)
            for locus, r in by_locus.items()
            # Reads older than keep (counted because the window rounds to whole slots) would
            # make a copy that is dropped at once: no copy for them.
            if r.count >= rule.min_reads and locus not in served and now - r.last_read < rule.keep
        ),
        key=lambda item: (-item[1].count, -item[1].last_read, item[0]),
    )
    budget = _Budget(rule, ctx.capacity, ledger, cid)
    add: list[CacheAdd] = []
    skipped: list[str] = []
    for locus, r in candidates:
        if len(kept) + len(add) >= rule.max_extra:
            skipped.append(f"{locus}: {r.count} reads, but max_extra ({rule.max_extra}) reached")
            continue
        fit = [
            v for v in ctx.at_locus.get(locus, ()) if v.free >= size and v.node not in nodes_holding
        ]
        # The node that read most first, then the volume with most free space, then by id.
        fit.sort(key=lambda v: (-reads.get(v.node, Reads()).count, -v.free, v.id))
        for volume in fit:
            evict = budget.make_room(volume.node, size, r.last_read)
            if evict is None:
                continue
            drop.extend(
                CacheDrop(c.cid, c.volume, f"evicted, least recently read, for {locus}")
                for c in evict
            )
            cause = f"{r.count} reads in {format_duration(int(rule.window))} from {locus}"
            add.append(CacheAdd(cid, volume.id, size, locus, r.count, r.last_read, cause))
            nodes_holding.add(volume.node)
            break
        else:
            skipped.append(f"{locus}: {r.count} reads, but no volume there has room or budget")
    return DemandDecision(
        add=tuple(add),
        drop=tuple(drop),
        refresh=tuple(kept),
        adopted=tuple(adopted),
        skipped=tuple(skipped),
    )


def cached_locations(copies: Iterable[CachedCopy], node_map: NodeMap) -> tuple[Location, ...]:
    """The ``cached`` rows of an object's status, each with the demand that caused it."""
    rows = []
    for copy in copies:
        volume = node_map.get(copy.volume)
        zone = volume.zone if volume is not None else ""
        name = copy.volume.split("/", 1)[1]
        rows.append(Location(copy.node, name, zone, "cached", cause=copy.cause))
    return tuple(rows)


def describe(decision: DemandDecision, rule: DemandRule, now: float) -> list[str]:
    """What ``policy explain`` says about an object's demand: why each cached copy is there or
    goes, and which demand got no copy."""
    lines = [
        f"cached on {c.volume}: {c.cause or 'demand'}; last read "
        f"{format_duration(max(int(now - c.last_read), 0))} ago, dropped after "
        f"{format_duration(int(rule.keep))} without reads"
        for c in decision.refresh
    ]
    lines.extend(f"add a cached copy on {a.volume}: {a.cause}" for a in decision.add)
    lines.extend(f"drop the cached copy of {d.volume}: {d.reason}" for d in decision.drop)
    lines.extend(f"{c.volume} is now a required copy (was cached)" for c in decision.adopted)
    lines.extend(f"no copy for {s}" for s in decision.skipped)
    return lines


def touch(
    ledger: CacheLedger, context: DemandContext, cid: Cid, node: str, last_read: float
) -> bool:
    """Move the last read of ``cid``'s cached copy at ``node``'s locus to ``last_read``: what a
    decision would do for a read served by a cached copy, without deciding. True if one moved."""
    locus = context.locus_of.get(node)
    moved = False
    for copy in ledger.of_object(cid):
        if context.locus_of.get(copy.node) == locus and copy.last_read < last_read:
            ledger.put(replace(copy, last_read=last_read))
            moved = True
    return moved


class _Budget:
    """Cached bytes per node during one decision, with LRU eviction of other objects' copies."""

    def __init__(
        self, rule: DemandRule, capacity: Mapping[str, int], ledger: CacheLedger, cid: Cid
    ) -> None:
        self.rule = rule
        self.capacity = capacity
        self.ledger = ledger
        self.cid = cid
        self.evicted: set[tuple[Cid, VolumeId]] = set()
        self.freed: dict[str, int] = {}
        self.added: dict[str, int] = {}

    def make_room(self, node: str, size: int, last_read: float) -> list[CachedCopy] | None:
        """The copies to evict so ``size`` more bytes fit on ``node``; None when they cannot
        (only copies of other objects read before ``last_read`` may go)."""
        budget = self.rule.budget(self.capacity.get(node, 0))
        used = self.ledger.used(node) - self.freed.get(node, 0) + self.added.get(node, 0)
        evict: list[CachedCopy] = []
        if used + size > budget:
            for victim in self.ledger.least_recently_read(node):
                if used + size <= budget or victim.last_read >= last_read:
                    break
                if victim.cid == self.cid or (victim.cid, victim.volume) in self.evicted:
                    continue
                evict.append(victim)
                used -= victim.size
            if used + size > budget:
                return None
        self.evicted.update((c.cid, c.volume) for c in evict)
        self.freed[node] = self.freed.get(node, 0) + sum(c.size for c in evict)
        self.added[node] = self.added.get(node, 0) + size
        return evict


def locate_consumers(
    consumers: Iterable[Consumer],
    service_nodes: Mapping[str, Mapping[str, int]],
    node_map: NodeMap,
    previous: Mapping[str, str] | None = None,
) -> tuple[tuple[Consumer, ...], dict[str, str]]:
    """Consumers declared by ``service``, given the labels of the node their reads come from.

    ``service_nodes``: reads per node of each service over the window
    (:meth:`DemandWindow.service_nodes`). The node with most reads locates the service; the
    previous location (``previous``: consumer -> node) is kept while it still has at least half
    the reads of the busiest node, so a service reading from two nodes does not flap between
    them. Without reads the declared labels (if any) stand. Returns the consumers and the new
    consumer -> node map.
    """
    previous = previous or {}
    first_volume: dict[str, Volume] = {}
    for v in node_map.volumes:
        first_volume.setdefault(v.node, v)
    located: dict[str, str] = {}
    out: list[Consumer] = []
    for consumer in consumers:
        counts = {
            n: c
            for n, c in service_nodes.get(consumer.service or "", {}).items()
            if n in first_volume
        }
        if consumer.service is None or not counts:
            out.append(consumer)
            continue
        best = max(sorted(counts), key=lambda n: counts[n])
        before = previous.get(consumer.name)
        node = before if before in counts and 2 * counts[before] >= counts[best] else best
        assert node is not None
        v = first_volume[node]
        labels = {k: x for k, x in (("region", v.region), ("zone", v.zone), ("host", v.host)) if x}
        located[consumer.name] = node
        out.append(Consumer(consumer.name, labels, consumer.service))
    return tuple(out), located

"""The planner: where an object's replicas should be. A pure, deterministic function.

Steps of :func:`plan` (see DESIGN.md, "The control loop", for the simulation behind the choice):

1. Hard constraints first: excluded nodes, down and draining volumes, required tags, label
   requirements. What fails them is refused with the constraint that failed.
2. Score every eligible volume with weighted rendezvous hashing (straw2): ``ln(u) / w``, ``u``
   from a splitmix64 mix of the object key xor the volume's seed, ``w`` the capacity weight times
   the matching soft preferences. Rank by score, ties by volume id.
3. Bounded load: a volume without room for the object, or whose used bytes exceed
   ``(1 + eps)`` times its fair share, takes no new replica while another volume of the same
   failure-domain level can (the cap balances, it never costs a copy or a domain). Existing
   copies are exempt. The fair share follows the spread (:mod:`placement.shares`): a zone that
   must hold a copy of every object has the share that implies.
4. Locality: for each consumer in turn, ``min_local`` copies go to the eligible volumes nearest
   it (copies already chosen near it, for an earlier consumer, count).
5. Walk the ranking, existing valid copies first (minimal churn), taking a volume when its
   failure domain is still unused; when domains run out, walk again one level narrower (zone,
   then host, then volume), so replicas spread as far apart as the topology allows. Two
   replicas never share a volume.
6. Report a reason for every volume, and a degraded message when fewer copies than desired fit.

The flat walk (not a per-zone choice first) is what keeps movement minimal: a volume's arrival
or departure only changes the objects for which it ranks first in its domain.

Steps 1 and 2 (what a rule allows, computed once per rule and node map, and the straw2 scores)
are in :mod:`cim_place.placement.eligibility`; steps 3-6 are the walk here.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence

import numpy as np

from cim_place.errors import PlacementError
from cim_place.placement.eligibility import Eligibility, straw2_draws
from cim_place.placement.feasibility import unmet
from cim_place.placement.model import (
    FAR,
    DomainKey,
    NodeMap,
    PlacedObject,
    Placement,
    PlacementRule,
    Reason,
    SpreadLevel,
    Verdict,
    Volume,
    VolumeId,
)


def plan(
    obj: PlacedObject,
    rule: PlacementRule,
    node_map: NodeMap | Iterable[Volume],
    current: Collection[VolumeId] = frozenset(),
    *,
    keep_current: bool = True,
    eligibility: Eligibility | None = None,
    explain: bool = True,
) -> Placement:
    """The desired volumes for ``obj`` under ``rule``, with a reason for every volume.

    ``node_map``: a :class:`NodeMap`, or the volumes to build one from (in any order).

    ``current``: volumes holding a confirmed copy. With ``keep_current`` (the default, for
    reconcile and repair) a copy on an up, eligible volume is kept while the rule allows it;
    ``keep_current=False`` gives the balanced ideal that a rebalance moves towards. Pass an
    ``eligibility`` computed by :meth:`Eligibility.of` for the same rule and map to plan many
    objects without recomputing it. ``explain=False`` skips the per-volume reasons (most of the
    cost of a plan) when only ``desired`` and ``degraded`` are needed.
    """
    return plan_key(
        obj.key,
        obj.size,
        rule,
        node_map,
        current,
        keep_current=keep_current,
        eligibility=eligibility,
        explain=explain,
    )


def plan_key(
    key: int,
    size: int,
    rule: PlacementRule,
    node_map: NodeMap | Iterable[Volume],
    current: Collection[VolumeId] = frozenset(),
    *,
    keep_current: bool = True,
    eligibility: Eligibility | None = None,
    explain: bool = True,
) -> Placement:
    """:func:`plan` for an object given by its 64-bit key (:func:`model.object_key`)."""
    if not isinstance(node_map, NodeMap):
        node_map = NodeMap(node_map)
    el = eligibility if eligibility is not None else Eligibility.of(rule, node_map)
    if el.node_map is not node_map or (el.rule is not rule and el.rule != rule):
        raise PlacementError(
            "the eligibility passed to the planner was computed for another rule or node map; "
            "compute it with Eligibility.of(rule, node_map) for the same inputs"
        )
    kept = frozenset(current) if keep_current else frozenset()
    if kept and not explain and len(kept) == rule.replicas and not rule.localities:
        # Most plans of a pass find an object's copies where the last plan put them. The walk
        # takes existing copies first, so when the copies alone fill the widest spread level
        # it chooses exactly them: rank only those (bench/controller_scale.py --walk).
        positions = sorted(el.position.get(vid, -1) for vid in kept)
        if positions[0] >= 0:
            quick = _Walk(el, key, size, kept, among=positions)
            levels = rule.spread_levels()[:1]
            if quick.fill(quick.ranking, rule.replicas, Verdict.RANKED, levels=levels) == len(kept):
                return quick.placement(explain)
    walk = _Walk(el, key, size, kept)
    walk.run()
    if kept and rule.localities and {el.eligible[i].id for i in walk.chosen} != kept:
        # With consumers, the walk with the copies in place can choose other volumes than it
        # chose without them: a volume over the load cap is passed over while new but exempt
        # once it holds a copy, and which copies count for which consumer decides how many a
        # hard locality leaves unplaced. A placement the planner makes from scratch is kept
        # as it is, so a re-plan never churns what the last plan placed.
        fresh = _Walk(el, key, size, frozenset())
        fresh.run()
        if {el.eligible[i].id for i in fresh.chosen} == kept:
            fresh.kept = walk.kept
            for i in fresh.chosen:
                fresh.verdict[i] = Verdict.KEPT
            walk = fresh
    return walk.placement(explain)


_NEARNESS = {0: "at the consumer", 1: "in the consumer's zone", 2: "in the consumer's region"}


class _Walk:
    """One object's walk over the ranking (step 4-6 of the module docstring)."""

    def __init__(
        self,
        el: Eligibility,
        key: int,
        size: int,
        current: frozenset[VolumeId],
        among: list[int] | None = None,
    ) -> None:
        """``among``: rank only these volumes (ascending positions, each holding a copy in
        ``current``); the others are left out of :attr:`ranking` and keep rank 0."""
        self.el = el
        self.rule = el.rule
        self.size = size
        vols = el.eligible
        n = len(vols)
        self.kept = [False] * n
        for vid in current:
            if (at := el.position.get(vid)) is not None:
                self.kept[at] = True
        self.full = [False] * n
        self.over_cap = [False] * n
        self.chosen: list[int] = []
        self.chosen_set: set[int] = set()
        self.verdict: dict[int, Verdict] = {}
        self.counts: dict[SpreadLevel, dict[DomainKey, int]] = {level: {} for level in SpreadLevel}
        # Per locality with min_local > 0, in the rule's order: copies near it, and how many
        # a hard locality could not place.
        self.local_count: list[int] = []
        self.local_shortfall: list[int] = []
        self.ranking: list[int] = []
        self.rank: list[int] = [0] * n
        if among is not None:
            subset = np.array(among, dtype=np.intp)
            draws = straw2_draws(
                np.array([key], dtype=np.uint64), el.seeds[subset], el.weights[subset]
            )
            # The same draws as over every volume (elementwise), and ties in id order again.
            self.ranking = [among[j] for j in np.argsort(-draws[0], kind="stable").tolist()]
            for r, i in enumerate(self.ranking, 1):
                self.rank[i] = r
            return  # every volume ranked holds a copy: none is full or over the cap
        if n:
            draws = straw2_draws(np.array([key], dtype=np.uint64), el.seeds, el.weights)[0]
            # A stable sort of the negated draws: ties stay in id order.
            order = np.argsort(-draws, kind="stable")
            rank = np.empty(n, dtype=np.intp)
            rank[order] = np.arange(1, n + 1)
            self.ranking = order.tolist()
            self.rank = rank.tolist()
        cap = el.cap_factor
        total = el.load_total(size)
        used = el.used.tolist()
        free = el.free.tolist()
        cap_list = cap.tolist() if cap is not None else None
        for i in range(n):
            if self.kept[i]:
                continue  # an existing copy needs no room and adds no load
            if free[i] < size:
                self.full[i] = True
            elif cap_list is not None and used[i] > total * cap_list[i]:
                self.over_cap[i] = True

    def available(self, i: int) -> bool:
        return not (self.full[i] or self.over_cap[i])

    def admissible(self, i: int, level: SpreadLevel) -> bool:
        if i in self.chosen_set:
            return False
        domains = self.el.domains
        if level is not SpreadLevel.VOLUME and self.counts[level].get(domains[level][i], 0):
            return False
        limit = self.rule.max_per_domain
        cap = self.rule.cap_domain_level
        return limit is None or self.counts[cap].get(domains[cap][i], 0) < limit

    def take(self, i: int, verdict: Verdict) -> None:
        self.chosen.append(i)
        self.chosen_set.add(i)
        self.verdict[i] = Verdict.KEPT if self.kept[i] else verdict
        for level, domains in self.el.domains.items():
            counts = self.counts[level]
            domain = domains[i]
            counts[domain] = counts.get(domain, 0) + 1

    def fill(
        self,
        order: Sequence[int],
        target: int,
        verdict: Verdict,
        spill: Sequence[int] = (),
        levels: Sequence[SpreadLevel] | None = None,
    ) -> int:
        """Take from ``order`` until ``target`` volumes are chosen, widest domains first
        (``levels``: the rule's spread levels by default).

        ``spill``: volumes over the load cap, taken at a level only when ``order`` has no
        admissible volume left there. The cap balances load; it must never cost a copy or a
        failure domain that the rule could have had (a zone whose only volume is over the cap
        still gets the copy rather than a second zone doubling up).
        """
        taken = 0
        for level in self.rule.spread_levels() if levels is None else levels:
            for pool in (order, spill):
                for i in pool:
                    if len(self.chosen) >= target:
                        return taken
                    if self.admissible(i, level):
                        self.take(i, verdict)
                        taken += 1
        return taken

    def run(self) -> None:
        rule = self.rule
        replicas = rule.replicas
        candidates = [i for i in self.ranking if self.available(i)]
        spill = [i for i in self.ranking if self.over_cap[i] and not self.full[i]]
        eligible = self.el.eligible
        for locality in rule.localities:
            if locality.min_local <= 0:
                continue
            # Each consumer in turn: copies already chosen for an earlier consumer count when
            # they are as near this one as any volume is (a copy in the first consumer's zone
            # is no copy near a second consumer in another zone of the same region); the rest
            # of its min_local go to the volumes nearest it, within the replicas that the hard
            # shortfalls so far leave.
            distance = {i: locality.distance(eligible[i]) for i in candidates + spill}
            best = min(distance.values(), default=FAR)
            here = sum(1 for i in self.chosen if best < FAR and distance.get(i, FAR) <= best)
            need = locality.min_local - here
            if need <= 0:
                self.local_count.append(here)
                continue
            # Nearness before the load cap: a volume over the cap still takes the copy when it
            # is nearer the consumer than any volume under it (the cap balances load among
            # equally good volumes; it must not send a consumer's copy to another zone).
            near = [i for i in candidates if distance[i] < FAR]
            near_spill = [i for i in spill if distance[i] < FAR]
            nearest_admitted = min((distance[i] for i in near), default=FAR)
            near += [i for i in near_spill if distance[i] < nearest_admitted]
            near_spill = [i for i in near_spill if distance[i] >= nearest_admitted]
            near.sort(key=lambda i: (not self.kept[i], distance[i], self.rank[i]))
            near_spill.sort(key=lambda i: (distance[i], self.rank[i]))
            target = min(len(self.chosen) + need, replicas - sum(self.local_shortfall))
            taken = self.fill(near, target, Verdict.LOCAL, near_spill)
            self.local_count.append(here + taken)
            if locality.hard:
                self.local_shortfall.append(need - taken)
            else:
                self.local_shortfall.append(0)
        # Existing copies first: among volumes the rule allows, keeping one moves no data.
        order = [i for i in candidates if self.kept[i]] + [
            i for i in candidates if not self.kept[i]
        ]
        self.fill(order, replicas - sum(self.local_shortfall), Verdict.RANKED, spill)

    def placement(self, explain: bool) -> Placement:
        el = self.el
        vols = el.eligible
        if not explain:
            desired = tuple(vols[i].id for i in self.chosen)
            return Placement(desired=desired, reasons=(), degraded=self._degraded())
        reasons: list[Reason] = []
        localities = self.rule.localities
        for i in self.chosen:
            detail = ""
            if localities and self.verdict[i] in (Verdict.LOCAL, Verdict.KEPT):
                nearest = min(locality.distance(vols[i]) for locality in localities)
                detail = _NEARNESS.get(nearest, "")
            reasons.append(Reason(vols[i].id, True, self.verdict[i], detail, self.rank[i]))
        worst_taken = max((self.rank[i] for i in self.chosen), default=0)
        spread_domains = el.domains[self.rule.spread]
        spread_counts = self.counts[self.rule.spread]
        cap_domains = el.domains[self.rule.cap_domain_level]
        cap_counts = self.counts[self.rule.cap_domain_level]
        limit = self.rule.max_per_domain
        for i in self.ranking:
            if i in self.chosen_set:
                continue
            volume = vols[i]
            rank = self.rank[i]
            if self.full[i]:
                verdict, detail = Verdict.FULL, f"{volume.free} bytes free, object is {self.size}"
            elif self.over_cap[i]:
                verdict, detail = Verdict.OVER_CAP, f"{volume.used} bytes used"
            else:
                used_here = spread_counts.get(spread_domains[i], 0)
                if limit is not None and cap_counts.get(cap_domains[i], 0) >= limit:
                    level = self.rule.cap_domain_level
                    verdict, detail = Verdict.DOMAIN_FULL, self._domain_name(i, level)
                elif used_here and rank < worst_taken:
                    verdict, detail = Verdict.DOMAIN_USED, self._domain_name(i)
                else:
                    verdict, detail = Verdict.NOT_NEEDED, ""
                if self.kept[i]:
                    verdict, detail = Verdict.SURPLUS, verdict.value
            reasons.append(Reason(volume.id, False, verdict, detail, rank))
        for volume_id, (verdict, detail) in sorted(el.refused.items()):
            reasons.append(Reason(volume_id, False, verdict, detail))
        return Placement(
            desired=tuple(vols[i].id for i in self.chosen),
            reasons=tuple(reasons),
            degraded=self._degraded(),
        )

    def _domain_name(self, i: int, level: SpreadLevel | None = None) -> str:
        level = self.rule.spread if level is None else level
        return f"{level.name.lower()} {'/'.join(self.el.domains[level][i])}"

    def _degraded(self) -> tuple[str, ...]:
        out: list[str] = []
        rule = self.rule
        active = [loc for loc in rule.localities if loc.min_local > 0]
        for locality, count, short in zip(
            active, self.local_count, self.local_shortfall, strict=False
        ):
            if not short:
                continue
            near = ", ".join(str(r) for r in locality.requirements) or "anywhere"
            out.append(
                f"locality: only {count} of {locality.min_local} local copies fit near the "
                f"consumer ({near}); hard locality leaves the rest unplaced"
            )
        placed = len(self.chosen)
        if placed < rule.replicas:
            why = unmet(
                rule, self.el.eligible, refused=len(self.el.refused), full=self.full, size=self.size
            )
            detail = (
                str(why)
                if why is not None
                else (
                    f"{len(self.el.eligible)} volumes pass the hard constraints "
                    f"({len(self.el.refused)} refused), {sum(self.full)} lack room"
                )
            )
            out.append(
                f"only {placed} of {rule.replicas} replicas can be placed: {detail}"
                + (f" (below the policy minimum of {rule.min})" if placed < rule.min else "")
            )
        return tuple(out)

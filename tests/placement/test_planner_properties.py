"""Properties of the planner over generated topologies and rules (hypothesis).

Deterministic; never two replicas on one volume; spread maximal; hard constraints never violated;
adding a volume moves close to the optimum; removing a volume moves only its own replicas; the
batch planner agrees with the scalar one. Example counts are kept small: each example plans
hundreds to thousands of objects.
"""

from __future__ import annotations

import math
import random
from dataclasses import replace

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cim_place.placement.batch import NO_VOLUME, plan_batch
from cim_place.placement.eligibility import Eligibility
from cim_place.placement.model import (
    LabelOp,
    LabelRequirement,
    NodeMap,
    PlacedObject,
    PlacementRule,
    Preference,
    SpreadLevel,
    Volume,
    VolumeState,
    object_key,
)
from cim_place.placement.planner import plan

TIB = 2**40
TAGS = ("ssd", "hdd", "fast")
FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SLOW = settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def obj(i: int, size: int = 4096) -> PlacedObject:
    return PlacedObject(cid=b"\x01\x55\x12\x20" + i.to_bytes(32, "big"), size=size)


@st.composite
def topologies(draw: st.DrawFn, *, with_states: bool = True) -> list[Volume]:
    """Regions > zones > hosts > volumes, random shape, capacities, tags and states."""
    volumes = []
    for r in range(draw(st.integers(1, 3))):
        for z in range(draw(st.integers(1, 3))):
            for h in range(draw(st.integers(1, 3))):
                for k in range(draw(st.integers(1, 2))):
                    volumes.append(
                        Volume(
                            node=f"n{r}{z}{h}",
                            name=f"v{k}",
                            capacity=TIB * draw(st.sampled_from((1, 2, 4))),
                            free=TIB // 2,
                            labels={"region": f"r{r}", "zone": f"z{z}", "rack": str(h % 2)},
                            tags=frozenset(draw(st.sets(st.sampled_from(TAGS), max_size=2))),
                            state=draw(
                                st.sampled_from(
                                    (VolumeState.UP,) * 6 + (VolumeState.DOWN, VolumeState.DRAINING)
                                    if with_states
                                    else (VolumeState.UP,)
                                )
                            ),
                        )
                    )
    return volumes


@st.composite
def rules(draw: st.DrawFn, *, constrained: bool = True) -> PlacementRule:
    requirements: tuple[LabelRequirement, ...] = ()
    required: frozenset[str] = frozenset()
    excluded: frozenset[str] = frozenset()
    if constrained:
        required = frozenset(draw(st.sets(st.sampled_from(TAGS), max_size=1)))
        if draw(st.booleans()):
            op = draw(st.sampled_from(LabelOp))
            requirements = (LabelRequirement("rack", op, frozenset({"0"})),)
        excluded = frozenset(draw(st.sets(st.sampled_from(("n000", "n010", "n100")))))
    return PlacementRule(
        replicas=draw(st.integers(1, 5)),
        spread=draw(st.sampled_from(SpreadLevel)),
        max_per_domain=draw(st.one_of(st.none(), st.integers(1, 2))) if constrained else None,
        required_tags=required,
        requirements=requirements,
        excluded_nodes=excluded,
        preferences=tuple(
            Preference(draw(st.sampled_from((0.5, 2.0, 10.0))), tag=t)
            for t in draw(st.sets(st.sampled_from(TAGS), max_size=2))
        ),
        load_cap=None,
    )


def _allowed(v: Volume, rule: PlacementRule) -> bool:
    return (
        v.state is VolumeState.UP
        and rule.required_tags <= v.tags
        and all(r.matches(v) for r in rule.requirements)
        and v.node not in rule.excluded_nodes
    )


@FAST
@given(topologies(), rules(), st.integers(0, 2**32), st.randoms(use_true_random=False))
def test_deterministic_whatever_the_order(
    vols: list[Volume], rule: PlacementRule, i: int, rnd: random.Random
) -> None:
    shuffled = list(vols)
    rnd.shuffle(shuffled)
    reordered = replace(
        rule, preferences=rule.preferences[::-1], requirements=rule.requirements[::-1]
    )
    current = {v.id for v in rnd.sample(vols, min(2, len(vols)))}
    a = plan(obj(i), rule, NodeMap(vols), current)
    b = plan(obj(i), reordered, NodeMap(shuffled), set(reversed(sorted(current))))
    assert a == b
    assert plan(obj(i), rule, NodeMap(vols), current) == a


@FAST
@given(topologies(), rules(), st.integers(0, 2**32), st.randoms(use_true_random=False))
def test_hard_constraints_hold_and_no_volume_twice(
    vols: list[Volume], rule: PlacementRule, i: int, rnd: random.Random
) -> None:
    nm = NodeMap(vols)
    current = {v.id for v in rnd.sample(vols, min(3, len(vols)))}
    cur: set[str]
    for cur in (set(), current):
        p = plan(obj(i), rule, nm, cur)
        assert len(set(p.desired)) == len(p.desired)
        assert len(p.desired) <= rule.replicas
        chosen = [nm.get(v) for v in p.desired]
        assert all(v is not None and _allowed(v, rule) for v in chosen)
        if rule.max_per_domain is not None:
            domains = [v.domain(rule.spread) for v in chosen if v is not None]
            assert all(domains.count(d) <= rule.max_per_domain for d in domains)
        assert {r.volume for r in p.reasons} == {v.id for v in vols}
        assert bool(p.degraded) == (len(p.desired) < rule.replicas)


@FAST
@given(topologies(), rules(constrained=False), st.integers(0, 2**32))
def test_spread_is_maximal(vols: list[Volume], rule: PlacementRule, i: int) -> None:
    nm = NodeMap(vols)
    p = plan(obj(i), rule, nm)
    eligible = [v for v in vols if _allowed(v, rule)]
    # As many copies as possible, and as far apart as possible at every level.
    assert len(p.desired) == min(rule.replicas, len(eligible))
    chosen = [nm.get(v) for v in p.desired]
    for level in SpreadLevel:
        if level < rule.spread:
            continue
        used = {v.domain(level) for v in chosen if v is not None}
        available = {v.domain(level) for v in eligible}
        assert len(used) == min(len(p.desired), len(available))
        if level == rule.spread:
            assert len(used) == min(rule.replicas, len(available))


@st.composite
def equal_volumes(draw: st.DrawFn) -> tuple[list[Volume], PlacementRule]:
    n = draw(st.integers(4, 30))
    replicas = draw(st.integers(1, min(3, n - 1)))
    vols = [
        Volume(node=f"n{k:02d}", name="v0", capacity=TIB, free=TIB, labels={"zone": f"z{k}"})
        for k in range(n)
    ]
    spread = draw(st.sampled_from((SpreadLevel.ZONE, SpreadLevel.VOLUME)))
    return vols, PlacementRule(replicas=replicas, spread=spread)


OBJECTS = 2000


def _plan_all(
    rule: PlacementRule, vols: list[Volume], current: list[tuple[str, ...]] | None = None
) -> list[tuple[str, ...]]:
    nm = NodeMap(vols)
    el = Eligibility.of(rule, nm)
    return [
        plan(obj(i), rule, nm, current[i] if current else (), eligibility=el).desired
        for i in range(OBJECTS)
    ]


@SLOW
@given(equal_volumes())
def test_adding_a_volume_moves_close_to_the_optimum(
    case: tuple[list[Volume], PlacementRule],
) -> None:
    vols, rule = case
    n, r = len(vols), rule.replicas
    before = _plan_all(rule, vols)
    new = Volume(node="new", name="v0", capacity=TIB, free=TIB, labels={"zone": "znew"})
    after = _plan_all(rule, [*vols, new])
    moved = 0
    for b, a in zip(before, after, strict=True):
        gone = set(b) - set(a)
        moved += len(gone)
        # Every moved replica lands on the new volume: nothing shuffles between old ones.
        assert set(a) - set(b) <= {new.id}
    optimum = 1 / (n + 1)
    # The new volume holds a replica of an object with probability q = r/(n+1), independently
    # per object, so the moved fraction has standard deviation sqrt(q(1-q)/N)/r; four of them
    # is the statistical slack (a false alarm once in ~30000 examples).
    q = r / (n + 1)
    slack = 4 * math.sqrt(q * (1 - q) / OBJECTS) / r
    fraction = moved / (OBJECTS * r)
    assert fraction <= 1.1 * optimum + slack, (fraction, optimum, slack)


@SLOW
@given(topologies(with_states=False), rules(constrained=False), st.data())
def test_removing_a_volume_moves_only_its_replicas(
    vols: list[Volume], rule: PlacementRule, data: st.DataObject
) -> None:
    gone = data.draw(st.sampled_from(vols)).id
    rest = [v for v in vols if v.id != gone]
    count = 300
    nm, nm_rest = NodeMap(vols), NodeMap(rest)
    el, el_rest = Eligibility.of(rule, nm), Eligibility.of(rule, nm_rest)
    for i in range(count):
        before = plan(obj(i), rule, nm, eligibility=el).desired
        ideal = plan(obj(i), rule, nm_rest, eligibility=el_rest).desired
        repaired = plan(obj(i), rule, nm_rest, before, eligibility=el_rest).desired
        for after in (ideal, repaired):
            # The balanced ideal and the repair plan both keep every other replica.
            assert set(before) - {gone} <= set(after)


@FAST
@given(topologies(), rules(), st.lists(st.integers(1, 10**6), min_size=1, max_size=60))
def test_batch_planner_equals_scalar(
    vols: list[Volume], rule: PlacementRule, sizes: list[int]
) -> None:
    nm = NodeMap(vols)
    keys = np.array([object_key(obj(i).cid) for i in range(len(sizes))], dtype=np.uint64)
    capped = replace(rule, load_cap=0.1)
    for r in (rule, capped):
        table = plan_batch(keys, np.array(sizes, dtype=np.int64), r, nm, batch_rows=16)
        for k, size in enumerate(sizes):
            want = plan(obj(k, size), r, nm, keep_current=False).desired
            got = tuple(nm.volumes[j].id for j in table[k].tolist() if j != NO_VOLUME)
            assert got == want


@FAST
@given(
    topologies(),
    rules(),
    st.integers(0, 2**32),
    st.randoms(use_true_random=False),
    st.booleans(),
)
def test_copies_in_place_are_planned_as_the_full_walk_plans_them(
    vols: list[Volume], rule: PlacementRule, i: int, rnd: random.Random, capped: bool
) -> None:
    """A plan without reasons ranks only the copies in place when they fill the widest spread
    level; it must choose what the full walk (the plan with reasons) chooses, in its order."""
    if capped:
        rule = replace(rule, load_cap=0.1)
    nm = NodeMap(vols)
    el = Eligibility.of(rule, nm)
    others = [v for v in vols if v.id not in el.position]
    for _ in range(5):
        chosen = rnd.sample(el.eligible, min(rule.replicas, len(el.eligible)))
        if others and chosen and rnd.random() < 0.3:
            chosen[0] = rnd.choice(others)  # a copy on a volume the rule refuses
        current = {v.id for v in chosen}
        full = plan(obj(i), rule, nm, current, eligibility=el)
        quick = plan(obj(i), rule, nm, current, eligibility=el, explain=False)
        assert (quick.desired, quick.degraded) == (full.desired, full.degraded)


@FAST
@given(topologies(), rules(), st.integers(0, 2**32), st.booleans())
def test_copies_on_the_ideal_volumes_are_kept_there(
    vols: list[Volume], rule: PlacementRule, i: int, capped: bool
) -> None:
    """An object whose copies are exactly on its ideal volumes is planned to stay there: what
    lets a rebalance check skip the second plan (``rebalance_candidates``)."""
    if capped:
        rule = replace(rule, load_cap=0.1)
    nm = NodeMap(vols)
    ideal = plan(obj(i), rule, nm, keep_current=False)
    kept = plan(obj(i), rule, nm, set(ideal.desired))
    assert set(kept.desired) == set(ideal.desired)

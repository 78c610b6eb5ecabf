"""Safety rules of the reconciler, as hypothesis properties over random worlds.

Each world: a few nodes in a few zones (one or two volumes each), every node up, late, down within
the repair grace or down past it, some draining; a random set of confirmed replicas (some on
volumes the node map does not know), random tasks in flight, a random policy. Rules (numbers as
in the reconciler's brief): 1 copy before drop, 2 never below min (nor the last copy), 3 a late
node is not acted on, 4 idempotent, 6 one drop per surplus copy and never one a fetch targets.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace
from typing import Literal

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cim_place.objectstore.cid import RAW, make_cid
from cim_place.placement.model import NodeMap, Volume, VolumeState
from cim_place.placement.reconcile_model import (
    Drop,
    Fetch,
    InFlightTask,
    ObjectInfo,
    ReconcileInput,
    ReconcileResult,
    Replica,
)
from cim_place.placement.reconciler import reconcile
from cim_place.placement.rules import CompiledPolicy, Liveness, NodeLiveness, compile_policy
from cim_place.policies.model import Policy, Repair, Replicas, Spread

KINDS: tuple[Literal["fetch", "drop"], ...] = ("fetch", "drop")
NOW = 100_000.0
GRACE = 900.0
GIB = 1 << 30


@dataclass(frozen=True)
class World:
    inp: ReconcileInput
    lost: frozenset[str]
    """Nodes down past the grace."""
    late: frozenset[str]
    """Nodes late, or down within the grace."""

    def live_tasks(self, kind: str) -> set[Replica]:
        return {
            (t.node, t.volume or "")
            for t in self.inp.in_flight
            if t.kind == kind and t.node not in self.lost
        }

    def pinned_up(self) -> set[Replica]:
        return {r for r in self.inp.confirmed if r[0] not in self.lost and r[0] not in self.late}

    @property
    def expired(self) -> bool:
        after = self.inp.policy.expire_after
        return after is not None and self.inp.now - self.inp.obj.first_seen > after


@st.composite
def worlds(draw: st.DrawFn) -> World:
    n_nodes = draw(st.integers(1, 6))
    volumes: list[Volume] = []
    liveness: dict[str, NodeLiveness] = {}
    lost: set[str] = set()
    late: set[str] = set()
    for i in range(n_nodes):
        node = f"n{i}"
        zone = draw(st.sampled_from(("z1", "z2", "z3")))
        kind = draw(st.sampled_from(("up", "up", "up", "late", "grace", "lost")))
        draining = draw(st.booleans()) and draw(st.booleans())
        state = VolumeState.UP
        if kind == "up":
            liveness[node] = NodeLiveness(Liveness.UP)
        elif kind == "late":
            liveness[node] = NodeLiveness(Liveness.LATE, NOW - 20)
            late.add(node)
        elif kind == "grace":
            liveness[node] = NodeLiveness(Liveness.DOWN, NOW - draw(st.floats(0, GRACE - 1)))
            state = VolumeState.DOWN
            late.add(node)
        else:
            liveness[node] = NodeLiveness(Liveness.DOWN, NOW - GRACE - draw(st.floats(0, 1e4)))
            state = VolumeState.DOWN
            lost.add(node)
        if draining and state is VolumeState.UP:
            state = VolumeState.DRAINING
        for v in range(draw(st.integers(1, 2))):
            free = draw(st.sampled_from((GIB, GIB // 2, 500)))
            volumes.append(
                Volume(
                    node=node,
                    name=f"v{v}",
                    capacity=GIB,
                    free=free,
                    labels={"zone": zone},
                    state=state,
                )
            )
    node_map = NodeMap(volumes)
    places = [(v.node, v.name) for v in volumes] + [("n0", "gone")]
    confirmed = frozenset(draw(st.sets(st.sampled_from(places), max_size=len(places))))
    in_flight = tuple(
        InFlightTask(kind=kind, node=node, volume=volume, since=NOW - 5)
        for kind, (node, volume) in draw(
            st.sets(st.tuples(st.sampled_from(KINDS), st.sampled_from(places)))
        )
    )
    replicas = draw(st.integers(1, 4))
    minimum = draw(st.integers(0, replicas))
    expire = draw(st.sampled_from((None, None, None, 50.0, 1e9)))
    if minimum == 0 and expire is None:
        expire = 1e9
    pol = Policy(
        name="p",
        replicas=Replicas(min=minimum, max=replicas),
        spread=draw(st.sampled_from((Spread("zone", 1), Spread("host", 1), Spread("volume", 1)))),
        repair=Repair(grace_seconds=int(GRACE)),
        expire_after_seconds=None if expire is None else int(expire),
    )
    compiled: CompiledPolicy = compile_policy(pol)
    if draw(st.booleans()):
        # The floor must hold whatever the knobs say, even above the desired count.
        compiled = replace(compiled, min_copies=draw(st.integers(0, 5)))
    inp = ReconcileInput(
        obj=ObjectInfo(
            cid=make_cid(RAW, draw(st.binary(min_size=1, max_size=4))),
            size=1000,
            first_seen=NOW - 100,
        ),
        policy=compiled,
        node_map=node_map,
        confirmed=confirmed,
        liveness=liveness,
        now=NOW,
        in_flight=in_flight,
        rebalance=draw(st.booleans()),
    )
    return World(inp, frozenset(lost), frozenset(late))


SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _drops(result: ReconcileResult) -> list[Replica]:
    return [(a.node, a.volume) for a in result.actions if isinstance(a, Drop)]


def _fetches(result: ReconcileResult) -> list[Replica]:
    return [(a.node, a.volume) for a in result.actions if isinstance(a, Fetch)]


@SETTINGS
@given(worlds())
def test_rule1_copy_before_drop(world: World) -> None:
    result = reconcile(world.inp)
    if world.expired or not _drops(result):
        return
    pinned = world.pinned_up() - world.live_tasks("drop")
    for vid in result.desired:
        node, _, volume = vid.partition("/")
        assert (node, volume) in pinned, f"dropped while desired {vid} is not pinned"
    assert not world.live_tasks("fetch"), "dropped while a fetch is in flight"
    assert not _fetches(result), "dropped in the same pass as a fetch"


@SETTINGS
@given(worlds())
def test_rule2_never_below_min_nor_the_last_copy(world: World) -> None:
    result = reconcile(world.inp)
    drops = _drops(result)
    if world.expired or not drops:
        return
    floor = max(world.inp.policy.min_copies, 1)
    remaining = world.pinned_up() - world.live_tasks("drop") - set(drops)
    assert len(remaining) >= floor


@SETTINGS
@given(worlds())
def test_rule3_late_nodes_are_not_acted_on(world: World) -> None:
    result = reconcile(world.inp)
    if world.expired:
        return
    for action in result.actions:
        assert action.node not in world.late, f"{action} acts on a late node"
        assert action.node not in world.lost, f"{action} acts on a lost node"
    for node, volume in world.inp.confirmed:
        if node in world.late:
            states = {(loc.node, loc.volume, loc.state) for loc in result.status.locations}
            assert (node, volume, "late") in states or (node, volume, "dropping") in states


@SETTINGS
@given(worlds())
def test_rule4_idempotent_with_own_tasks_in_flight(world: World) -> None:
    first = reconcile(world.inp)
    flying = tuple(world.inp.in_flight) + tuple(
        InFlightTask(kind=a.kind, node=a.node, volume=a.volume, since=NOW, generation=a.generation)
        for a in first.actions
    )
    second = reconcile(replace(world.inp, in_flight=flying))
    assert second.actions == (), f"first {first.actions}, then {second.actions}"
    # Deterministic: the same input gives the same result.
    assert reconcile(world.inp) == first


@SETTINGS
@given(worlds())
def test_rule6_one_drop_per_surplus_copy_never_a_fetch_target(world: World) -> None:
    result = reconcile(world.inp)
    drops = _drops(result)
    assert len(drops) == len(set(drops))
    assert set(drops) <= set(world.inp.confirmed)
    assert not set(drops) & world.live_tasks("drop")
    assert not set(drops) & world.live_tasks("fetch")
    assert not set(drops) & set(_fetches(result))
    fetches = _fetches(result)
    assert len(fetches) == len(set(fetches))
    assert not set(fetches) & (world.live_tasks("fetch") | world.live_tasks("drop"))
    if not world.expired:
        desired = {tuple(v.split("/", 1)) for v in result.desired}
        assert not set(drops) & desired, "dropped a desired copy"


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(worlds(), st.randoms(use_true_random=False))
def test_convergence_never_loses_the_last_copy(world: World, rnd: random.Random) -> None:
    """Run the loop: tasks complete in random order; copies never fall below the floor once
    above it, and the object settles (no actions, nothing in flight) with drained volumes empty
    whenever the planner can place every replica."""
    if world.expired:
        return
    inp = replace(world.inp, in_flight=(), rebalance=False)
    confirmed = set(inp.confirmed)
    flying: list[InFlightTask] = []
    floor = max(inp.policy.min_copies, 1)
    for _ in range(40):
        result = reconcile(replace(inp, confirmed=frozenset(confirmed), in_flight=tuple(flying)))
        flying += [
            InFlightTask(kind=a.kind, node=a.node, volume=a.volume, since=NOW)
            for a in result.actions
        ]
        if not flying:
            break
        before = len({r for r in confirmed if r[0] not in world.lost | world.late})
        done = rnd.sample(flying, rnd.randint(1, len(flying)))
        for task in done:
            flying.remove(task)
            place = (task.node, task.volume or "")
            if task.kind == "fetch":
                confirmed.add(place)
            else:
                confirmed.discard(place)
        after = len({r for r in confirmed if r[0] not in world.lost | world.late})
        assert after >= min(before, floor), "a drop went below the floor"
    else:
        raise AssertionError("did not settle in 40 rounds")
    final = reconcile(replace(inp, confirmed=frozenset(confirmed)))
    up = {r for r in confirmed if r[0] not in world.lost | world.late}
    draining = {(v.node, v.name) for v in inp.node_map.volumes if v.state is VolumeState.DRAINING}
    settled = all(tuple(v.split("/", 1)) in up for v in final.desired)
    full = len(final.desired) == inp.policy.rule.replicas
    if full and settled and len(up - draining) >= floor:
        assert not up & draining, "a drained volume still holds a copy"

"""Damaged replicas in the reconciler, as hypothesis properties over the random worlds of
test_reconciler_properties plus a random set of damaged replicas (and repairs in flight).

With any damage: a damaged replica is never counted (never ``pinned`` in the status, never a
holder), damage never makes the reconciler drop a copy it would not drop without it (so a
verified copy is never dropped because of damage elsewhere), the verified copies left after
drops stay at the floor, a damaged replica on an up node is repaired when a verified copy
exists elsewhere, and the object is ``lost`` exactly when no verified copy is present.
"""

from __future__ import annotations

from dataclasses import replace

from hypothesis import given
from hypothesis import strategies as st
from test_reconciler_properties import SETTINGS, World, worlds

from cim_place.placement.reconcile_model import Drop, InFlightTask, Repair, Replica
from cim_place.placement.reconciler import reconcile

NOW = 100_000.0


@st.composite
def damaged_worlds(draw: st.DrawFn) -> tuple[World, frozenset[Replica]]:
    world = draw(worlds())
    confirmed = sorted(world.inp.confirmed)
    damaged = frozenset(draw(st.sets(st.sampled_from(confirmed)))) if confirmed else frozenset()
    repairing = draw(st.sets(st.sampled_from(sorted(damaged)))) if damaged else set()
    in_flight = tuple(world.inp.in_flight) + tuple(
        InFlightTask(kind="repair", node=node, volume=volume, since=NOW - 5)
        for node, volume in sorted(repairing)
    )
    return replace(world, inp=replace(world.inp, in_flight=in_flight)), damaged


def verified(world: World, damaged: frozenset[Replica]) -> set[Replica]:
    return {r for r in world.inp.confirmed if r not in damaged and r[0] not in world.lost}


@SETTINGS
@given(damaged_worlds())
def test_a_damaged_replica_is_never_counted_nor_a_holder(case: tuple[World, frozenset]) -> None:  # type: ignore[type-arg]
    world, damaged = case
    result = reconcile(replace(world.inp, damaged=damaged))
    states = {(loc.node, loc.volume): loc.state for loc in result.status.locations}
    for replica in damaged:
        if replica[0] not in world.lost:
            assert states[replica] in ("damaged", "repairing", "dropping"), states[replica]
    good_nodes = {node for node, _ in verified(world, damaged)}
    for action in result.actions:
        for holder in getattr(action, "holders", ()):
            assert holder in good_nodes, f"{action} names {holder}, which has no verified copy"


@SETTINGS
@given(damaged_worlds())
def test_damage_never_causes_a_drop(case: tuple[World, frozenset]) -> None:  # type: ignore[type-arg]
    world, damaged = case
    with_damage = reconcile(replace(world.inp, damaged=damaged))
    without = reconcile(world.inp)
    drops = {(a.node, a.volume) for a in with_damage.actions if isinstance(a, Drop)}
    assert drops <= {(a.node, a.volume) for a in without.actions if isinstance(a, Drop)}
    if world.expired or not drops:
        return
    assert not drops & damaged, "a damaged replica was dropped as surplus"
    floor = max(world.inp.policy.min_copies, 1)
    up = verified(world, damaged) - world.late
    remaining = {r for r in up if r[0] not in world.late} - world.live_tasks("drop") - drops
    assert len(remaining) >= floor


@SETTINGS
@given(damaged_worlds())
def test_lost_exactly_when_no_verified_copy_and_repairs_are_issued(
    case: tuple[World, frozenset],  # type: ignore[type-arg]
) -> None:
    world, damaged = case
    if world.expired:
        return
    result = reconcile(replace(world.inp, damaged=damaged))
    good = verified(world, damaged)
    assert (result.status.state == "lost") == (not good)
    repairs = {(a.node, a.volume) for a in result.actions if isinstance(a, Repair)}
    repairing = world.live_tasks("repair")
    for replica in damaged:
        node = replica[0]
        if node in world.lost or node in world.late or replica in repairing:
            assert replica not in repairs
            continue
        others = {n for n, _ in good if n != node}
        if others and not any(f.kind == "repair" for f in world.inp.failed):
            assert replica in repairs, f"no repair for damaged {replica}"
        if not good:
            assert replica not in repairs

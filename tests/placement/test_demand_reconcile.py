"""Cached copies and the reconciler: reconciling on the required input gives exactly the result
that the object would have without demand, and the status lists the cached copies beside it."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cim_place.placement.demand_cache import CachedCopy
from cim_place.placement.demand_reconcile import required_input, with_cached
from cim_place.placement.model import NodeMap, Volume
from cim_place.placement.reconcile_model import FailedTask, InFlightTask, ObjectInfo, ReconcileInput
from cim_place.placement.reconciler import reconcile
from cim_place.placement.rules import Liveness, NodeLiveness, compile_policy
from cim_place.policies.model import Policy, Replicas, Spread

GIB = 2**30
NOW = 10_000.0
CID = b"\x01\x55\x12\x20" + bytes(31) + b"\x07"


def replica(volume_id: str) -> tuple[str, str]:
    node, volume = volume_id.split("/")
    return (node, volume)


def domain(zones: int, per_zone: int) -> NodeMap:
    return NodeMap(
        Volume(
            node=f"n{z}-{h}",
            name="v",
            capacity=100 * GIB,
            free=50 * GIB,
            labels={"region": "eu", "zone": f"z{z}"},
        )
        for z in range(zones)
        for h in range(per_zone)
    )


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    zones=st.integers(2, 5),
    per_zone=st.integers(1, 3),
    replicas=st.integers(1, 3),
    min_copies=st.integers(1, 3),
    picks=st.lists(st.integers(0, 30), max_size=6),
    placed=st.booleans(),
)
def test_reconciling_the_required_input_ignores_cached_copies(
    zones: int, per_zone: int, replicas: int, min_copies: int, picks: list[int], placed: bool
) -> None:
    nm = domain(zones, per_zone)
    policy = compile_policy(
        Policy(
            name="p",
            replicas=Replicas(min=min(min_copies, replicas), max=replicas),
            spread=Spread("zone", 1),
        )
    )
    obj = ObjectInfo(cid=CID, size=GIB, first_seen=0.0)
    liveness = {v.node: NodeLiveness(Liveness.UP) for v in nm.volumes}

    def inp(
        confirmed: list[tuple[str, str]],
        in_flight: list[InFlightTask] | None = None,
        failed: list[FailedTask] | None = None,
    ) -> ReconcileInput:
        return ReconcileInput(
            obj=obj,
            policy=policy,
            node_map=nm,
            confirmed=confirmed,
            liveness=liveness,
            now=NOW,
            in_flight=in_flight or [],
            failed=failed or [],
        )

    # The object as demand found it: placed on its desired volumes, or on the first of them.
    desired = reconcile(inp([])).desired
    required = [replica(v) for v in (desired if placed else desired[:1])]
    others = [v.id for v in nm.volumes if v.id not in desired]
    if not others:
        return
    cached_ids = sorted({others[i % len(others)] for i in picks})
    copies = [CachedCopy(CID, v, GIB, NOW - 60, "6 reads in 10m from x") for v in cached_ids]
    fill = others[-1]  # a demand fetch in flight, and an earlier one that failed
    node = fill.split("/")[0]
    in_flight = [InFlightTask(kind="fetch", node=node, volume="v", since=NOW)]
    failed = [FailedTask(kind="fetch", node=node, volume="v", generation=1, failed_at=0.0)]
    with_copies = [*required, *(replica(v) for v in cached_ids)]
    without = reconcile(inp(required))
    everything = inp(with_copies, in_flight, failed)
    result = reconcile(required_input(everything, {*cached_ids, fill}))
    assert result.actions == without.actions
    assert result.desired == without.desired
    assert result.status == without.status
    assert not {f"{a.node}/{a.volume}" for a in result.actions} & set(cached_ids)

    shown = with_cached(result, copies, nm)
    assert shown.status.state == without.status.state
    assert shown.status.pinned == without.status.pinned
    assert [loc.state for loc in shown.status.locations].count("cached") == len(cached_ids)

    if placed and cached_ids and len(desired) >= policy.min_copies:
        # Why the split is needed: on the raw input the cached copies are surplus, dropped
        # (unless the policy cannot place its minimum: then no copy is dropped at all).
        naive = reconcile(inp(with_copies))
        assert {f"{d.node}/{d.volume}" for d in naive.drops} == set(cached_ids)

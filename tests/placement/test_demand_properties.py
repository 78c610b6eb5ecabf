"""Properties of demand-driven copies over generated read traces (hypothesis).

Two worlds run side by side on the same topology and the same node failures: one without demand,
one with the recorder, the window and :func:`decide` in the loop, its cached copies among the
object's holdings. For any trace: the planner's required output is identical in both worlds (so
``min`` and the required copies are never affected), no decision adds a copy on a required volume
or drops a required copy (its own or, by eviction, another object's), at most ``max_extra`` cached
copies exist per object, and no node spends more than its budget.
"""

from __future__ import annotations

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from cim_place.placement.demand import CacheLedger, DemandRule, decide, required_current
from cim_place.placement.demand_window import DemandWindow, ReadRecorder
from cim_place.placement.eligibility import Eligibility
from cim_place.placement.model import (
    NodeMap,
    PlacedObject,
    PlacementRule,
    SpreadLevel,
    Volume,
    VolumeId,
    VolumeState,
)
from cim_place.placement.planner import plan

GIB = 2**30
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def cid(i: int) -> bytes:
    return b"\x01\x55\x12\x20" + i.to_bytes(32, "big")


@st.composite
def topologies(draw: st.DrawFn) -> list[Volume]:
    volumes = []
    for z in range(draw(st.integers(1, 4))):
        for n in range(draw(st.integers(1, 3))):
            for k in range(draw(st.integers(1, 2))):
                volumes.append(
                    Volume(
                        node=f"n{z}-{n}",
                        name=f"v{k}",
                        capacity=draw(st.sampled_from([10, 20, 40])) * GIB,
                        free=draw(st.integers(0, 10)) * GIB,
                        labels={"region": "r", "zone": f"z{z}"},
                    )
                )
    return volumes


@st.composite
def demand_rules(draw: st.DrawFn) -> DemandRule:
    window = float(draw(st.sampled_from([30, 60, 300])))
    return DemandRule(
        follow=draw(st.sampled_from(["readers", "zone"])),
        min_reads=draw(st.integers(1, 6)),
        window=window,
        max_extra=draw(st.integers(1, 3)),
        keep=window * draw(st.integers(1, 4)),
        budget_fraction=draw(st.sampled_from([0.02, 0.05, 0.2, 1.0])),
    )


# A read: (object, reading node index, seconds since the previous read, service index). Few
# objects and nodes, reads close together: demand builds up, copies are added, evicted, kept.
reads_st = st.lists(
    st.tuples(st.integers(0, 7), st.integers(0, 7), st.integers(0, 12), st.integers(0, 2)),
    min_size=20,
    max_size=150,
)


@SETTINGS
@given(
    topology=topologies(),
    replicas=st.integers(1, 3),
    min_copies=st.integers(0, 3),
    demand=demand_rules(),
    trace=reads_st,
    sizes=st.lists(st.integers(1, 4), min_size=8, max_size=8),
    failures=st.lists(st.tuples(st.integers(0, 60), st.integers(0, 20)), max_size=3),
)
def test_demand_never_affects_required_copies(
    topology: list[Volume],
    replicas: int,
    min_copies: int,
    demand: DemandRule,
    trace: list[tuple[int, int, int, int]],
    sizes: list[int],
    failures: list[tuple[int, int]],
) -> None:
    rule = PlacementRule(replicas=replicas, min=min(min_copies, replicas), spread=SpreadLevel.ZONE)
    node_map = NodeMap(topology)
    nodes = sorted({v.node for v in topology})
    objects = [PlacedObject(cid(i), sizes[i] * GIB // 2) for i in range(8)]
    plain: dict[int, tuple[VolumeId, ...]] = {}
    with_demand: dict[int, tuple[VolumeId, ...]] = {}
    ledger = CacheLedger()
    window = DemandWindow(horizon=300, slot=10)
    recorder = ReadRecorder(reporter="agent", start=0.0, interval=5.0)
    capacity = {n: sum(v.capacity for v in topology if v.node == n) for n in nodes}

    def replan() -> None:
        el = Eligibility.of(rule, node_map)
        for i, obj in enumerate(objects):
            plain[i] = plan(obj, rule, node_map, plain.get(i, ()), eligibility=el).desired
            cached = {c.volume for c in ledger.of_object(obj.cid)}
            holdings = [*with_demand.get(i, ()), *cached]
            current = required_current(holdings, cached)
            with_demand[i] = plan(obj, rule, node_map, current, eligibility=el).desired
            assert set(with_demand[i]) == set(plain[i])  # the same copies, in any order

    replan()
    now = 0.0
    for step, (obj_i, node_i, dt, service) in enumerate(trace):
        now += dt
        for _, failing in [f for f in failures if f[0] == step]:
            down = nodes[failing % len(nodes)]
            node_map = NodeMap(
                Volume(
                    node=v.node,
                    name=v.name,
                    capacity=v.capacity,
                    free=v.free,
                    labels=v.labels,
                    state=VolumeState.DOWN if v.node == down else v.state,
                )
                for v in node_map.volumes
            )
            replan()
        recorder.record_read(cid(obj_i), nodes[node_i % len(nodes)], f"s{service}", now, 1)
        for report in recorder.flush(now):
            window.add(report)
        replan()
        el = Eligibility.of(rule, node_map)
        required_of = {objects[i].cid: set(with_demand[i]) for i in range(8)}
        for i, obj in enumerate(objects):
            decision = decide(
                cid=obj.cid,
                size=obj.size,
                rule=demand,
                placement_rule=rule,
                node_map=node_map,
                required=with_demand[i],
                reads=window.by_node(obj.cid, now, demand.window),
                ledger=ledger,
                now=now,
                eligibility=el,
            )
            assert not {a.volume for a in decision.add} & required_of[obj.cid]
            for drop in decision.drop:
                assert drop.volume not in required_of[drop.cid]
            if decision.add:
                event("a cached copy was added")
            if any(d.reason.startswith("evicted") for d in decision.drop):
                event("a cached copy was evicted")
            if decision.adopted:
                event("a cached copy was adopted")
            ledger.apply(decision)
            again = decide(
                cid=obj.cid,
                size=obj.size,
                rule=demand,
                placement_rule=rule,
                node_map=node_map,
                required=with_demand[i],
                reads=window.by_node(obj.cid, now, demand.window),
                ledger=ledger,
                now=now,
                eligibility=el,
            )
            assert (again.add, again.drop, again.adopted) == ((), (), ())  # idempotent
            own = ledger.of_object(obj.cid)
            assert len(own) <= demand.max_extra
            assert not {c.volume for c in own} & required_of[obj.cid]
            for copy in own:
                assert node_map.get(copy.volume) is not None
        for node in nodes:
            assert ledger.used(node) <= demand.budget(capacity[node])
    replan()


@settings(max_examples=80, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 3), st.integers(0, 3), st.integers(1, 5), st.integers(0, 90)),
        max_size=60,
    )
)
def test_window_running_totals_equal_the_slot_sums(
    reads: list[tuple[int, int, int, int]],
) -> None:
    window = DemandWindow(horizon=120, slot=20)
    now = 0.0
    for obj, node, count, dt in reads:
        now += dt
        recorder = ReadRecorder(reporter="a", start=now - 5)
        for _ in range(count):
            recorder.record_read(cid(obj), f"n{node}", "", now - 1, 10)
        window.add(recorder.flush(now)[0])
        for i in range(4):
            fast = window.by_node(cid(i), now, 120)
            # A window just under the horizon covers the same whole slots, the slow way.
            assert fast == window.by_node(cid(i), now, 119.5)
            assert window.busiest_node_reads(cid(i)) == max(
                (r.count for r in fast.values()), default=0
            )

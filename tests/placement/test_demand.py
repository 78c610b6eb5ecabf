"""Demand-driven copies: the agent's recorder, the controller's window, and the decision."""

from __future__ import annotations

import pytest

from cim_place.errors import PlacementError
from cim_place.placement.demand import (
    CachedCopy,
    CacheLedger,
    DemandDecision,
    DemandRule,
    cached_locations,
    decide,
    describe,
    locate_consumers,
    node_zones,
    required_current,
)
from cim_place.placement.demand_window import DemandReport, DemandWindow, ReadRecorder, Reads
from cim_place.placement.model import NodeMap, PlacedObject, PlacementRule, Volume, VolumeState
from cim_place.placement.planner import plan
from cim_place.placement.status import Location, ObjectStatus
from cim_place.policies.model import Consumer, Demand

GIB = 2**30


def cid(i: int) -> bytes:
    return b"\x01\x55\x12\x20" + i.to_bytes(32, "big")


def domain(states: dict[str, VolumeState] | None = None) -> NodeMap:
    """leaf-1..6 in zones z1 (1, 2), z2 (3, 4), z3 (5, 6): one 100 GiB volume each."""
    states = states or {}
    return NodeMap(
        Volume(
            node=f"leaf-{i}",
            name="v0",
            capacity=100 * GIB,
            free=50 * GIB,
            labels={"region": "eu", "zone": f"z{(i + 1) // 2}"},
            state=states.get(f"leaf-{i}", VolumeState.UP),
        )
        for i in range(1, 7)
    )


RULE = PlacementRule(replicas=2, min=2)
REQUIRED = ("leaf-1/v0", "leaf-3/v0")


def run(
    reads: dict[str, Reads],
    ledger: CacheLedger | None = None,
    *,
    rule: DemandRule | None = None,
    now: float = 1000.0,
    node_map: NodeMap | None = None,
    obj: int = 1,
    size: int = GIB,
) -> tuple[CacheLedger, DemandDecision]:
    ledger = ledger if ledger is not None else CacheLedger()
    decision = decide(
        cid=cid(obj),
        size=size,
        rule=rule or DemandRule(min_reads=5, max_extra=2, keep=3600),
        placement_rule=RULE,
        node_map=node_map or domain(),
        required=REQUIRED,
        reads=reads,
        ledger=ledger,
        now=now,
    )
    ledger.apply(decision)
    return ledger, decision


# -- the recorder ---------------------------------------------------------------------------


def test_recorder_reports_window_counts_at_a_bounded_rate() -> None:
    rec = ReadRecorder(reporter="leaf-5", start=0.0, interval=5.0)
    for t in range(100):
        rec.record_read(cid(1), "leaf-5", "shop", t * 0.01, size=10)
    rec.record_read(cid(2), "leaf-6", "", 0.5)
    assert rec.flush(4.9) == []  # not due: never one report per read
    reports = rec.flush(5.0)
    assert len(reports) == 1
    report = reports[0]
    assert (report.reporter, report.start, report.end) == ("leaf-5", 0.0, 5.0)
    by_cid = {c.cid: c for c in report.counts}
    assert (by_cid[cid(1)].reads, by_cid[cid(1)].bytes) == (100, 1000)
    assert by_cid[cid(1)].last_read == pytest.approx(0.99)
    assert (by_cid[cid(2)].node, by_cid[cid(2)].service) == ("leaf-6", "")
    assert rec.flush(20.0) == []  # nothing read since
    assert DemandReport.from_dict(report.to_dict()) == report


def test_recorder_memory_is_bounded_and_overflow_is_counted() -> None:
    rec = ReadRecorder(reporter="n", start=0.0, max_entries=3, max_counts_per_report=2)
    for i in range(10):
        rec.record_read(cid(i), "n", "", 1.0)
    rec.record_read(cid(0), "n", "", 2.0)  # a known key still counts
    assert len(rec) == 3
    reports = rec.flush(10.0)
    assert [len(r.counts) for r in reports] == [2, 1]
    assert [r.dropped_reads for r in reports] == [7, 0]
    assert sum(c.reads for r in reports for c in r.counts) == 4


def test_malformed_reports_are_refused() -> None:
    for bad in (None, {}, {"reporter": "n", "start": 2, "end": 1, "counts": []}):
        with pytest.raises(PlacementError):
            DemandReport.from_dict(bad)
    bad_count = {"reporter": "n", "start": 0, "end": 1, "counts": [[cid(1), "n", "", 0, 0, 0]]}
    with pytest.raises(PlacementError):
        DemandReport.from_dict(bad_count)


# -- the window -----------------------------------------------------------------------------


def report(end: float, *counts: tuple[int, str, str, int]) -> DemandReport:
    rec = ReadRecorder(reporter="x", start=end - 5)
    for obj, node, service, n in counts:
        for _ in range(n):
            rec.record_read(cid(obj), node, service, end - 1, size=100)
    return rec.flush(end)[0]


def test_window_counts_per_node_zone_and_service() -> None:
    w = DemandWindow(horizon=600, slot=60)
    w.add(report(100, (1, "leaf-5", "shop", 3), (1, "leaf-6", "blog", 2), (2, "leaf-5", "shop", 1)))
    w.add(report(200, (1, "leaf-5", "shop", 4)))
    assert w.by_node(cid(1), 200, 600) == {
        "leaf-5": Reads(7, 700, 199),
        "leaf-6": Reads(2, 200, 99),
    }
    assert w.by_zone(cid(1), 200, 600, node_zones(domain())) == {"eu/z3": Reads(9, 900, 199)}
    assert w.by_object_service(cid(1), 200, 600)["shop"].count == 7
    assert w.service_nodes("shop", 200, 600) == {"leaf-5": 8}
    assert w.objects(200, 600) == {cid(1), cid(2)}
    # A shorter window sees only the recent slots.
    assert w.by_node(cid(1), 200, 60) == {"leaf-5": Reads(4, 400, 199)}


def test_window_forgets_past_the_horizon_and_bounds_memory() -> None:
    w = DemandWindow(horizon=120, slot=60, max_keys=2)
    w.add(report(30, (1, "a", "", 1), (2, "a", "", 1), (3, "a", "", 5)))
    assert len(w) == 2 and w.dropped == 5
    w.add(report(400, (4, "a", "", 1)))
    assert len(w) == 1
    assert w.by_node(cid(1), 400, 120) == {}
    w.add(report(30, (1, "a", "", 1)))  # older than the horizon: ignored
    assert w.by_node(cid(1), 400, 600) == {}


# -- the decision ---------------------------------------------------------------------------


def test_a_hot_node_without_a_copy_gains_one_and_loses_it_after_keep() -> None:
    ledger, d = run({"leaf-5": Reads(5, 5, 990.0), "leaf-6": Reads(4, 4, 995.0)})
    assert [(a.volume, a.reads) for a in d.add] == [("leaf-5/v0", 5)]
    assert d.add[0].cause == "5 reads in 10m from leaf-5"
    assert [c.volume for c in ledger.of_object(cid(1))] == ["leaf-5/v0"]
    # Read again later: kept, last read moved.
    ledger, d = run({"leaf-5": Reads(1, 1, 3000.0)}, ledger, now=3000.0)
    assert d.drop == () and ledger.of_object(cid(1))[0].last_read == 3000.0
    # No reads for keep (1h): dropped.
    ledger, d = run({}, ledger, now=3000.0 + 3600)
    assert [(x.volume, x.reason) for x in d.drop] == [("leaf-5/v0", "no reads for 1h")]
    assert len(ledger) == 0


def test_nodes_with_a_required_copy_and_cold_nodes_gain_nothing() -> None:
    _, d = run({"leaf-1": Reads(50, 0, 999.0), "leaf-2": Reads(4, 0, 999.0)})
    assert d.add == ()


def test_at_most_max_extra_copies_busiest_first() -> None:
    reads = {
        "leaf-2": Reads(6, 0, 990.0),
        "leaf-4": Reads(9, 0, 990.0),
        "leaf-5": Reads(7, 0, 990.0),
        "leaf-6": Reads(7, 0, 991.0),
    }
    ledger, d = run(reads)
    assert [a.volume for a in d.add] == ["leaf-4/v0", "leaf-6/v0"]
    assert len(d.skipped) == 2
    # A policy change to max_extra 1 drops the least recently read.
    ledger.put(CachedCopy(cid(1), "leaf-4/v0", GIB, 900.0))
    _, d = run({}, ledger, rule=DemandRule(min_reads=5, max_extra=1, keep=3600))
    assert [x.volume for x in d.drop] == ["leaf-4/v0"]


def test_follow_zone_adds_one_copy_per_zone_on_the_busiest_node() -> None:
    rule = DemandRule(follow="zone", min_reads=5, max_extra=2)
    # Zone z3 (leaf-5, leaf-6) reads 3 + 4: enough together; z1 and z2 hold required copies.
    _, d = run(
        {"leaf-5": Reads(3, 0, 990.0), "leaf-6": Reads(4, 0, 990.0), "leaf-2": Reads(9, 0, 1.0)},
        rule=rule,
    )
    assert [(a.volume, a.locus, a.reads) for a in d.add] == [("leaf-6/v0", "eu/z3", 7)]


def test_constraints_and_room_are_respected() -> None:
    nm = domain({"leaf-5": VolumeState.DRAINING})
    _, d = run({"leaf-5": Reads(10, 0, 990.0)}, node_map=nm)
    assert d.add == () and "no volume there" in d.skipped[0]
    excluded = PlacementRule(replicas=2, min=2, excluded_nodes=frozenset({"leaf-6"}))
    dec = decide(
        cid=cid(1),
        size=GIB,
        rule=DemandRule(),
        placement_rule=excluded,
        node_map=domain(),
        required=REQUIRED,
        reads={"leaf-6": Reads(10, 0, 990.0)},
        ledger=CacheLedger(),
        now=1000.0,
    )
    assert dec.add == ()
    _, d = run({"leaf-5": Reads(10, 0, 990.0)}, size=60 * GIB)  # more than the free 50 GiB
    assert d.add == ()


def test_budget_evicts_least_recently_read_of_other_objects() -> None:
    rule = DemandRule(min_reads=1, budget_fraction=0.03)  # 3 GiB of leaf-5's 100 GiB
    ledger = CacheLedger(
        [
            CachedCopy(cid(7), "leaf-5/v0", GIB, 500.0),
            CachedCopy(cid(8), "leaf-5/v0", GIB, 100.0),
            CachedCopy(cid(9), "leaf-5/v0", GIB, 995.0),
        ]
    )
    ledger, d = run({"leaf-5": Reads(3, 0, 990.0)}, ledger, rule=rule, size=2 * GIB)
    assert [(x.cid, x.volume) for x in d.drop] == [(cid(8), "leaf-5/v0"), (cid(7), "leaf-5/v0")]
    assert ledger.used("leaf-5") == 3 * GIB
    # Nothing older than the newcomer left to evict: refused, nothing dropped.
    _, d = run({"leaf-5": Reads(3, 0, 10.0)}, ledger, rule=rule, obj=2, now=20.0)
    assert d.add == () and d.drop == ()


def test_a_cached_copy_the_planner_now_requires_is_adopted_not_dropped() -> None:
    ledger = CacheLedger([CachedCopy(cid(1), "leaf-3/v0", GIB, 0.0)])
    ledger, d = run({}, ledger, now=10_000.0)
    assert d.drop == () and [c.volume for c in d.adopted] == ["leaf-3/v0"]
    assert len(ledger) == 0


def test_the_planner_is_given_required_copies_only() -> None:
    nm = domain()
    obj = PlacedObject(cid(1), GIB)
    first = plan(obj, RULE, nm).desired
    holding = [*first, "leaf-5/v0", "leaf-6/v0"]
    current = required_current(holding, {"leaf-5/v0", "leaf-6/v0"})
    assert plan(obj, RULE, nm, current).desired == first


def test_demand_rule_from_policy() -> None:
    rule = DemandRule.of(Demand(follow="zone", budget_percent=None, budget_bytes=5 * GIB))
    assert rule.budget(10**15) == 5 * GIB
    assert DemandRule.of(Demand()).budget(100 * GIB) == 20 * GIB


def test_service_consumers_are_located_by_their_reads() -> None:
    nm = domain()
    shop = Consumer("shop", {}, "shop-web")
    fixed = Consumer("blog", {"zone": "z1"})
    located, where = locate_consumers([shop, fixed], {"shop-web": {"leaf-5": 8, "leaf-2": 5}}, nm)
    assert located[0] == Consumer(
        "shop", {"region": "eu", "zone": "z3", "host": "leaf-5"}, "shop-web"
    )
    assert located[1] == fixed and where == {"shop": "leaf-5"}
    # Hysteresis: the previous node stays while it has at least half the reads of the busiest.
    _, again = locate_consumers([shop], {"shop-web": {"leaf-5": 5, "leaf-2": 9}}, nm, where)
    assert again == {"shop": "leaf-5"}
    _, moved = locate_consumers([shop], {"shop-web": {"leaf-5": 4, "leaf-2": 9}}, nm, where)
    assert moved == {"shop": "leaf-2"}
    unseen, _ = locate_consumers([shop], {}, nm)
    assert unseen == (shop,)


def test_cached_copies_leave_draining_down_and_excluded_volumes() -> None:
    copies = [CachedCopy(cid(1), f"leaf-{i}/v0", GIB, 999.0) for i in (4, 5, 6)]
    nm = domain({"leaf-4": VolumeState.DRAINING, "leaf-5": VolumeState.DOWN})
    excluded = PlacementRule(replicas=2, min=2, excluded_nodes=frozenset({"leaf-6"}))
    d = decide(
        cid=cid(1),
        size=GIB,
        rule=DemandRule(max_extra=3),
        placement_rule=excluded,
        node_map=nm,
        required=REQUIRED,
        reads={},
        ledger=CacheLedger(copies),
        now=1000.0,
    )
    assert [(x.volume, x.reason) for x in d.drop] == [
        ("leaf-4/v0", "volume draining"),
        ("leaf-5/v0", "volume down"),
        ("leaf-6/v0", "node excluded"),
    ]


def test_status_rows_and_explain_lines_name_the_demand() -> None:
    ledger, d = run({"leaf-5": Reads(7, 0, 990.0)})
    rows = cached_locations(ledger.of_object(cid(1)), domain())
    assert rows == (Location("leaf-5", "v0", "z3", "cached", cause="7 reads in 10m from leaf-5"),)
    status = ObjectStatus(cid="c", state="placed", locations=rows)
    assert ObjectStatus.decode(status.encode()) == status
    assert status.pinned == 0  # a cached copy never counts as a policy copy
    plain = ObjectStatus(cid="c", state="placed", locations=(Location("n", "v"),))
    assert b"cause" not in plain.encode()  # statuses without demand are unchanged
    assert describe(d, DemandRule(), 1000.0) == [
        "add a cached copy on leaf-5/v0: 7 reads in 10m from leaf-5"
    ]
    _, d = run({"leaf-6": Reads(5, 0, 1100.0)}, ledger, now=1200.0, rule=DemandRule(max_extra=1))
    assert describe(d, DemandRule(), 1200.0) == [
        "cached on leaf-5/v0: 7 reads in 10m from leaf-5; last read 3m30s ago, dropped after "
        "1h without reads",
        "no copy for leaf-6: 5 reads, but max_extra (1) reached",
    ]

"""The controller's cached copies (cluster/controller/cached.py) over its real projection and
reconcile input, without NATS: a cached copy is never the reconciler's surplus nor one of the
policy's copies, shows as ``cached`` with its cause, goes after ``keep`` without reads, and a
controller that starts again finds it in the status it wrote."""

from __future__ import annotations

import itertools
import time
from dataclasses import replace

from cim_place.cluster.controller.cached import CachedCopies, _Pending
from cim_place.cluster.controller.demand import window_shape
from cim_place.cluster.controller.service import Controller, ControllerConfig
from cim_place.cluster.events.types import (
    ObjectRemoved,
    ObjectStored,
    TaskCompleted,
    event_envelope,
)
from cim_place.cluster.state.nodes import NodeRecord, VolumeStatus
from cim_place.cluster.tasks.queue import Task
from cim_place.objectstore.cid import RAW, make_cid
from cim_place.placement.demand import DemandRule
from cim_place.placement.demand_cache import CachedCopy
from cim_place.placement.demand_reconcile import required_input
from cim_place.placement.demand_window import DemandReport, ReadCount, ReadRecorder
from cim_place.placement.reconcile_model import Drop
from cim_place.placement.reconciler import reconcile
from cim_place.policies.model import Consumer, Demand, Locality, Policy, PolicySet, Replicas

A = make_cid(RAW, b"a hot object")
NODES = {"n1": "z1", "n2": "z2", "n3": "z3", "n4": "z1", "n5": "z2"}
_sequence = itertools.count(1)


def controller(now: float) -> Controller:
    c = Controller(ControllerConfig(identity="test"))
    demand = Demand(min_reads=5, window_seconds=10, keep_seconds=20, max_extra=2)
    c._set_policies(PolicySet(policies=(Policy(name="p", replicas=Replicas(3, 3), demand=demand),)))
    c._sync_nodes(
        [
            NodeRecord(
                node=n,
                labels={"zone": z, "host": n},
                volumes=(VolumeStatus("v1", 1 << 30, 0, 1 << 30),),
                heartbeat_at=now,
            )
            for n, z in NODES.items()
        ]
    )
    return c


def store(
    c: Controller, node: str, event_type: type[ObjectStored | ObjectRemoved] = ObjectStored
) -> None:
    event = event_type(root=A, size=4096, blocks=1, volume="v1", owner="", name=None)
    envelope = event_envelope(event, owner=node).with_sequence(next(_sequence))
    c.projection.apply_event(envelope, node=node)


def complete(c: Controller, task: Task) -> None:
    event = TaskCompleted(
        task_id=task.id,
        action=task.kind,
        node=task.node,
        root=A,
        volume=task.volume,
        attempts=1,
        duration=0.1,
    )
    envelope = event_envelope(event, owner=task.node).with_sequence(next(_sequence))
    c.projection.apply_event(envelope, node=task.node)


def test_window_shape_follows_the_policies() -> None:
    assert window_shape([]) == (3600.0, 60.0)
    assert window_shape([DemandRule(window=10, keep=20)]) == (10.0, 1.0)
    assert window_shape([DemandRule(window=600), DemandRule(window=1800)]) == (1800.0, 60.0)
    assert window_shape([DemandRule(window=120)]) == (120.0, 12.0)


def test_reports_carry_local_and_remote_bytes() -> None:
    recorder = ReadRecorder(reporter="n5", start=0.0, interval=5.0)
    recorder.record_read(A, "n5", "", 1.0, 100, local=False)
    recorder.record_read(A, "n5", "", 2.0, 100, local=True)
    recorder.record_read(A, "n5", "", 3.0, 100, local=True)
    [report] = recorder.flush(5.0)
    assert (report.local_bytes, report.remote_bytes) == (200, 100)
    assert DemandReport.from_dict(report.to_dict()) == report
    old = report.to_dict()
    del old["local_bytes"], old["remote_bytes"]  # a report from an older agent
    assert DemandReport.from_dict(old).local_bytes == 0


def test_a_cached_copy_is_kept_out_of_the_reconciler_and_dropped_after_keep() -> None:
    now = time.time()
    c = controller(now)
    cached: CachedCopies = c.cached
    assert (cached.window.horizon, cached.window.slot) == (10.0, 1.0)
    store(c, "n1")
    inp = c.reconcile_input(A, now)
    assert inp is not None
    desired = reconcile(inp).desired
    for volume in desired:
        store(c, volume.split("/")[0])
    spare = next(n for n in NODES if f"{n}/v1" not in desired)
    if "n1/v1" not in desired:
        spare = "n1"  # the first copy, dropped by the reconciler once the others are there
    else:
        store(c, spare)
    volume = f"{spare}/v1"

    # Without the ledger the spare copy is surplus: the reconciler drops it.
    inp = c.reconcile_input(A, now)
    assert inp is not None
    assert any(isinstance(a, Drop) and a.node == spare for a in reconcile(inp).actions)

    # A demand fetch whose replica arrived: it is cached, invisible to the reconciler.
    copy = CachedCopy(A, volume, 4096, now, f"5 reads in 10s from {spare}")
    cached.pending[(A, volume)] = _Pending("t-demand", "fetch", copy)
    occupied = cached.volumes(A, inp)
    assert occupied == {volume} and not cached.pending and cached.ledger.get(A, volume) == copy
    result = reconcile(required_input(inp, occupied))
    assert result.actions == () and result.status.state == "placed"
    assert set(result.desired) == set(desired)
    status = cached.status(A, result, inp.node_map).status
    rows = [(loc.node, loc.state, loc.cause) for loc in status.locations if loc.node == spare]
    assert rows == [(spare, "cached", f"5 reads in 10s from {spare}")]
    assert (status.pinned, status.desired, status.state) == (3, 3, "placed")

    # Read again at its node: kept (and its last read moves); no reads for keep: dropped.
    cached.window.add(
        DemandReport(spare, now, now + 1, (ReadCount(A, spare, "", 3, 300, now + 1),))
    )
    kept = cached.decide(A, inp, result, now + 2)
    assert kept is not None and not kept.drop and kept.refresh[0].last_read == now + 1
    cached.ledger.put(kept.refresh[0])
    later = replace(inp, now=now + 30)
    gone = cached.decide(A, later, result, now + 30)
    assert gone is not None and [d.volume for d in gone.drop] == [volume]
    assert gone.drop[0].reason == "no reads for 20s"
    assert cached.explain(A, "p", now + 30) == [
        f"drop the cached copy of {volume}: no reads for 20s"
    ]

    # Another controller (a restart): the status written names the cached copy.
    again = controller(now)
    for node in (*[v.split("/")[0] for v in desired], spare):
        store(again, node)
    inp2 = again.reconcile_input(A, now)
    assert inp2 is not None
    inp2 = replace(inp2, previous=status)
    assert again.cached.volumes(A, inp2) == {volume}
    assert again.cached.ledger.get(A, volume) is not None


def test_a_service_consumer_is_where_its_reads_come_from() -> None:
    now = time.time()
    c = controller(now)
    shop = Consumer("shop", {}, service="shop-web")
    near = Policy(name="p", replicas=Replicas(3, 3), locality=Locality(near=("shop",)))
    policies = PolicySet(policies=(near,), consumers=(shop,))
    c._set_policies(policies)
    # No reads yet: the consumer has no place, so it places nothing.
    assert c._compiled["p"].rule.locality is None
    assert not c.located.moved(policies, c.demand_window, c.node_map(now), now)

    def read_from(node: str, reads: int) -> None:
        count = ReadCount(A, node, "shop-web", reads, 100 * reads, now)
        c.demand_window.add(DemandReport(node, now - 1, now, (count,)))

    read_from("n4", 9)
    c._relocate_consumers()
    assert c.located.where == {"shop": "n4"}
    locality = c._compiled["p"].rule.locality
    assert locality is not None and "n4" in str(locality)

    # A few reads from n5 do not move it (hysteresis); the site moving there does.
    read_from("n5", 12)
    c._relocate_consumers()
    assert c.located.where == {"shop": "n4"}
    read_from("n5", 12)
    assert c.located.moved(policies, c.demand_window, c.node_map(now), now)
    c._relocate_consumers()
    assert c.located.where == {"shop": "n5"}
    locality = c._compiled["p"].rule.locality
    assert locality is not None and "n5" in str(locality) and "n4" not in str(locality)


def test_a_demand_task_that_ends_after_the_input_was_taken_is_not_taken_as_failed() -> None:
    """The agent's ObjectStored and TaskCompleted may both be applied between the reconcile
    input and the ledger's update: the copy must not become an ordinary (surplus) replica."""
    now = time.time()
    c = controller(now)
    cached: CachedCopies = c.cached
    for node in ("n1", "n2", "n3"):
        store(c, node)
    volume = "n5/v1"
    fetch = Task.create("fetch", "n5", A, generation=1 << 48, volume="v1", holders=("n1",))
    c.projection.task_enqueued(fetch, now)
    copy = CachedCopy(A, volume, 4096, now, "5 reads in 10s from n5")
    cached.pending[(A, volume)] = _Pending(fetch.id, "fetch", copy)
    before = c.reconcile_input(A, now)
    assert before is not None
    store(c, "n5")
    complete(c, fetch)
    # Still a demand fetch for that input: nothing of it reaches the reconciler.
    assert cached.volumes(A, before) == {volume} and (A, volume) in cached.pending
    status = cached.status(A, reconcile(required_input(before, {volume})), before.node_map)
    assert [loc.state for loc in status.status.locations if loc.node == "n5"] == []
    after = c.reconcile_input(A, now)
    assert after is not None
    assert cached.volumes(A, after) == {volume} and cached.ledger.get(A, volume) == copy
    result = cached.status(A, reconcile(required_input(after, {volume})), after.node_map)
    assert not result.actions
    rows = [(loc.node, loc.state) for loc in result.status.locations if loc.state != "pinned"]
    assert rows == [("n5", "cached")] and result.status.pinned == 3

    # The same for its drop: the copy stays cached until an input without it.
    drop = Task.create("drop", "n5", A, generation=(1 << 48) + 1, volume="v1")
    c.projection.task_enqueued(drop, now)
    cached.pending[(A, volume)] = _Pending(drop.id, "drop", copy, "no reads for 20s")
    before = c.reconcile_input(A, now)
    assert before is not None
    store(c, "n5", ObjectRemoved)
    complete(c, drop)
    assert cached.volumes(A, before) == {volume} and (A, volume) in cached.pending
    after = c.reconcile_input(A, now)
    assert after is not None
    assert cached.volumes(A, after) == frozenset() and not cached.pending
    assert cached.ledger.get(A, volume) is None
    result = cached.status(A, reconcile(required_input(after, frozenset())), after.node_map)
    assert {loc.node for loc in result.status.locations} == {"n1", "n2", "n3"}
    assert (result.status.state, result.status.pinned) == ("placed", 3)

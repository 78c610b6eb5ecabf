"""The controller's projection, driven by scripted sequences of real event envelopes."""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import pytest

from cim_place.cluster.controller.projection import Projection
from cim_place.cluster.events.types import (
    AnyEvent,
    InventoryDigest,
    NodeJoined,
    ObjectRemoved,
    ObjectStored,
    ReplicaDamaged,
    TaskCompleted,
    TaskFailed,
    event_envelope,
    inventory_digest,
)
from cim_place.cluster.nats.envelope import Content, Envelope
from cim_place.cluster.state.nodes import NodeRecord, VolumeStatus
from cim_place.cluster.tasks.model import Task
from cim_place.objectstore.cid import RAW, Cid, make_cid
from cim_place.policies.model import Policy, PolicySet, Replicas

A = make_cid(RAW, b"object a")
B = make_cid(RAW, b"object b")
C = make_cid(RAW, b"object c")

_sequence = itertools.count(1)


def envelope(event: AnyEvent, node: str, cause: Envelope | None = None) -> Envelope:
    """An envelope as the agent publishes it (owner = node), with the next stream sequence."""
    return event_envelope(event, owner=node, cause=cause).with_sequence(next(_sequence))


def stored(root: Cid, volume: str = "v1") -> ObjectStored:
    return ObjectStored(
        root=root,
        size=1024,
        blocks=1,
        volume=volume,
        owner="alice",
        name="report.pdf",
        metadata={"team": "web"},
    )


def removed(root: Cid, volume: str = "v1") -> ObjectRemoved:
    return ObjectRemoved(root=root, size=1024, blocks=1, volume=volume, owner="alice")


def node(name: str, *, zone: str = "z1", volumes: tuple[str, ...] = ("v1",)) -> NodeRecord:
    return NodeRecord(
        node=name,
        labels={"zone": zone},
        volumes=tuple(VolumeStatus(v, 1 << 30, 0, 1 << 30) for v in volumes),
        heartbeat_at=1.0,
    )


@pytest.fixture
def projection() -> Iterator[Projection]:
    yield Projection()


def test_stored_events_build_objects_and_replicas(projection: Projection) -> None:
    first = envelope(stored(A), "n1")
    assert first.sequence is not None
    assert projection.apply_event(first, at=100.0) == {A}
    assert projection.apply_event(envelope(stored(A, "v2"), "n2"), at=200.0) == {A}
    assert projection.apply_event(envelope(stored(B), "n2"), at=300.0) == {B}
    view = projection.object(A)
    assert view is not None
    assert view.replicas == {("n1", "v1"), ("n2", "v2")}
    assert (view.size, view.owner, view.name) == (1024, "alice", "report.pdf")
    assert view.metadata == {"team": "web"}
    assert view.first_seen == 100.0  # the first ObjectStored, not the last
    assert view.sequence == first.sequence + 1
    assert len(projection) == 2 and A in projection and C not in projection
    assert projection.object(C) is None
    assert projection.last_sequence == first.sequence + 2


def test_a_repeated_stored_event_adds_no_second_replica(projection: Projection) -> None:
    event = stored(A)
    projection.apply_event(envelope(event, "n1"))
    projection.apply_event(envelope(event, "n1"))
    assert projection.replicas(A) == {("n1", "v1")}


def test_removed_events_drop_only_their_replica(projection: Projection) -> None:
    projection.apply_event(envelope(stored(A), "n1"))
    projection.apply_event(envelope(stored(A), "n2"))
    assert projection.apply_event(envelope(removed(A), "n1")) == {A}
    assert projection.replicas(A) == {("n2", "v1")}
    # Removing the last copy keeps the object known (with no replica: the controller decides).
    projection.apply_event(envelope(removed(A), "n2"))
    assert A in projection and projection.replicas(A) == frozenset()
    # An unknown CID or location changes nothing.
    assert projection.apply_event(envelope(removed(B), "n1")) == set()
    assert projection.apply_event(envelope(removed(A, "v9"), "n1")) == {A}


def test_more_replicas_than_the_inline_columns(projection: Projection) -> None:
    nodes = [f"n{i}" for i in range(7)]
    for name in nodes:
        projection.apply_event(envelope(stored(A), name))
    assert projection.replicas(A) == {(n, "v1") for n in nodes}
    assert projection.cids_on("n6") == {A}
    for name in nodes[::2]:
        projection.apply_event(envelope(removed(A), name))
    assert projection.replicas(A) == {(n, "v1") for n in nodes[1::2]}
    assert projection.cids_on("n6") == set()


def test_the_subject_node_wins_over_the_owner(projection: Projection) -> None:
    projection.apply_event(envelope(stored(A), "someone"), node="n3")
    assert projection.replicas(A) == {("n3", "v1")}


def test_invalid_events_are_counted_not_raised(projection: Projection) -> None:
    bad = Envelope.new(Content("event", "ObjectStored", {"root": "not a link"}), owner="n1")
    unknown = Envelope.new(Content("event", "Unheard", {}), owner="n1")
    command = Envelope.new(Content("command", "fetch", {}), owner="n1")
    for message in (bad, unknown, command):
        assert projection.apply_event(message) == set()
    assert projection.rejected == 3 and projection.applied == 0 and len(projection) == 0


def test_tasks_in_flight_end_with_their_report(projection: Projection) -> None:
    projection.apply_event(envelope(stored(A), "n1"))
    fetch = Task.create("fetch", "n2", A, generation=0, holders=["n1"], volume="v1")
    drop = Task.create("drop", "n1", A, generation=0, volume="v1")
    projection.task_enqueued(fetch, 10.0)
    projection.task_enqueued(drop, 11.0)
    assert [t.id for t in projection.tasks_for(A)] == [fetch.id, drop.id]
    assert projection.tasks_in_flight == 2
    done = TaskCompleted(
        task_id=fetch.id,
        action="fetch",
        node="n2",
        root=A,
        volume="v1",
        attempts=1,
        duration=0.1,
    )
    assert projection.apply_event(envelope(done, "n2")) == {A}
    assert [t.id for t in projection.tasks_for(A)] == [drop.id]
    assert projection.generation(A, "fetch", "n2", "v1") == 0


def test_failures_are_counted_for_generation_bumps(projection: Projection) -> None:
    projection.apply_event(envelope(stored(A), "n1"))
    for generation in range(2):
        fetch = Task.create("fetch", "n2", A, generation=generation, volume="v1")
        projection.task_enqueued(fetch, 10.0)
        failed = TaskFailed(
            task_id=fetch.id,
            action="fetch",
            node="n2",
            root=A,
            volume="v1",
            attempts=3,
            reason="no holder answered",
        )
        assert projection.apply_event(envelope(failed, "n2")) == {A}
        assert projection.tasks_for(A) == ()
    assert projection.generation(A, "fetch", "n2", "v1") == 2
    assert projection.failures(A) == {("fetch", "n2", "v1"): 2}
    projection.clear_failures(A)
    assert projection.generation(A, "fetch", "n2", "v1") == 0


def test_a_report_without_root_finds_the_task_by_causation(projection: Projection) -> None:
    fetch = Task.create("fetch", "n2", B, generation=0, volume="v1")
    projection.task_enqueued(fetch, 10.0)
    cause = Envelope.new(Content("command", "FetchObject", {}), owner="controller")
    cause = Envelope(fetch.id, cause.correlation_id, None, "controller", cause.content)
    failed = TaskFailed(
        task_id="unreadable",
        action=None,
        node="n2",
        root=None,
        volume=None,
        attempts=1,
        reason="malformed task",
        permanent=True,
    )
    assert projection.apply_event(envelope(failed, "n2", cause=cause)) == {B}
    assert projection.tasks_in_flight == 0
    assert projection.failures(B) == {("fetch", "n2", "v1"): 1}


def test_stale_tasks_expire(projection: Projection) -> None:
    projection.task_enqueued(Task.create("fetch", "n2", A, generation=0), 10.0)
    projection.task_enqueued(Task.create("fetch", "n2", B, generation=0), 50.0)
    assert projection.expire_tasks(older_than=20.0) == {A}
    assert projection.tasks_for(A) == () and len(projection.tasks_for(B)) == 1


def test_node_changes_mark_the_cids_on_that_node(projection: Projection) -> None:
    # New nodes mark nothing (rebalance is a separate pass); a beat with new free bytes neither.
    assert projection.update_node(node("n1")) == set()
    assert projection.update_node(node("n2")) == set()
    projection.apply_event(envelope(stored(A), "n1"))
    projection.apply_event(envelope(stored(B), "n1"))
    projection.apply_event(envelope(stored(B), "n2"))
    projection.apply_event(envelope(stored(C), "n2"))
    busier = NodeRecord(node="n1", labels={"zone": "z1"}, volumes=(VolumeStatus("v1", 9, 9, 0),))
    assert projection.update_node(busier) == set()
    # Labels or volume names changing marks the node's CIDs.
    assert projection.update_node(node("n1", zone="z2")) == {A, B}
    assert projection.update_node(node("n2", volumes=("v1", "v2"))) == {B, C}
    # Drain flag: marks when it changes.
    assert projection.set_draining("n2", True) == {B, C}
    assert projection.set_draining("n2", True) == set()
    assert projection.draining == {"n2"}
    assert projection.set_draining("n2", False) == {B, C}
    # Disappearing heartbeat: its CIDs; a full sync removes what is missing.
    assert projection.sync_nodes([node("n1", zone="z2"), node("n3")]) == {B, C}
    assert set(projection.nodes) == {"n1", "n3"}
    assert projection.remove_node("n1") == {A, B}
    assert projection.remove_node("n1") == set()
    # A node that comes back marks what it holds (a repair may be moot now).
    assert projection.update_node(node("n1")) == {A, B}
    assert set(projection.nodes) == {"n1", "n3"}


def test_the_node_index_follows_replicas(projection: Projection) -> None:
    projection.apply_event(envelope(stored(A, "v1"), "n1"))
    projection.apply_event(envelope(stored(B, "v2"), "n1"))
    projection.apply_event(envelope(stored(C, "v1"), "n2"))
    assert projection.cids_on("n1") == {A, B}
    assert projection.cids_on("n1", "v2") == {B}
    assert projection.cids_on("n9") == set()
    assert projection.cids_on_nodes(["n1", "n2", "n9"]) == {A, B, C}
    assert projection.cids_on_nodes([]) == set()
    projection.apply_event(envelope(removed(B, "v2"), "n1"))
    assert projection.cids_on("n1") == {A}
    projection.forget(A)
    assert projection.cids_on("n1") == set() and A not in projection
    # The freed slot is reused by the next object, with fresh columns.
    projection.apply_event(envelope(stored(B, "v3"), "n3"), at=5.0)
    view = projection.object(B)
    assert view is not None and view.replicas == {("n3", "v3")}
    assert projection.cids_on("n3") == {B}


def test_a_policy_change_marks_every_cid(projection: Projection) -> None:
    for cid in (A, B, C):
        projection.apply_event(envelope(stored(cid), "n1"))
    assert projection.set_policies(PolicySet()) is False  # unchanged
    policies = PolicySet(policies=(Policy(name="two", replicas=Replicas(2, 2)),))
    assert projection.set_policies(policies) is True  # every CID due
    assert projection.set_policies(policies) is False
    # "Every CID" is walked a chunk of slots at a time, each CID once.
    chunks = list(projection.cid_chunks(2))
    assert [(after, len(chunk)) for after, chunk in chunks] == [(2, 2), (0, 1)]
    assert sorted(cid for _, chunk in chunks for cid in chunk) == sorted((A, B, C))
    # From a cursor, round to it again: each CID once, the cursor's slot first.
    resumed = list(projection.cid_chunks(2, start=1))
    assert [(after, len(chunk)) for after, chunk in resumed] == [(0, 2), (1, 1)]
    assert [cid for _, chunk in resumed for cid in chunk] == [
        *chunks[0][1][1:],
        *chunks[1][1],
        chunks[0][1][0],
    ]


def test_drift_compares_the_inventory_digest(projection: Projection) -> None:
    projection.apply_event(envelope(stored(A), "n1"))
    projection.apply_event(envelope(stored(B), "n1"))
    projection.apply_event(envelope(stored(C, "v2"), "n1"))
    assert projection.drift("n1", "v1") is None  # no digest yet

    def digest(*roots: Cid) -> InventoryDigest:
        return InventoryDigest(
            volume="v1", pins=len(roots), size=0, digest=inventory_digest(roots), taken_at=1.0
        )

    assert projection.apply_event(envelope(digest(B, A), "n1")) == set()
    assert projection.drift("n1", "v1") is False
    inventory = projection.inventory("n1", "v1")
    assert inventory is not None and inventory.pins == 2
    projection.apply_event(envelope(digest(A), "n1"))
    assert projection.drift("n1", "v1") is True


def test_node_events_change_no_object(projection: Projection) -> None:
    joined = NodeJoined(node="n1", labels={"zone": "z1"}, volumes=("v1",))
    assert projection.apply_event(envelope(joined, "n1")) == set()
    assert projection.applied == 1


def test_apply_events_returns_the_union(projection: Projection) -> None:
    batch = [envelope(stored(A), "n1"), envelope(stored(B), "n1"), envelope(removed(A), "n1")]
    assert projection.apply_events(batch) == {A, B}
    assert projection.last_sequence == batch[-1].sequence


def test_names_follow_the_latest_stored_event(projection: Projection) -> None:
    def named(name: str | None) -> ObjectStored:
        return ObjectStored(root=A, size=1, blocks=1, volume="v1", owner="bob", name=name)

    projection.apply_event(envelope(named(None), "n1"))
    view = projection.object(A)
    assert view is not None and view.name is None and view.metadata == {}
    projection.apply_event(envelope(named("été.txt"), "n1"))
    view = projection.object(A)
    assert view is not None and view.name == "été.txt" and view.owner == "bob"
    projection.apply_event(envelope(named("b.txt"), "n2"))
    view = projection.object(A)
    assert view is not None and view.name == "b.txt"
    projection.forget(A)
    projection.apply_event(envelope(stored(B), "n1"))
    view = projection.object(B)
    assert view is not None and view.name == "report.pdf"


def test_a_redelivered_event_is_not_applied_twice(projection: Projection) -> None:
    add, drop = envelope(stored(A), "n1"), envelope(removed(A), "n1")
    projection.apply_events([add, drop])
    assert projection.apply_events([add, drop]) == set()
    assert projection.replayed == 2 and projection.replicas(A) == frozenset()


def test_total_size_follows_stored_events_and_forgetting(projection: Projection) -> None:
    def with_size(root: Cid, size: int, volume: str = "v1") -> ObjectStored:
        return ObjectStored(root=root, size=size, blocks=1, volume=volume, owner="alice", name=None)

    projection.apply_event(envelope(with_size(A, 100), "n1"))
    projection.apply_event(envelope(with_size(A, 100, "v2"), "n2"))  # a second replica
    projection.apply_event(envelope(with_size(B, 7), "n1"))
    assert projection.total_size == 107
    projection.apply_event(envelope(with_size(B, 9), "n1"))  # the size is the latest said
    assert projection.total_size == 109
    projection.forget(A)
    assert projection.total_size == 9
    projection.apply_event(envelope(with_size(C, 5), "n1"))  # reuses A's slot
    assert projection.total_size == 14
    assert projection.total_size == sum(
        view.size for cid in projection.cids() if (view := projection.object(cid)) is not None
    )


def damaged_event(root: Cid, node: str, volume: str = "v1") -> ReplicaDamaged:
    return ReplicaDamaged(
        root=root, node=node, volume=volume, blocks=(C,), problem="corrupt", found_by="scrub"
    )


def test_damage_marks_a_confirmed_replica_until_it_is_stored_again(
    projection: Projection,
) -> None:
    root = A
    projection.apply_event(envelope(stored(root), "a"), at=10.0)
    projection.apply_event(envelope(stored(root), "b"), at=20.0)
    assert projection.verified_at(root) == {("a", "v1"): 10.0, ("b", "v1"): 20.0}
    assert projection.apply_event(envelope(damaged_event(root, "a"), "a")) == {root}
    assert projection.damaged(root) == {("a", "v1"): frozenset({C})}
    assert projection.damaged_replicas == 1
    # A node reports only its own replicas; damage of an unknown replica marks nothing.
    rejected = projection.rejected
    assert projection.apply_event(envelope(damaged_event(root, "b"), "a")) == set()
    assert projection.rejected == rejected + 1
    assert projection.apply_event(envelope(damaged_event(root, "c"), "c")) == set()
    # Repaired: stored again whole, the damage is gone and the verification time moves.
    projection.apply_event(envelope(stored(root), "a"), at=30.0)
    assert projection.damaged(root) == {}
    assert projection.verified_at(root)[("a", "v1")] == 30.0
    projection.apply_event(envelope(damaged_event(root, "b"), "b"))
    projection.apply_event(envelope(removed(root), "b"))
    assert projection.damaged_replicas == 0

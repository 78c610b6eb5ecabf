"""Projection snapshots: export then import is exact, and a bad snapshot is refused whole."""

from __future__ import annotations

import time
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cim_place.cluster.controller.projection import Projection
from cim_place.cluster.controller.snapshot import SnapshotPolicy, Snapshots
from cim_place.cluster.controller.snapshot_format import (
    FORMAT_VERSION,
    HEADER_SIZE,
    SnapshotError,
    header_of,
    seal,
    take,
)
from cim_place.cluster.controller.snapshot_load import load, load_parts, restore
from cim_place.cluster.events.types import (
    Event,
    InventoryDigest,
    ObjectDeleted,
    ObjectRemoved,
    ObjectStored,
    ReplicaDamaged,
    TaskCompleted,
    TaskFailed,
    event_envelope,
    inventory_digest,
)
from cim_place.cluster.tasks.queue import Task
from cim_place.objectstore.cid import RAW, make_cid

CIDS = [make_cid(RAW, f"object {i}".encode()) for i in range(12)]
NODES = ["n1", "n2", "n3", "n4", "n5"]
VOLUMES = ["v1", "v2"]

# One step of a history: (what, cid index, node index, volume index, a small number, a flag).
_step = st.tuples(
    st.sampled_from(
        [
            "store",
            "store",
            "store",
            "remove",
            "damage",
            "task",
            "done",
            "fail",
            "digest",
            "delete",
            "forget",
            "redeliver",
            "reject",
        ]
    ),
    st.integers(0, len(CIDS) - 1),
    st.integers(0, len(NODES) - 1),
    st.integers(0, len(VOLUMES) - 1),
    st.integers(0, 3),
    st.booleans(),
)


class History:
    """Applies steps to one or more projections the same way (the same envelopes, times)."""

    def __init__(self) -> None:
        self.sequence = 0
        self.clock = 1000.0
        self.tasks: list[Task] = []

    def apply(self, projections: list[Projection], step: tuple[Any, ...]) -> None:
        what, c, n, v, k, flag = step
        cid, node, volume = CIDS[c], NODES[n], VOLUMES[v]
        self.clock += 1.5
        event: Event | None = None
        if what == "store":
            event = ObjectStored(
                root=cid,
                size=100 * (k + 1) + c,
                blocks=1,
                volume=volume,
                owner=["alice", "bob"][k % 2],
                name=None if flag else f"docs/é-{c}-{k}.txt",
                metadata={"team": str(k)} if k else {},
            )
        elif what == "remove":
            event = ObjectRemoved(root=cid, size=1, blocks=1, volume=volume, owner="alice")
        elif what == "damage":
            event = ReplicaDamaged(
                root=cid, node=node, volume=volume, blocks=(CIDS[k],), problem="corrupt"
            )
        elif what == "task":
            task = Task.create("fetch", node, cid, generation=k, volume=volume)
            self.tasks.append(task)
            for p in projections:
                p.task_enqueued(task, self.clock, repair_policy="gold" if flag else None)
        elif what in ("done", "fail") and self.tasks:
            task = self.tasks[k % len(self.tasks)]
            if what == "done":
                event = TaskCompleted(
                    task_id=task.id,
                    action="fetch",
                    node=task.node,
                    root=task.root if flag else None,
                    volume=task.volume,
                    attempts=1,
                    duration=0.1,
                )
            else:
                event = TaskFailed(
                    task_id=task.id,
                    action="fetch",
                    node=task.node,
                    root=task.root,
                    volume=task.volume,
                    attempts=3,
                    reason=f"why {k}",
                    permanent=flag,
                )
            node = task.node
        elif what == "digest":
            event = InventoryDigest(
                volume=volume,
                pins=k,
                size=k * 10,
                digest=inventory_digest(CIDS[: k + c % 3]),
                taken_at=self.clock,
            )
        elif what == "delete":
            event = ObjectDeleted(root=cid, by="op", reason="gone" if flag else "")
            node = "hub"
        elif what == "forget":
            for p in projections:
                p.forget(cid)
        elif what == "redeliver" and self.sequence:
            event = ObjectStored(root=cid, size=1, blocks=1, volume=volume, owner="x")
            envelope = event_envelope(event, owner=node).with_sequence(self.sequence)
            for p in projections:
                p.apply_event(envelope, node=node, at=self.clock)
            return
        elif what == "reject":
            event = ObjectStored(root=cid, size=-1, blocks=1, volume=volume, owner="x")
        if event is None:
            return
        self.sequence += 1
        envelope = event_envelope(event, owner=node).with_sequence(self.sequence)
        for p in projections:
            p.apply_event(envelope, node=node, at=self.clock)


def readings(p: Projection) -> dict[str, object]:
    """Everything the projection's public reading methods say."""
    cids = sorted(p.cids())
    keys = [(kind, n, v) for kind in ("fetch",) for n in NODES for v in (*VOLUMES, None)]
    return {
        "len": len(p),
        "cids": cids,
        "contains": [c in p for c in CIDS],
        "objects": [p.object(c) for c in CIDS],
        "sizes": [p.size(c) for c in CIDS],
        "replicas": [p.replicas(c) for c in CIDS],
        "damaged": [p.damaged(c) for c in CIDS],
        "damaged_replicas": p.damaged_replicas,
        "verified": [p.verified_at(c) for c in CIDS],
        "on": [p.cids_on(n, v) for n in NODES for v in (*VOLUMES, None)],
        "on_nodes": p.cids_on_nodes(NODES[:2]),
        "tasks_for": [p.tasks_for(c) for c in CIDS],
        "in_flight": sorted(p.in_flight(), key=lambda t: t.id),
        "tasks_in_flight": p.tasks_in_flight,
        "failures": [p.failures(c) for c in CIDS],
        "generations": [p.generation(c, *key) for c in CIDS for key in keys],
        "last_failures": [p.last_failure(c, key) for c in CIDS for key in keys],
        "inventories": [p.inventory(n, v) for n in NODES for v in VOLUMES],
        "inventoried": sorted(p.inventoried()),
        "drift": [p.drift(n, v) for n in NODES for v in VOLUMES],
        "removals": [p.removal(c) for c in CIDS],
        "counters": (p.last_sequence, p.applied, p.total_size, p.rejected, p.replayed),
        "rejections": p.rejections,
    }


def round_trip(p: Projection, *, compress: bool = True) -> Projection:
    return load(seal(take(p), compress=compress).data)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_step, max_size=80), st.lists(_step, max_size=30), st.booleans())
def test_export_then_import_is_exact_and_behaves_the_same_afterwards(
    before: list[tuple[Any, ...]], after: list[tuple[Any, ...]], compress: bool
) -> None:
    history = History()
    original = Projection()
    for step in before:
        history.apply([original], step)
    copy = round_trip(original, compress=compress)
    assert readings(copy) == readings(original)
    # The restored columns, free slots, names blob and interning go on exactly like the
    # original's: the same later events give the same projection.
    for step in after:
        history.apply([original, copy], step)
    assert readings(copy) == readings(original)


def test_restore_replaces_objects_and_keeps_nodes_and_policies() -> None:
    history = History()
    source = Projection()
    for i in range(5):
        history.apply([source], ("store", i, i % 3, 0, 1, False))
    target = Projection()
    target.draining.add("n9")
    assert restore(target, seal(take(source)).data) == source.last_sequence
    assert readings(target) == readings(source)
    assert target.draining == {"n9"}


def snapshot_bytes() -> bytes:
    history = History()
    p = Projection()
    for i in range(8):
        history.apply([p], ("store", i, i % 4, i % 2, i % 3, i % 2 == 0))
    return seal(take(p)).data


@pytest.mark.parametrize(
    ("damage", "why"),
    [
        (lambda d: d[: len(d) // 2], "truncated"),
        (lambda d: d[:10], "truncated"),
        (lambda d: d[:-1] + bytes([d[-1] ^ 1]), "checksum"),
        (lambda d: b"XXXXXXXX" + d[8:], "magic"),
        (
            lambda d: d[:8] + (FORMAT_VERSION + 1).to_bytes(4, "little") + d[12:],
            "format version",
        ),
    ],
)
def test_a_bad_snapshot_is_refused_and_changes_nothing(damage: Any, why: str) -> None:
    target = Projection()
    History().apply([target], ("store", 0, 0, 0, 0, False))
    before = readings(target)
    with pytest.raises(SnapshotError, match=why):
        restore(target, damage(snapshot_bytes()))
    assert readings(target) == before


@pytest.mark.parametrize("size", [1, 7, 64, 65, 4096])
def test_a_snapshot_read_in_chunks_is_the_snapshot_read_whole(size: int) -> None:
    data = snapshot_bytes()
    parts = [data[i : i + size] for i in range(0, len(data), size)]
    assert readings(load_parts(parts)) == readings(load(data))
    assert parts == []  # consumed


def test_a_snapshot_with_its_sparse_map_last_is_read_too() -> None:
    """Snapshots written before the sparse map came first (columns wait for their typecodes)."""
    history = History()
    p = Projection()
    for i in range(8):
        history.apply([p], ("store", i, i % 4, i % 2, i % 3, i % 2 == 0))
    taken = take(p)
    assert taken.sections[0][0] == b"sprs"
    taken.sections.append(taken.sections.pop(0))
    assert readings(load(seal(taken).data)) == readings(p)


@pytest.mark.parametrize("compress", [True, False])
def test_a_damaged_payload_is_called_corrupt_not_unreadable(compress: bool) -> None:
    history = History()
    p = Projection()
    for i in range(8):
        history.apply([p], ("store", i, i % 4, i % 2, i % 3, i % 2 == 0))
    data = bytearray(seal(take(p), compress=compress).data)
    data[HEADER_SIZE + 20] ^= 0xFF
    with pytest.raises(SnapshotError, match="checksum"):
        load_parts([bytes(data[i : i + 100]) for i in range(0, len(data), 100)])


def test_the_header_says_the_sequence() -> None:
    data = snapshot_bytes()
    header = header_of(data)
    assert header.sequence == 8 and header.version == FORMAT_VERSION
    assert header.length == len(data) - HEADER_SIZE


def test_a_snapshot_is_due_after_enough_events_or_time_with_new_events() -> None:
    projection = Projection()
    policy = SnapshotPolicy(every_events=10, every_seconds=60.0, kept=3)
    snapshots = Snapshots(None, projection, policy=policy)  # type: ignore[arg-type]  # no I/O here
    start = time.monotonic()
    assert not snapshots.due(start + 3600)  # nothing applied: nothing to write
    projection.last_sequence = 5
    assert not snapshots.due(start)
    assert snapshots.due(start + 61)
    projection.last_sequence = 10
    assert snapshots.due(start)
    snapshots.last_written = 10
    assert not snapshots.due(start + 3600)

"""A reconcile pass keeps many reconciles in flight (``RECONCILE_WINDOW``): the rate limits still
hold exactly, every object is reconciled once, and a task the hub refused is withdrawn from the
projection (pure: an in-memory task queue and status store stand in for the hub, with random
delays so that the reconciles interleave)."""

from __future__ import annotations

import asyncio
import hashlib
import random
import time
from collections import Counter

from cim_place.cluster.controller.reconcile_loop import RECONCILE_WINDOW
from cim_place.cluster.controller.service import Controller, ControllerConfig
from cim_place.cluster.events.types import ObjectStored, event_envelope
from cim_place.cluster.nats.envelope import Envelope
from cim_place.cluster.state.cid_shards import shard_of
from cim_place.cluster.state.nodes import NodeRecord, VolumeStatus
from cim_place.cluster.tasks.model import Task
from cim_place.cluster.tasks.queue import Enqueued
from cim_place.errors import TransportError
from cim_place.objectstore.cid import RAW, Cid, cid_of_digest, to_str
from cim_place.placement.reconcile_model import ReconcileResult
from cim_place.placement.status import ObjectStatus

OBJECTS = 4 * RECONCILE_WINDOW
NODES = 6
UNLIMITED = ControllerConfig(
    max_tasks=1 << 30, max_tasks_per_node=1 << 30, max_bytes_per_node=1 << 50
)


class SlowQueue:
    """Takes tasks after a random delay; refuses every ``refuse_every``-th one."""

    def __init__(self, refuse_every: int = 0, queued: list[Task] | None = None) -> None:
        self.tasks: list[Task] = []
        self.before = list(queued or [])
        """Tasks a previous leader left in the stream (what :meth:`queued` reads back)."""
        self.calls = 0
        self.refuse_every = refuse_every
        self.random = random.Random(7)

    async def enqueue(self, task: Task, *, cause: Envelope | None = None) -> Enqueued:
        self.calls += 1
        call = self.calls
        await asyncio.sleep(self.random.random() / 500)
        if self.refuse_every and call % self.refuse_every == 0:
            raise TransportError(f"could not queue task {task.id}: the hub refused it")
        self.tasks.append(task)
        return Enqueued(task.id, len(self.tasks), False)

    async def queued(self, limit: int) -> list[tuple[Task, float]]:
        await asyncio.sleep(0)
        return [(task, time.time()) for task in [*self.before, *self.tasks][:limit]]


class MemoryLocations:
    def __init__(self) -> None:
        self.statuses: dict[str, ObjectStatus] = {}
        self.puts: Counter[str] = Counter()

    async def get(self, cid: Cid | str) -> ObjectStatus | None:
        await asyncio.sleep(0)
        return self.statuses.get(cid if isinstance(cid, str) else to_str(cid))

    async def write(self, cid: str, data: bytes) -> None:
        await asyncio.sleep(0)
        self.statuses[cid] = ObjectStatus.decode(data)
        self.puts[cid] += 1

    async def delete(self, cid: Cid | str) -> None:
        self.statuses.pop(cid if isinstance(cid, str) else to_str(cid), None)


def controller_with(config: ControllerConfig, queue: SlowQueue) -> tuple[Controller, list[Cid]]:
    """A leading controller that knows ``NODES`` live nodes in as many zones and ``OBJECTS``
    objects stored once each on n0 (the built-in policy wants 3 copies: two fetches each)."""
    controller = Controller(config)
    now = time.time()
    controller._last_records = {
        f"n{i}": NodeRecord(
            node=f"n{i}",
            labels={"zone": f"z{i}"},
            volumes=(VolumeStatus("v1", 1 << 40, 0, 1 << 40),),
            heartbeat_at=now,
        )
        for i in range(NODES)
    }
    cids = []
    for i in range(OBJECTS):
        root = cid_of_digest(RAW, hashlib.sha256(f"object {i}".encode()).digest())
        event = ObjectStored(root=root, size=1024, blocks=1, volume="v1", owner="n0")
        controller.projection.apply_event(
            event_envelope(event, owner="n0").with_sequence(i + 1), node="n0", at=now
        )
        cids.append(root)
    controller.locations = MemoryLocations()  # type: ignore[assignment]
    controller._queue = queue  # type: ignore[assignment]
    controller._acting = True
    controller.caught_up.set()
    # The nodes' first liveness marks every CID on them: taken here, not in the middle of a test.
    controller.liveness(now)
    controller._dirty.clear()
    return controller, cids


async def test_the_limits_hold_with_many_reconciles_in_flight() -> None:
    queue = SlowQueue()
    config = ControllerConfig(max_tasks=40, max_tasks_per_node=9)
    controller, cids = controller_with(config, queue)
    assert await controller._reconcile_each([cids])
    per_node = Counter(task.node for task in queue.tasks)
    assert len(queue.tasks) == 40  # exactly the domain's limit, not one more
    assert max(per_node.values()) <= 9
    assert "n0" not in per_node  # it holds every copy already
    assert controller.projection.tasks_in_flight == 40
    assert len({task.id for task in queue.tasks}) == 40
    locations = controller.locations
    assert isinstance(locations, MemoryLocations)
    assert set(locations.puts) == {to_str(cid) for cid in cids}  # every object reconciled
    assert set(locations.puts.values()) == {1}  # once


class LeadsShards:
    """What the controller reads of its shard leadership (controller/shards.py), without leases."""

    def __init__(self, led: set[int], shards: int) -> None:
        self.led = led
        self.shards = shards

    @property
    def is_leader(self) -> bool:
        return bool(self.led)

    def leads(self, cid: Cid) -> bool:
        return shard_of(cid, self.shards) in self.led

    def leads_shard(self, index: int) -> bool:
        return index in self.led


async def test_a_shard_leader_keeps_to_its_part_of_the_limits() -> None:
    queue = SlowQueue()
    config = ControllerConfig(max_tasks=40, max_tasks_per_node=9, shards=2)
    controller, cids = controller_with(config, queue)
    sharding = LeadsShards({0}, 2)
    controller.sharding = sharding  # type: ignore[assignment]
    controller._shards_changed()
    metric = controller.metrics.registry.get_sample_value
    assert metric("cim_place_controller_shards") == 2
    assert metric("cim_place_controller_shards_led") == 1
    assert await controller._reconcile_each([cids])
    assert {shard_of(task.root, 2) for task in queue.tasks} == {0}
    assert len(queue.tasks) == 20  # half the domain's 40: the other shard's leader has the rest
    assert max(Counter(task.node for task in queue.tasks).values()) <= 4  # 9 // 2
    # Its peer is gone and it takes the other shard over: its part is the whole limit again.
    sharding.led.add(1)
    controller._shards_changed()
    assert metric("cim_place_controller_shards_led") == 2
    assert await controller._reconcile_each([cids])
    assert len(queue.tasks) == 40
    assert max(Counter(task.node for task in queue.tasks).values()) <= 9


async def test_without_limits_every_object_gets_its_fetches_once() -> None:
    queue = SlowQueue()
    controller, cids = controller_with(UNLIMITED, queue)
    assert await controller._reconcile_each([cids])
    assert len(queue.tasks) == 2 * OBJECTS
    assert Counter(task.root for task in queue.tasks) == {cid: 2 for cid in cids}


async def test_a_refused_task_is_withdrawn_and_its_object_retried() -> None:
    queue = SlowQueue(refuse_every=5)
    controller, cids = controller_with(UNLIMITED, queue)
    assert await controller._reconcile_each([cids])
    # What the projection counts in flight is what the queue took, nothing it refused.
    assert controller.projection.tasks_in_flight == len(queue.tasks)
    assert {t.id for t in controller.projection.in_flight()} == {t.id for t in queue.tasks}
    assert controller._budget().total == len(queue.tasks)
    assert len(queue.tasks) < 2 * OBJECTS


async def test_marks_made_during_a_walk_of_every_object_are_taken_before_its_end() -> None:
    """An election or the full pass walks every object (hours at millions): an object stored
    meanwhile is reconciled within a chunk, not after the walk."""
    queue = SlowQueue()
    controller, _ = controller_with(UNLIMITED, queue)
    walk = controller.projection.cid_chunks
    controller.projection.cid_chunks = lambda size=4096, start=0: walk(16, start)  # type: ignore[method-assign]
    late = cid_of_digest(RAW, hashlib.sha256(b"stored during the walk").digest())
    enqueue = queue.enqueue

    async def store_late_object(task: Task, *, cause: Envelope | None = None) -> Enqueued:
        if queue.calls == 10:  # in the walk's first chunk
            event = ObjectStored(root=late, size=1024, blocks=1, volume="v1", owner="n0")
            envelope = event_envelope(event, owner="n0").with_sequence(OBJECTS + 1)
            controller.mark(controller.projection.apply_event(envelope, node="n0"))
        return await enqueue(task, cause=cause)

    queue.enqueue = store_late_object  # type: ignore[method-assign]
    controller.mark_all()
    assert await controller._walk_all()
    order = [task.root for task in queue.tasks]
    assert late in order
    # Reconciled right after the first chunk, long before the walk's last objects.
    assert order.index(late) < 2 * 2 * 16 + 2
    assert len(queue.tasks) == 2 * (OBJECTS + 1)


async def test_a_walk_cut_short_resumes_where_it_stopped() -> None:
    """Leadership lost in the middle of a walk of every object: the next walk starts where that
    one stopped and goes round, so blips shorter than a walk still reach every object."""
    queue = SlowQueue()
    controller, cids = controller_with(UNLIMITED, queue)
    walk = controller.projection.cid_chunks
    controller.projection.cid_chunks = lambda size=4096, start=0: walk(16, start)  # type: ignore[method-assign]
    enqueue = queue.enqueue

    async def depose_once(task: Task, *, cause: Envelope | None = None) -> Enqueued:
        if queue.calls == 2 * 40:  # in the walk's third chunk
            controller._acting = False
        return await enqueue(task, cause=cause)

    queue.enqueue = depose_once  # type: ignore[method-assign]
    assert not await controller._walk_all()
    first = {task.root for task in queue.tasks}
    issued = len(queue.tasks)
    assert set(cids[:32]) <= first
    assert controller._walk_cursor == 32  # two chunks of 16 done
    controller._acting = True
    queue.tasks.clear()
    reconciled: list[Cid] = []
    reconcile_one = controller.reconcile_one

    async def noting(cid: Cid, *, rebalance: bool = False) -> ReconcileResult | None:
        reconciled.append(cid)
        return await reconcile_one(cid, rebalance=rebalance)

    controller.reconcile_one = noting  # type: ignore[method-assign]
    assert await controller._walk_all()
    # Resumed at the cursor (the third chunk's slots first), round to the first slots last.
    assert set(reconciled[:16]) == set(cids[32:48])
    assert set(reconciled[-32:]) == set(cids[:32])
    assert sorted(reconciled) == sorted(cids)
    assert {task.root for task in queue.tasks} | first == set(cids)
    assert len(queue.tasks) + issued == 2 * OBJECTS  # and nothing twice
    assert controller._walk_cursor == 32  # round to where it began


async def test_an_unchanged_status_is_written_once_per_term() -> None:
    """Reconciles are level-triggered and mostly change nothing: the status of an object is
    written to the hub when it changes, not at every pass; a new term writes each once more."""
    controller, cids = controller_with(UNLIMITED, SlowQueue())
    locations = controller.locations
    assert isinstance(locations, MemoryLocations)
    assert await controller._reconcile_each([cids])  # fetches queued: the status changes
    assert await controller._reconcile_each([cids])  # they show in the status
    written = dict(locations.puts)
    assert await controller._reconcile_each([cids])  # nothing changed: nothing written
    assert locations.puts == written
    controller.object_states.forget_written()  # what taking the lead again does
    assert await controller._reconcile_each([cids])
    assert locations.puts == {cid: count + 1 for cid, count in written.items()}


async def test_a_new_leader_counts_its_predecessors_tasks_against_the_limits() -> None:
    config = ControllerConfig(max_tasks=40, max_tasks_per_node=9)
    first = SlowQueue()
    leader, cids = controller_with(config, first)
    assert await leader._reconcile_each([cids])
    assert len(first.tasks) == 40
    # The leader is gone; its 40 tasks are still in the stream, none reported.
    queue = SlowQueue(queued=first.tasks)
    successor, _ = controller_with(config, queue)
    successor._elected()  # an election asks the reconcile loop to read the stream first
    assert successor._adopt_due
    await successor._adopt_tasks()
    assert successor.projection.tasks_in_flight == 40
    assert {t.id for t in successor.projection.in_flight()} == {t.id for t in first.tasks}
    assert await successor._reconcile_each([cids])
    assert queue.tasks == []  # the limit is full: not one more beside the predecessor's
    await successor._adopt_tasks()  # idempotent: nothing counted twice
    assert successor.projection.tasks_in_flight == 40

    # Without the tasks read back, the successor issued a whole limit's worth beside them.
    blind = SlowQueue()
    unaware, _ = controller_with(config, blind)
    assert await unaware._reconcile_each([cids])
    assert len(blind.tasks) == 40


async def test_a_shard_taken_over_brings_only_its_own_tasks() -> None:
    config = ControllerConfig(max_tasks=40, max_tasks_per_node=9, shards=2)
    first = SlowQueue()
    leader, cids = controller_with(config, first)
    leader.sharding = LeadsShards({0, 1}, 2)  # type: ignore[assignment]
    leader._shards_changed()
    assert await leader._reconcile_each([cids])
    queue = SlowQueue(queued=first.tasks)
    successor, _ = controller_with(config, queue)
    successor.sharding = LeadsShards({1}, 2)  # type: ignore[assignment]
    successor._adopt_due = False
    successor._elected_shard(1)
    assert successor._adopt_due
    await successor._adopt_tasks()
    counted = list(successor.projection.in_flight())
    assert counted and {shard_of(task.root, 2) for task in counted} == {1}
    assert len(counted) == sum(1 for task in first.tasks if shard_of(task.root, 2) == 1)

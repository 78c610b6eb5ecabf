"""The task queue and the agent's task worker, on real servers: a 1-server hub and leaf nodes.

The queue publishes from a hub connection; each worker connects to its own leaf server and pulls
from the hub's JetStream domain, as an agent does. Events go to an in-test publisher.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field

import pytest
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.api import RetentionPolicy

from cim_place.cluster.nats.connection import connected, jetstream
from cim_place.cluster.nats.envelope import MSG_ID, Content, Envelope, decode
from cim_place.cluster.nats.subjects import TASKS_STREAM, Subjects
from cim_place.cluster.tasks.model import (
    TASK_COMPLETED,
    TASK_FAILED,
    Task,
    TaskFormatError,
    decode_task,
    task_envelope,
    task_id,
)
from cim_place.cluster.tasks.outcome import Backoff, TaskOutcome, TaskResult
from cim_place.cluster.tasks.queue import TaskQueue, ensure_task_stream
from cim_place.cluster.tasks.worker import TaskWorker, consumer_name
from cim_place.errors import StoreFullError
from cim_place.local.servers import NatsServer
from cim_place.local.topologies import Hub
from cim_place.objectstore.cid import RAW, make_cid
from cim_place.objectstore.dagcbor import Link
from cim_place.testing import LeafFactory

ROOT = make_cid(RAW, b"the object")
OTHER = make_cid(RAW, b"another object")
SUBJECTS = Subjects()
FAST = Backoff(initial=0.01, factor=2.0, maximum=0.05, jitter=0.0)


# -- pure: the task model --------------------------------------------------------------------------


def test_task_id_is_deterministic() -> None:
    first = task_id("fetch", "n1", ROOT, 7)
    assert first == task_id("fetch", "n1", ROOT, 7)
    others = {
        task_id("drop", "n1", ROOT, 7),
        task_id("fetch", "n2", ROOT, 7),
        task_id("fetch", "n1", OTHER, 7),
        task_id("fetch", "n1", ROOT, 8),
        task_id("fetch", "n1", ROOT, 7, volume="disk2"),
    }
    assert first not in others
    assert len(others) == 5
    assert Task.create("fetch", "n1", ROOT, generation=7).id == first


def test_task_envelope_round_trips() -> None:
    cause = Envelope.new(Content("event", "ObjectStored", {}), owner="ctl")
    task = Task.create(
        "fetch",
        "n1",
        ROOT,
        generation=3,
        holders=["n2", "n3"],
        volume="disk1",
        reason="policy web: 3 copies",
        created_by="controller-1",
    )
    envelope = task_envelope(task, cause=cause)
    assert envelope.headers()[MSG_ID] == task.id
    assert envelope.content.type == "FetchObject"
    assert envelope.correlation_id == cause.correlation_id
    assert envelope.causation_id == cause.id
    decoded = decode(envelope.encode())
    assert decoded.content.body["root"] == Link(ROOT)
    assert decode_task(decoded) == task


def _command(body: dict[str, object], command: str = "DropObject") -> Envelope:
    return Envelope.new(Content("command", command, body), owner="x")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("envelope", "problem"),
    [
        (_command({"node": "n1", "root": Link(ROOT)}, "MeltObject"), "unknown task command"),
        (Envelope.new(Content("event", "DropObject", {}), owner="x"), "must be a command"),
        (_command({"node": 5, "root": Link(ROOT)}), "DropObject.node must be a string"),
        (_command({"node": "n1", "root": ROOT}), "DropObject.root must be a CID link"),
        (_command({"node": "a.b", "root": Link(ROOT)}), "not usable"),
        (_command({"node": "n1", "root": Link(ROOT), "holders": [1]}), "holders"),
        (_command({"node": "n1", "root": Link(ROOT), "generation": True}), "generation"),
        (_command({"node": "n1", "root": Link(ROOT), "kind": "fetch"}), "contradicts"),
    ],
)
def test_decode_task_names_the_problem(envelope: Envelope, problem: str) -> None:
    with pytest.raises(TaskFormatError, match=problem):
        decode_task(decode(envelope.encode()))


# -- real servers ----------------------------------------------------------------------------------


@dataclass
class EventLog:
    """The in-test event store: every event is encoded and decoded, as the real one would."""

    events: list[Envelope] = field(default_factory=list)
    fail: bool = False

    async def publish(self, event: Envelope) -> None:
        if self.fail:
            raise ConnectionError("event store unavailable")
        self.events.append(decode(event.encode()))

    def of(self, event_type: str) -> list[Envelope]:
        return [e for e in self.events if e.content.type == event_type]


async def until(predicate: Callable[[], bool], timeout: float = 30.0) -> None:
    """Wait until ``predicate()`` holds (a generous limit against hangs, not a speed check)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError("condition not reached")
        await asyncio.sleep(0.02)


async def queued(js: JetStreamContext) -> int:
    info = await js.stream_info(TASKS_STREAM)
    return int(info.state.messages)


@dataclass
class Domain:
    hub_js: JetStreamContext
    queue: TaskQueue
    events: EventLog
    leaf_clients: dict[str, Client]
    stack: AsyncExitStack

    async def worker(
        self, node: str, handler: Callable[[Task], Awaitable[TaskOutcome]], **options: object
    ) -> TaskWorker:
        options.setdefault("backoff", FAST)
        options.setdefault("fetch_wait", 0.5)
        options.setdefault("retry_wait", 0.1)
        worker = TaskWorker(
            self.leaf_clients[node],
            node,
            handler,
            publish_event=self.events.publish,
            **options,  # type: ignore[arg-type]
        )
        await worker.start()
        self.stack.push_async_callback(worker.stop, 1.0)
        await worker.wait_ready(timeout=30)
        return worker


@asynccontextmanager
async def domain(hub: Hub, leaf_factory: LeafFactory, *nodes: str) -> AsyncIterator[Domain]:
    leaves = {node: leaf_factory(node) for node in nodes}
    async with AsyncExitStack() as stack:
        hub_nc = await stack.enter_async_context(connected(hub.url))
        hub_js = jetstream(hub_nc, "hub")
        await ensure_task_stream(hub_js, 1)
        clients = {
            node: await stack.enter_async_context(connected(leaf.url))
            for node, leaf in leaves.items()
        }
        yield Domain(hub_js, TaskQueue(hub_js), EventLog(), clients, stack)


def completed(result: dict[str, object] | None = None) -> Callable[[Task], Awaitable[TaskOutcome]]:
    async def handle(task: Task) -> TaskOutcome:
        return TaskOutcome.completed(result)  # type: ignore[arg-type]

    return handle


async def test_ensure_task_stream_is_idempotent(hub1: Hub) -> None:
    async with connected(hub1.url) as nc:
        js = jetstream(nc, "hub")
        await ensure_task_stream(js, 1)
        await ensure_task_stream(js, 1)
        info = await js.stream_info(TASKS_STREAM)
        assert info.config.subjects == [SUBJECTS.all_tasks]
        assert info.config.retention == RetentionPolicy.WORK_QUEUE
        await js.publish(SUBJECTS.task("n1"), b"kept")
        await ensure_task_stream(js, 1, duplicate_window=60)
        info = await js.stream_info(TASKS_STREAM)
        assert info.config.duplicate_window == 60
        assert info.state.messages == 1


async def test_task_is_handled_reported_then_acked(hub1: Hub, leaf_factory: LeafFactory) -> None:
    async with domain(hub1, leaf_factory, "n1") as d:
        seen: list[Task] = []

        async def handle(task: Task) -> TaskOutcome:
            seen.append(task)
            return TaskOutcome.completed({"blocks": 3, "bytes": 1024})

        worker = await d.worker("n1", handle)
        cause = Envelope.new(Content("event", "PolicyApplied", {}), owner="ops")
        task = Task.create("fetch", "n1", ROOT, generation=1, holders=["n2"], created_by="ctl")
        enqueued = await d.queue.enqueue(task, cause=cause)
        assert not enqueued.duplicate
        await until(lambda: worker.stats.completed == 1)

        assert [t.id for t in seen] == [task.id]
        assert seen[0].holders == ("n2",) and seen[0].attempt == 1
        [event] = d.events.events
        assert event.content.type == TASK_COMPLETED
        assert event.causation_id == task.id
        assert event.correlation_id == cause.correlation_id
        assert event.content.body["task_id"] == task.id
        assert event.content.body["root"] == Link(ROOT)
        assert event.content.body["result"] == {"blocks": 3, "bytes": 1024}
        assert await queued(d.hub_js) == 0
        consumer = await d.hub_js.consumer_info(TASKS_STREAM, consumer_name("n1"))
        assert consumer.config.filter_subject == SUBJECTS.task("n1")
        assert consumer.num_ack_pending == 0


async def test_same_task_enqueued_twice_runs_once(hub1: Hub, leaf_factory: LeafFactory) -> None:
    async with domain(hub1, leaf_factory, "n1") as d:
        calls: list[str] = []

        async def handle(task: Task) -> TaskOutcome:
            calls.append(task.id)
            return TaskOutcome.completed()

        task = Task.create("drop", "n1", ROOT, generation=4)
        first = await d.queue.enqueue(task)
        again = await d.queue.enqueue(Task.create("drop", "n1", ROOT, generation=4))
        assert again.duplicate and again.sequence == first.sequence
        assert await queued(d.hub_js) == 1
        worker = await d.worker("n1", handle)
        await until(lambda: worker.stats.completed == 1)
        assert await queued(d.hub_js) == 0
        assert calls == [task.id]
        # A later generation is new work.
        assert not (await d.queue.enqueue(Task.create("drop", "n1", ROOT, generation=5))).duplicate
        await until(lambda: worker.stats.completed == 2)
        assert len(d.events.of(TASK_COMPLETED)) == 2


async def test_failing_task_is_retried_with_backoff(hub1: Hub, leaf_factory: LeafFactory) -> None:
    async with domain(hub1, leaf_factory, "n1") as d:
        attempts: list[int] = []
        results: list[TaskResult] = []

        async def handle(task: Task) -> TaskOutcome:
            attempts.append(task.attempt)
            if task.attempt == 1:
                raise ConnectionError("holder n2 unreachable")
            if task.attempt == 2:
                return TaskOutcome.retry("holder n2 served a corrupt block")
            return TaskOutcome.completed()

        worker = await d.worker("n1", handle, max_attempts=5, on_result=results.append)
        task = Task.create("fetch", "n1", ROOT, generation=1, holders=["n2"])
        await d.queue.enqueue(task)
        await until(lambda: worker.stats.completed == 1)

        assert attempts == [1, 2, 3]
        assert [r.action for r in results] == ["retry", "retry", "completed"]
        assert [r.delay for r in results[:2]] == [0.01, 0.02]
        assert "holder n2 unreachable" in results[0].outcome.reason
        assert worker.stats.retried == 2
        [event] = d.events.events
        assert event.content.type == TASK_COMPLETED
        assert event.content.body["attempts"] == 3
        assert await queued(d.hub_js) == 0


def test_backoff_is_exponential_and_capped() -> None:
    backoff = Backoff(initial=1.0, factor=2.0, maximum=5.0, jitter=0.0)
    assert [backoff.delay(a) for a in range(1, 6)] == [1.0, 2.0, 4.0, 5.0, 5.0]
    jittered = Backoff(initial=1.0, jitter=0.5)
    assert all(0.5 <= jittered.delay(1) <= 1.0 for _ in range(100))


async def test_always_failing_task_ends_failed(hub1: Hub, leaf_factory: LeafFactory) -> None:
    async with domain(hub1, leaf_factory, "n1") as d:
        attempts: list[int] = []

        async def handle(task: Task) -> TaskOutcome:
            attempts.append(task.attempt)
            raise ConnectionError("no holder reachable")

        worker = await d.worker("n1", handle, max_attempts=3)
        task = Task.create("fetch", "n1", ROOT, generation=1)
        await d.queue.enqueue(task)
        await until(lambda: worker.stats.failed == 1)

        assert attempts == [1, 2, 3]
        [event] = d.events.events
        assert event.content.type == TASK_FAILED
        assert event.causation_id == task.id
        reason = event.content.body["reason"]
        assert isinstance(reason, str)
        assert "3 times" in reason and "no holder reachable" in reason
        assert event.content.body["permanent"] is False
        assert await queued(d.hub_js) == 0


async def test_permanent_failure_does_not_retry(hub1: Hub, leaf_factory: LeafFactory) -> None:
    async with domain(hub1, leaf_factory, "n1") as d:
        calls: list[str] = []

        async def handle(task: Task) -> TaskOutcome:
            calls.append(task.kind)
            if task.kind == "fetch":
                raise StoreFullError("volume disk1 is full (10 GiB limit)")
            return TaskOutcome.failed("root codec not supported")

        worker = await d.worker("n1", handle, max_attempts=5)
        await d.queue.enqueue(Task.create("fetch", "n1", ROOT, generation=1))
        await d.queue.enqueue(Task.create("verify", "n1", ROOT, generation=1))
        await until(lambda: worker.stats.failed == 2)

        assert sorted(calls) == ["fetch", "verify"]
        reasons = {e.content.body["action"]: e.content.body["reason"] for e in d.events.events}
        assert reasons["fetch"] == "StoreFullError: volume disk1 is full (10 GiB limit)"
        assert reasons["verify"] == "root codec not supported"
        assert all(e.content.body["permanent"] is True for e in d.events.events)
        assert worker.stats.retried == 0
        assert await queued(d.hub_js) == 0


async def test_malformed_messages_are_counted_and_terminated(
    hub1: Hub, leaf_factory: LeafFactory
) -> None:
    async with domain(hub1, leaf_factory, "n1") as d:
        worker = await d.worker("n1", completed())
        subject = SUBJECTS.task("n1")
        await d.hub_js.publish(subject, b"\xff garbage", headers={MSG_ID: "junk-1"})
        await d.hub_js.publish(subject, b"no id at all")
        unknown = _command({"node": "n1", "root": Link(ROOT)}, "MeltObject")
        await d.hub_js.publish(subject, unknown.encode(), headers=unknown.headers())
        wrong = _command({"node": "n1", "root": "not a link"})
        await d.hub_js.publish(subject, wrong.encode(), headers=wrong.headers())
        bad_cid = _command({"node": "n1", "root": Link(b"\x01junk")})
        await d.hub_js.publish(subject, bad_cid.encode(), headers=bad_cid.headers())
        # A well-formed task for another node, sent on this node's subject.
        foreign = task_envelope(Task.create("drop", "n2", ROOT, generation=1))
        await d.hub_js.publish(subject, foreign.encode(), headers=foreign.headers())
        await until(lambda: worker.stats.malformed == 6)

        failed = d.events.of(TASK_FAILED)
        assert {e.causation_id for e in failed} == {
            "junk-1",
            unknown.id,
            wrong.id,
            bad_cid.id,
            foreign.id,
        }
        assert all(e.content.body["permanent"] is True for e in failed)
        by_cause = {e.causation_id: str(e.content.body["reason"]) for e in failed}
        assert "unknown task command 'MeltObject'" in by_cause[unknown.id]
        assert "is for node n2 but arrived at node n1" in by_cause[foreign.id]
        assert "invalid CID" in by_cause[bad_cid.id]

        # The worker is alive and still works.
        await d.queue.enqueue(Task.create("verify", "n1", ROOT, generation=1))
        await until(lambda: worker.stats.completed == 1)
        assert await queued(d.hub_js) == 0


async def test_tasks_reach_only_their_own_node(hub1: Hub, leaf_factory: LeafFactory) -> None:
    async with domain(hub1, leaf_factory, "n1", "n2") as d:
        seen: dict[str, list[str]] = {"n1": [], "n2": []}

        def recorder(node: str) -> Callable[[Task], Awaitable[TaskOutcome]]:
            async def handle(task: Task) -> TaskOutcome:
                seen[node].append(task.node)
                return TaskOutcome.completed()

            return handle

        for generation in range(3):
            await d.queue.enqueue(Task.create("verify", "n1", ROOT, generation=generation))
            await d.queue.enqueue(Task.create("verify", "n2", ROOT, generation=generation))
        # Only n2's worker runs: it takes its own three tasks and leaves n1's in the queue.
        second = await d.worker("n2", recorder("n2"))
        await until(lambda: second.stats.completed == 3)
        assert await queued(d.hub_js) == 3
        first = await d.worker("n1", recorder("n1"))
        await until(lambda: first.stats.completed == 3)
        assert seen == {"n1": ["n1"] * 3, "n2": ["n2"] * 3}
        assert await queued(d.hub_js) == 0
        for event in d.events.events:
            assert event.content.body["node"] in seen


async def test_concurrency_limit_is_respected(hub1: Hub, leaf_factory: LeafFactory) -> None:
    async with domain(hub1, leaf_factory, "n1") as d:
        running = 0
        most = 0
        both_running = asyncio.Event()

        async def handle(task: Task) -> TaskOutcome:
            nonlocal running, most
            running += 1
            most = max(most, running)
            if running == 2:
                both_running.set()
            # Hold the slot until the limit has been reached once, so overlap is certain.
            await asyncio.wait_for(both_running.wait(), 30)
            await asyncio.sleep(0.02)
            running -= 1
            return TaskOutcome.completed()

        for generation in range(8):
            await d.queue.enqueue(Task.create("verify", "n1", ROOT, generation=generation))
        worker = await d.worker("n1", handle, concurrency=2)
        await until(lambda: worker.stats.completed == 8)
        assert most == 2
        consumer = await d.hub_js.consumer_info(TASKS_STREAM, consumer_name("n1"))
        assert consumer.config.max_ack_pending == 2


async def test_stop_releases_an_unfinished_task(hub1: Hub, leaf_factory: LeafFactory) -> None:
    async with domain(hub1, leaf_factory, "n1") as d:
        started = asyncio.Event()

        async def stuck(task: Task) -> TaskOutcome:
            started.set()
            await asyncio.Event().wait()
            raise AssertionError("unreachable")

        worker = await d.worker("n1", stuck)
        await d.queue.enqueue(Task.create("fetch", "n1", ROOT, generation=1))
        await asyncio.wait_for(started.wait(), 30)
        await worker.stop(grace=0.05)
        assert worker.stats.released == 1
        assert d.events.events == []
        assert await queued(d.hub_js) == 1

        attempts: list[int] = []

        async def handle(task: Task) -> TaskOutcome:
            attempts.append(task.attempt)
            return TaskOutcome.completed()

        successor = await d.worker("n1", handle)
        await until(lambda: successor.stats.completed == 1)
        assert attempts == [2]
        assert await queued(d.hub_js) == 0


async def test_long_task_is_kept_alive(hub1: Hub, leaf_factory: LeafFactory) -> None:
    async with domain(hub1, leaf_factory, "n1") as d:
        attempts: list[int] = []

        async def slow(task: Task) -> TaskOutcome:
            attempts.append(task.attempt)
            await asyncio.sleep(2.5)  # longer than the ack wait: in-progress acks keep it ours
            return TaskOutcome.completed()

        worker = await d.worker("n1", slow, ack_wait=1.0, concurrency=2)
        await d.queue.enqueue(Task.create("fetch", "n1", ROOT, generation=1))
        await until(lambda: worker.stats.completed == 1)
        assert attempts == [1]


async def test_unreported_task_is_not_acked(hub1: Hub, leaf_factory: LeafFactory) -> None:
    async with domain(hub1, leaf_factory, "n1") as d:
        d.events.fail = True
        calls: list[int] = []

        async def handle(task: Task) -> TaskOutcome:
            calls.append(task.attempt)
            if len(calls) == 2:
                d.events.fail = False  # the event store is back
            return TaskOutcome.completed()

        worker = await d.worker("n1", handle)
        task = Task.create("drop", "n1", ROOT, generation=1)
        await d.queue.enqueue(task)
        await until(lambda: worker.stats.completed == 1)
        # Handled twice (idempotent), reported once, then acked.
        assert calls == [1, 2]
        assert worker.stats.released == 1
        [event] = d.events.events
        assert event.causation_id == task.id
        assert await queued(d.hub_js) == 0


async def test_a_task_queued_again_while_running_runs_once(
    hub1: Hub, leaf_factory: LeafFactory
) -> None:
    async with domain(hub1, leaf_factory, "n1") as d:
        calls: list[int] = []
        release = asyncio.Event()

        async def handle(task: Task) -> TaskOutcome:
            calls.append(task.attempt)
            await asyncio.wait_for(release.wait(), 30)
            return TaskOutcome.completed()

        worker = await d.worker("n1", handle, concurrency=2)
        task = Task.create("fetch", "n1", ROOT, generation=1)
        await d.queue.enqueue(task)
        await until(lambda: len(calls) == 1)
        # The same task queued again once the duplicate window has passed: a new message.
        envelope = task_envelope(task)
        headers = {**envelope.headers(), MSG_ID: f"{task.id}-later"}
        await d.hub_js.publish(SUBJECTS.task("n1"), envelope.encode(), headers=headers)
        await until(lambda: worker.stats.in_flight == 2)
        release.set()
        await until(lambda: worker.stats.completed == 2)
        assert calls == [1]
        events = d.events.of(TASK_COMPLETED)
        assert {e.causation_id for e in events} == {task.id}
        assert len({e.id for e in events}) == 2
        assert await queued(d.hub_js) == 0


async def test_tasks_queued_while_the_leaf_is_cut_off_run_after(
    hub1: Hub, leaf_factory: LeafFactory
) -> None:
    leaf = leaf_factory("n1", via_proxy=True)
    assert leaf.link is not None
    async with AsyncExitStack() as stack:
        hub_nc = await stack.enter_async_context(connected(hub1.url))
        hub_js = jetstream(hub_nc, "hub")
        await ensure_task_stream(hub_js, 1)
        leaf_nc = await stack.enter_async_context(connected(leaf.url))
        events = EventLog()
        worker = TaskWorker(
            leaf_nc,
            "n1",
            completed(),
            publish_event=events.publish,
            backoff=FAST,
            fetch_wait=0.5,
            retry_wait=0.1,
        )
        await worker.start()
        stack.push_async_callback(worker.stop, 1.0)
        await worker.wait_ready(timeout=30)

        leaf.link.cut()
        await asyncio.to_thread(_wait_unlinked, leaf)
        queue = TaskQueue(hub_js)
        for generation in range(3):
            await queue.enqueue(Task.create("verify", "n1", ROOT, generation=generation))
        assert worker.stats.completed == 0
        leaf.link.restore()
        await until(lambda: worker.stats.completed == 3, timeout=60)
        assert await queued(hub_js) == 0


def _wait_unlinked(leaf: NatsServer) -> None:
    import time

    for _ in range(600):
        if leaf.leafnode_count() == 0:
            return
        time.sleep(0.05)
    raise AssertionError("the leaf link did not go down")


async def test_worker_waits_for_the_task_stream(hub1: Hub, leaf_factory: LeafFactory) -> None:
    leaf = leaf_factory("n1")
    async with connected(hub1.url) as hub_nc, connected(leaf.url) as leaf_nc:
        events = EventLog()
        worker = TaskWorker(
            leaf_nc, "n1", completed(), publish_event=events.publish, retry_wait=0.05
        )
        await worker.start()
        try:
            await until(lambda: worker.stats.fetch_errors >= 2)
            hub_js = jetstream(hub_nc, "hub")
            await ensure_task_stream(hub_js, 1)
            await worker.wait_ready(timeout=30)
            await TaskQueue(hub_js).enqueue(Task.create("drop", "n1", ROOT, generation=1))
            await until(lambda: worker.stats.completed == 1)
        finally:
            await worker.stop()


async def test_deliveries_that_never_finished_count_as_attempts(
    hub1: Hub, leaf_factory: LeafFactory
) -> None:
    async with domain(hub1, leaf_factory, "n1") as d:
        started = asyncio.Event()

        async def stuck(task: Task) -> TaskOutcome:
            started.set()
            await asyncio.Event().wait()
            raise AssertionError("unreachable")

        first = await d.worker("n1", stuck, max_attempts=1)
        task = Task.create("fetch", "n1", ROOT, generation=1)
        await d.queue.enqueue(task)
        await asyncio.wait_for(started.wait(), 30)
        await first.stop(grace=0.0)

        calls: list[Task] = []

        async def handle(task: Task) -> TaskOutcome:
            calls.append(task)
            return TaskOutcome.completed()

        second = await d.worker("n1", handle, max_attempts=1)
        await until(lambda: second.stats.failed == 1)
        assert calls == []
        [event] = d.events.events
        assert event.content.type == TASK_FAILED and event.causation_id == task.id
        assert "gave up after 1 deliveries" in str(event.content.body["reason"])
        assert await queued(d.hub_js) == 0


async def test_the_tasks_no_report_has_ended_are_read_back(
    hub1: Hub, leaf_factory: LeafFactory
) -> None:
    """What a new leader counts against its limits: the tasks still in the stream, whoever
    enqueued them; a reported (acked) task is gone, a message that is no task is skipped."""
    async with domain(hub1, leaf_factory, "n1") as d:
        assert await d.queue.queued(10) == []
        done = Task.create("fetch", "n1", ROOT, generation=1)
        waiting = [
            Task.create("fetch", "n2", ROOT, generation=1),
            Task.create("drop", "n3", make_cid(RAW, b"another"), generation=2, volume="v1"),
            Task.create("fetch", "n2", ROOT, generation=2, rate_limit=1 << 20),
        ]
        await d.queue.enqueue(done)
        await d.queue.enqueue(waiting[0])
        await d.hub_js.publish(SUBJECTS.task("n2"), b"\xffnot a task")
        for task in waiting[1:]:
            await d.queue.enqueue(task)
        worker = await d.worker("n1", completed())
        await until(lambda: worker.stats.completed == 1)  # reported, then acked: gone
        await until_queued(d.hub_js, 4)
        found = await d.queue.queued(10)
        assert [task for task, _ in found] == waiting  # oldest first, the bad message skipped
        assert all(abs(at - time.time()) < 60 for _, at in found)  # the stream's stored time
        assert [task for task, _ in await d.queue.queued(2)] == waiting[:2]


async def until_queued(js: JetStreamContext, count: int) -> None:
    for _ in range(500):
        if await queued(js) == count:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"the stream never held {count} messages")

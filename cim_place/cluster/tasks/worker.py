"""The agent's task worker: runs one node's tasks, reports each outcome as an event, then acks.

:class:`TaskWorker` runs on an agent: one durable pull consumer per node, reached
through the hub's JetStream domain from the agent's leaf connection. It runs up to
``concurrency`` tasks at once, reports every final outcome as a ``TaskCompleted`` /
``TaskFailed`` event caused by the task's envelope, and acks only after that report is durable.
Retryable failures are NAKed with exponential back-off; after ``max_attempts`` deliveries, or at
once for a permanent failure, the task ends as failed with a reason.

Handlers follow the contract in ``cim_place.cluster.tasks.outcome``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import replace

import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from cim_place.cluster.nats.envelope import (
    EnvelopeError,
    decode,
)
from cim_place.cluster.nats.subjects import HUB_DOMAIN, TASKS_STREAM, Subjects, check_node_id
from cim_place.cluster.tasks.model import (
    TASK_COMPLETED,
    TASK_FAILED,
    Task,
    TaskFormatError,
    decode_task,
)
from cim_place.cluster.tasks.outcome import (
    _PERMANENT_ERRORS,
    Backoff,
    TaskHandler,
    TaskOutcome,
    TaskResult,
)
from cim_place.cluster.tasks.reporting import (
    EventPublisher,
    OutcomeReporter,
    WorkerStats,
    describe_error,
)

__all__ = [
    "TaskWorker",
    "consumer_name",
]

_log = logging.getLogger(__name__)


def consumer_name(node: str) -> str:
    """The durable consumer of ``node`` on the task stream."""
    return f"tasks-{check_node_id(node)}"


class TaskWorker(OutcomeReporter):
    """Runs one node's tasks from ``CIM_PLACE_TASKS``, reports their outcome, then acks.

    ``nc`` is the agent's connection to its leaf server; the consumer lives in the hub domain and
    is reached through ``nc.jetstream(domain=hub_domain)``. Its filter is the node's own task
    subject, so this worker never receives another node's tasks (a work-queue stream also refuses
    two consumers with overlapping filters). ``publish_event`` persists the TaskCompleted /
    TaskFailed events; it must return only when the event is durable.

    Attempts are the stream's delivery count, so a delivery that never finished (the agent
    stopped or crashed mid-task, or a graceful stop released it) counts as one: a task is never
    started more than ``max_attempts`` times.

    Use ``await worker.start()`` then ``await worker.stop()``, or ``async with worker:``.
    """

    def __init__(
        self,
        nc: Client,
        node: str,
        handler: TaskHandler,
        *,
        publish_event: EventPublisher,
        concurrency: int = 4,
        max_attempts: int = 5,
        backoff: Backoff | None = None,
        subjects: Subjects | None = None,
        hub_domain: str = HUB_DOMAIN,
        ack_wait: float = 30.0,
        fetch_wait: float = 2.0,
        retry_wait: float = 1.0,
        on_result: Callable[[TaskResult], None] | None = None,
    ) -> None:
        if concurrency < 1:
            raise ValueError(f"task concurrency must be at least 1, got {concurrency}")
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1, got {max_attempts}")
        self.node = check_node_id(node)
        self.stats = WorkerStats()
        self._nc = nc
        self._handler = handler
        self._publish_event = publish_event
        self._concurrency = concurrency
        self._max_attempts = max_attempts
        self._backoff = backoff or Backoff()
        self._subjects = subjects or Subjects()
        self._js: JetStreamContext = nc.jetstream(domain=hub_domain)
        self._ack_wait = ack_wait
        # An in-progress ack well within the ack wait keeps a long task from being redelivered.
        self._heartbeat = ack_wait / 3
        self._fetch_wait = fetch_wait
        self._retry_wait = retry_wait
        self._backlog = False
        self._on_result = on_result
        self._stopping = asyncio.Event()
        self._loop_task: asyncio.Task[None] | None = None
        self._sub: JetStreamContext.PullSubscription | None = None
        self._in_flight: set[asyncio.Task[None]] = set()
        # Task ids being handled now -> their outcome, so that a second message for the same task
        # (re-enqueued after the duplicate window) reuses the running attempt instead of racing it.
        self._running: dict[str, asyncio.Future[TaskOutcome]] = {}
        self._ready = asyncio.Event()
        self._troubled = False

    @property
    def consumer(self) -> str:
        return consumer_name(self.node)

    def consumer_config(self) -> ConsumerConfig:
        """The durable pull consumer of this node (created or updated on start)."""
        return ConsumerConfig(
            durable_name=self.consumer,
            description=f"cim-place tasks of node {self.node}",
            filter_subject=self._subjects.task(self.node),
            deliver_policy=DeliverPolicy.ALL,
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=self._ack_wait,
            # The worker counts attempts itself: a server-side max_deliver would leave an
            # exhausted task in the work queue, unreported, instead of ending it as failed.
            max_deliver=-1,
            max_ack_pending=self._concurrency,
        )

    async def start(self) -> None:
        """Start fetching in the background (returns at once; see :meth:`wait_ready`)."""
        if self._loop_task is None:
            self._stopping.clear()
            self._loop_task = asyncio.create_task(self._run(), name=f"task-worker-{self.node}")

    async def wait_ready(self, timeout: float | None = None) -> None:
        """Wait until the consumer exists and the worker is fetching."""
        await asyncio.wait_for(self._ready.wait(), timeout)

    async def stop(self, grace: float = 10.0) -> None:
        """Stop fetching, let in-flight tasks finish for ``grace`` s, then cancel and release them.

        A released task is NAKed without delay, so the next worker of this node runs it at once.
        The durable consumer stays: tasks queued meanwhile wait for the node.
        """
        self._stopping.set()
        if self._loop_task is not None:
            if not self._in_flight and not _buffered(self._sub):
                # Idle: its pull, waiting up to fetch_wait for a task, ends now (every idle stop
                # took that long). With tasks to release it is waited out instead: a task NAKed
                # while the server still holds the pull open could be delivered to it and wait
                # out ack_wait.
                self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task
            self._loop_task = None
        if self._in_flight:
            _, pending = await asyncio.wait(set(self._in_flight), timeout=grace)
            for job in pending:
                job.cancel()
            if pending:
                await asyncio.wait(pending)
        if self._sub is not None:
            await self._release_buffered(self._sub)
            with contextlib.suppress(nats.errors.Error):
                await self._sub.unsubscribe()
            self._sub = None
        self._ready.clear()

    async def _release_buffered(self, sub: JetStreamContext.PullSubscription) -> None:
        """NAK tasks the client buffered but never started, so they need not wait out ack_wait.

        nats-py keeps messages that arrive for an earlier pull request in its subscription queue;
        it has no public way to reach them, hence the guarded private access. A task delivered
        after the unsubscribe (to a pull request still open on the server) is redelivered once
        ``ack_wait`` has passed.
        """
        queue = _pending_queue(sub)
        if queue is None:
            return
        while not queue.empty():
            msg = queue.get_nowait()
            if isinstance(msg, Msg) and (msg.reply or "").startswith("$JS.ACK."):
                with contextlib.suppress(nats.errors.Error, OSError):
                    await msg.nak()
                self.stats.released += 1

    async def __aenter__(self) -> TaskWorker:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    # -- fetching -----------------------------------------------------------------------------

    async def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                await self._fetch_once()
            except Exception as exc:
                # The hub is unreachable (leaf link cut, hub restarting) or the consumer is gone
                # (stream recreated): open the consumer again and retry. Nothing is lost: un-acked
                # tasks stay in the stream.
                self.stats.fetch_errors += 1
                hint = (
                    ""
                    if self._sub is not None
                    else f" (is the hub reachable, and stream {TASKS_STREAM} created in it?)"
                )
                self._trouble(f"fetching tasks failed: {describe_error(exc)}; retrying{hint}")
                await self._drop_subscription()
                await self._pause(self._retry_wait)

    async def _fetch_once(self) -> None:
        if self._sub is None:
            await self._js.add_consumer(TASKS_STREAM, self.consumer_config())
            self._sub = await self._js.pull_subscribe_bind(
                durable=self.consumer, stream=TASKS_STREAM
            )
            self._ready.set()
        free = self._concurrency - len(self._in_flight)
        if free <= 0:
            # Wait for a slot, or for the stop signal.
            stop = asyncio.ensure_future(self._stopping.wait())
            await asyncio.wait({*self._in_flight, stop}, return_when=asyncio.FIRST_COMPLETED)
            stop.cancel()
            return
        # With nothing queued, pull one task at a time: a pull of n > 1 that meets the late expiry
        # of the previous pull can hold a lone task back until it expires (nats-py). A pull that
        # came back full means a backlog: then pull as many as there are free slots.
        want = free if self._backlog else 1
        try:
            messages = await self._sub.fetch(want, timeout=self._fetch_wait)
        except TimeoutError:  # also nats-py's bare asyncio one: nothing to do right now
            self._backlog = False
            return
        self._backlog = len(messages) >= want
        if self._troubled:
            self._troubled = False
            _log.info("node %s: fetching tasks again", self.node)
        for msg in messages:
            job = asyncio.create_task(self._process(msg))
            self._in_flight.add(job)
            self.stats.in_flight = len(self._in_flight)
            job.add_done_callback(self._finished)

    def _trouble(self, text: str) -> None:
        # The first failure of a streak is a warning; repeats every retry_wait would flood the log.
        level = logging.DEBUG if self._troubled else logging.WARNING
        self._troubled = True
        _log.log(level, "node %s (consumer %s): %s", self.node, self.consumer, text)

    async def _drop_subscription(self) -> None:
        sub, self._sub = self._sub, None
        if sub is not None:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    def _finished(self, job: asyncio.Task[None]) -> None:
        self._in_flight.discard(job)
        self.stats.in_flight = len(self._in_flight)
        if not job.cancelled() and job.exception() is not None:
            _log.error("node %s: task processing crashed", self.node, exc_info=job.exception())

    async def _pause(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)

    # -- one message --------------------------------------------------------------------------

    async def _process(self, msg: Msg) -> None:
        started = time.monotonic()
        try:
            envelope = decode(msg.data)
            task = decode_task(envelope)
            if task.node != self.node:
                raise TaskFormatError(
                    f"task {task.id} is for node {task.node} but arrived at node {self.node}"
                )
        except EnvelopeError as exc:
            await self._reject(msg, str(exc))
            return
        except Exception as exc:
            # Whatever the bytes are, a message must never take the worker down.
            await self._reject(msg, f"undecodable: {describe_error(exc)}")
            return
        attempt = msg.metadata.num_delivered
        task = replace(task, attempt=attempt)
        if attempt > self._max_attempts:
            # Earlier deliveries never reported (the agent stopped or crashed mid-task): stop here.
            gave_up = TaskOutcome.failed(
                f"gave up after {attempt - 1} deliveries that never finished "
                "(the agent stopped or crashed while running it)"
            )
            await self._report(msg, envelope, task, gave_up, TASK_FAILED, started)
            return
        heartbeat = asyncio.create_task(self._keep_alive(msg))
        try:
            outcome = await self._run_once(task)
        except asyncio.CancelledError:
            await self._settle(msg, task, TaskOutcome.retry("worker stopped"), "released", started)
            raise
        finally:
            heartbeat.cancel()
        if outcome.status == "completed":
            await self._report(msg, envelope, task, outcome, TASK_COMPLETED, started)
        elif outcome.status == "retry" and attempt < self._max_attempts:
            await self._settle(msg, task, outcome, "retry", started)
        elif outcome.status == "retry":
            exhausted = TaskOutcome.failed(
                f"failed {attempt} times, the limit; last: {outcome.reason}"
            )
            await self._report(msg, envelope, task, exhausted, TASK_FAILED, started)
        else:
            await self._report(msg, envelope, task, outcome, TASK_FAILED, started, permanent=True)

    async def _run_once(self, task: Task) -> TaskOutcome:
        """Run the handler, mapping exceptions to outcomes; a task already running is joined."""
        running = self._running.get(task.id)
        if running is not None:
            return await asyncio.shield(running)
        future: asyncio.Future[TaskOutcome] = asyncio.get_running_loop().create_future()
        self._running[task.id] = future
        try:
            outcome = await self._handler(task)
            if not isinstance(outcome, TaskOutcome):
                outcome = TaskOutcome.retry(f"handler returned {type(outcome).__name__}")
        except asyncio.CancelledError:
            future.cancel()
            raise
        except _PERMANENT_ERRORS as exc:
            outcome = TaskOutcome.failed(describe_error(exc))
        except Exception as exc:
            _log.info("node %s: %s task %s raised: %s", self.node, task.kind, task.id, exc)
            outcome = TaskOutcome.retry(describe_error(exc))
        finally:
            del self._running[task.id]
        future.set_result(outcome)
        return outcome

    async def _keep_alive(self, msg: Msg) -> None:
        while True:
            await asyncio.sleep(self._heartbeat)
            with contextlib.suppress(nats.errors.Error):
                await msg.in_progress()


def _pending_queue(sub: JetStreamContext.PullSubscription | None) -> asyncio.Queue[Msg] | None:
    """nats-py's queue of messages delivered to ``sub`` and not yet read (see
    :meth:`TaskWorker._release_buffered`); None when absent."""
    queue = getattr(getattr(sub, "_sub", None), "_pending_queue", None)
    return queue if isinstance(queue, asyncio.Queue) else None


def _buffered(sub: JetStreamContext.PullSubscription | None) -> bool:
    queue = _pending_queue(sub)
    return queue is not None and not queue.empty()

"""The task queue: work the controller hands to one node's agent, and the agent's task worker.

This module owns three things:

1. **The task model.** A :class:`Task` is a ``fetch``, ``drop`` or ``verify`` of one root CID on one
   node (optionally one volume of it). Its id is deterministic (:func:`task_id`): the same work at
   the same ``generation`` (the controller's desired-state revision) always gets the same id, and
   the id is the envelope id, hence ``Nats-Msg-Id``, so JetStream drops a repeated enqueue within
   the stream's duplicate window. A task travels as a command envelope
   (``FetchObject`` / ``DropObject`` / ``VerifyObject``).
2. **The stream and the producer side.** :func:`ensure_task_stream` creates the work-queue stream
   ``CIM_PLACE_TASKS`` in the hub domain; :class:`TaskQueue` publishes a task on the subject of its
   node.
3. **The worker.** :class:`TaskWorker` runs on an agent: one durable pull consumer per node, reached
   through the hub's JetStream domain from the agent's leaf connection. It runs up to
   ``concurrency`` tasks at once, reports every final outcome as a ``TaskCompleted`` /
   ``TaskFailed`` event caused by the task's envelope, and acks only after that report is durable.
   Retryable failures are NAKed with exponential back-off; after ``max_attempts`` deliveries, or at
   once for a permanent failure, the task ends as failed with a reason.

What a handler must guarantee (the worker relies on it; see :data:`TaskHandler`):

- **Idempotent.** The same task can run twice: the worker may crash after the handler finished but
  before the ack, and the stream then redelivers it. ``fetch`` of a root already pinned completes
  at once; blocks kept from an interrupted attempt are reused; ``drop`` of something absent
  completes; ``verify`` only reads (or repairs towards the same state).
- **Durable before returning.** When it returns ``completed``, blocks and pin are on disk: the
  worker reports and acks right after, and the stream forgets the task.
- **Cancellable without leaving a partial pin.** A graceful stop that runs out of time cancels the
  handler and releases the task for redelivery; the root is pinned only once the whole DAG is
  present, so a cancelled fetch leaves reusable blocks, never a partial pin.
- **Honest about permanence.** Return :meth:`TaskOutcome.failed` (or raise
  :class:`PermanentTaskError` / ``StoreFullError``) for what retrying cannot fix (volume full,
  unknown root codec); return :meth:`TaskOutcome.retry` or raise anything else for what may pass
  (a holder unreachable, a corrupt block from one holder).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Annotated, Literal

import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)

from cim_place.cluster.events.types import TaskCompleted, TaskFailed
from cim_place.cluster.nats.bodies import BodyCodec, Check, CidLink, MaxItems, sparse, wire
from cim_place.cluster.nats.envelope import (
    CORRELATION,
    MSG_ID,
    Content,
    Envelope,
    EnvelopeError,
    decode,
)
from cim_place.cluster.nats.subjects import (
    HUB_DOMAIN,
    TASKS_STREAM,
    Subjects,
    check_node_id,
)
from cim_place.errors import CimPlaceError, StoreFullError, TransportError
from cim_place.objectstore.cid import Cid
from cim_place.objectstore.dagcbor import Value
from cim_place.placement.reconciler import TaskKind

__all__ = [
    "COMMAND_TYPES",
    "DEFAULT_DUPLICATE_WINDOW",
    "HUB_DOMAIN",
    "TASK_COMPLETED",
    "TASK_FAILED",
    "Backoff",
    "Enqueued",
    "EventPublisher",
    "PermanentTaskError",
    "Task",
    "TaskFormatError",
    "TaskHandler",
    "TaskKind",
    "TaskOutcome",
    "TaskQueue",
    "TaskResult",
    "TaskWorker",
    "WorkerStats",
    "consumer_name",
    "decode_task",
    "ensure_task_stream",
    "task_envelope",
    "task_id",
]

_log = logging.getLogger(__name__)

KINDS: tuple[TaskKind, ...] = ("fetch", "drop", "verify", "repair")
COMMAND_TYPES: Mapping[TaskKind, str] = {
    "fetch": "FetchObject",
    "drop": "DropObject",
    "verify": "VerifyObject",
    # Re-fetch only the damaged blocks of a replica from the verified ``holders``.
    "repair": "RepairObject",
}
_KIND_OF_COMMAND: Mapping[str, TaskKind] = {v: k for k, v in COMMAND_TYPES.items()}
TASK_COMPLETED = "TaskCompleted"
TASK_FAILED = "TaskFailed"

DEFAULT_DUPLICATE_WINDOW = 3600.0
"""Seconds within which a repeated enqueue of the same task id is dropped by the stream.

Longer than the controller's periodic full pass, so a pass that re-derives the same tasks at the
same desired-state revision does not queue them again while they wait.
"""

# A task names at most this many holders; more is a malformed (or hostile) message.
_MAX_HOLDERS = 1024
NodeId = Annotated[str, Check(check_node_id)]
_MAX_REASON = 1000


class TaskFormatError(EnvelopeError):
    """A message on a task subject that is not a valid task (wrong command, fields or types)."""


class PermanentTaskError(CimPlaceError):
    """Raised by a task handler for a failure that retrying cannot fix; the task fails at once."""


# Errors a handler may raise that mean "do not retry".
_PERMANENT_ERRORS: tuple[type[BaseException], ...] = (PermanentTaskError, StoreFullError)


# -- the task model -------------------------------------------------------------------------------


def task_id(
    kind: TaskKind, node: str, root: Cid, generation: int, volume: str | None = None
) -> str:
    """The deterministic id of a task: same work at the same generation, same id.

    ``generation`` tells legitimately repeated work apart (the controller passes its desired-state
    revision), so a task re-derived at the same revision is dropped by the stream as a duplicate,
    and one derived at a later revision runs. ``volume`` is part of the id because one node may
    hold several replicas of a root on different volumes.
    """
    if kind not in KINDS:
        raise ValueError(f"task kind must be one of {', '.join(KINDS)}, got {kind!r}")
    check_node_id(node)
    digest = hashlib.sha256()
    for part in (kind, node, root.hex(), str(generation), volume or ""):
        digest.update(part.encode())
        digest.update(b"\x00")
    return "t" + digest.hexdigest()[:32]


@dataclass(frozen=True, slots=True, kw_only=True)
class Task:
    """One unit of work for one node's agent.

    ``holders`` (for ``fetch``) are node ids that hold the root, in the controller's order of
    preference; the agent may reorder them by locality. ``attempt`` is not sent: the worker fills it
    in from the delivery count (1 on the first delivery).
    """

    id: str = field(metadata=wire("task_id"))
    kind: TaskKind
    node: NodeId
    root: CidLink
    holders: Annotated[tuple[NodeId, ...], MaxItems(_MAX_HOLDERS)] = ()
    volume: str | None = None
    generation: int = 0
    reason: str = ""
    created_by: str = ""
    attempt: int = field(default=1, metadata=wire(None))
    name: str | None = None
    """For fetch: the object's name, owner and metadata, recorded on the new replica's pin."""
    owner: str = ""
    metadata: Mapping[str, str] = field(default_factory=dict)
    rate_limit: int | None = field(default=None, metadata=sparse())
    """Bytes/s the fetch of this task may use (a repair under a policy's ``repair.bandwidth``);
    None: only the agent's own limit applies."""

    @classmethod
    def create(
        cls,
        kind: TaskKind,
        node: str,
        root: Cid,
        *,
        generation: int,
        holders: tuple[str, ...] | list[str] = (),
        volume: str | None = None,
        reason: str = "",
        created_by: str = "",
        name: str | None = None,
        owner: str = "",
        metadata: Mapping[str, str] | None = None,
        rate_limit: int | None = None,
    ) -> Task:
        """A task with its deterministic id (see :func:`task_id`)."""
        return cls(
            id=task_id(kind, node, root, generation, volume),
            kind=kind,
            node=node,
            root=root,
            holders=tuple(holders),
            volume=volume,
            generation=generation,
            reason=reason,
            created_by=created_by,
            name=name,
            owner=owner,
            metadata=dict(metadata or {}),
            rate_limit=rate_limit,
        )

    @property
    def command_type(self) -> str:
        return COMMAND_TYPES[self.kind]

    def body(self) -> dict[str, Value]:
        """The body of the task's command envelope (``attempt`` does not travel)."""
        return _TASK_BODY.encode(self)


_TASK_BODY = BodyCodec(Task, error=TaskFormatError)


def task_envelope(task: Task, *, cause: Envelope | None = None) -> Envelope:
    """The command envelope of ``task``: its id is the task id (hence ``Nats-Msg-Id``).

    With ``cause`` (the event or request that made the controller act), the task joins the cause's
    conversation: same correlation id, causation = the cause's id.
    """
    content = Content("command", task.command_type, task.body())
    owner = task.created_by
    if cause is None:
        return Envelope(task.id, task.id, None, owner, content)
    return Envelope(task.id, cause.correlation_id, cause.id, owner, content)


def decode_task(envelope: Envelope) -> Task:
    """The task carried by a command envelope; raises TaskFormatError naming the first problem.

    The id is the envelope's (the body's ``task_id`` only repeats it), the kind the command's.
    """
    content = envelope.content
    if content.kind != "command":
        raise TaskFormatError(f"a task must be a command, got a {content.kind}")
    kind = _KIND_OF_COMMAND.get(content.type)
    if kind is None:
        raise TaskFormatError(
            f"unknown task command {content.type!r}; "
            f"expected one of {', '.join(COMMAND_TYPES.values())}"
        )
    body = content.body
    if body.get("kind", kind) != kind:
        raise TaskFormatError(f"task kind {body.get('kind')!r} contradicts command {content.type}")
    return _TASK_BODY.decode(body, label=content.type, id=envelope.id, kind=kind)


# -- the stream and the producer side -------------------------------------------------------------


async def ensure_task_stream(
    js_hub: JetStreamContext,
    replicas: int,
    *,
    subjects: Subjects | None = None,
    duplicate_window: float = DEFAULT_DUPLICATE_WINDOW,
) -> None:
    """Create the work-queue stream ``CIM_PLACE_TASKS`` in the hub domain, or bring it in line.

    ``replicas`` is min(3, hub size). Idempotent and safe when several controllers race: an
    existing stream keeps its messages; its subjects, replicas and duplicate window are updated
    to the ones asked for. A stream of that name with another retention cannot be converted and
    raises TransportError saying what to do.
    """
    subjects = subjects or Subjects()
    if not 1 <= replicas <= 5:
        raise ValueError(f"task stream replicas must be 1-5 (min(3, hub size)), got {replicas}")
    wanted = StreamConfig(
        name=TASKS_STREAM,
        subjects=[subjects.all_tasks],
        retention=RetentionPolicy.WORK_QUEUE,
        storage=StorageType.FILE,
        num_replicas=replicas,
        duplicate_window=duplicate_window,
        description="cim-place tasks: fetch / drop / verify, one subject per node",
    )
    try:
        for _ in range(3):
            try:
                info = await js_hub.stream_info(TASKS_STREAM)
            except nats.js.errors.NotFoundError:
                try:
                    await js_hub.add_stream(wanted)
                    return
                except nats.js.errors.BadRequestError:
                    continue  # another process created it meanwhile: look again
            current = info.config
            if current.retention != RetentionPolicy.WORK_QUEUE:
                raise TransportError(
                    f"stream {TASKS_STREAM} exists in the hub domain with retention "
                    f"{current.retention}, not work-queue; delete it (nats stream rm "
                    f"{TASKS_STREAM}) so cim-place can create it"
                )
            if (
                sorted(current.subjects or []) != [subjects.all_tasks]
                or current.num_replicas != replicas
                or current.duplicate_window != duplicate_window
            ):
                await js_hub.update_stream(
                    replace(
                        current,
                        subjects=[subjects.all_tasks],
                        num_replicas=replicas,
                        duplicate_window=duplicate_window,
                    )
                )
            return
    except nats.errors.Error as exc:
        raise TransportError(f"could not create stream {TASKS_STREAM} in the hub: {exc}") from exc
    raise TransportError(f"stream {TASKS_STREAM} kept changing while being created; try again")


@dataclass(frozen=True, slots=True)
class Enqueued:
    """What the stream said about an enqueue: ``duplicate`` means it was already queued."""

    task_id: str
    sequence: int
    duplicate: bool


class TaskQueue:
    """The controller's side: publish tasks on the subject of their node (hub domain)."""

    def __init__(self, js_hub: JetStreamContext, *, subjects: Subjects | None = None) -> None:
        self._js = js_hub
        self._subjects = subjects or Subjects()

    async def enqueue(self, task: Task, *, cause: Envelope | None = None) -> Enqueued:
        """Queue ``task``; a task with the same id still within the duplicate window is a no-op."""
        envelope = task_envelope(task, cause=cause)
        try:
            ack = await self._js.publish(
                self._subjects.task(task.node),
                envelope.encode(),
                stream=TASKS_STREAM,
                headers=envelope.headers(),
            )
        except nats.errors.Error as exc:
            raise TransportError(
                f"could not queue {task.kind} task {task.id} for node {task.node}: {exc}; "
                f"is stream {TASKS_STREAM} created in the hub domain (ensure_task_stream)?"
            ) from exc
        return Enqueued(task.id, ack.seq, bool(ack.duplicate))


# -- outcomes -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TaskOutcome:
    """What a handler reports: ``completed`` (with a result), ``retry`` or ``failed`` (permanent).

    ``result`` goes into the ``TaskCompleted`` event body (for example bytes and blocks fetched).
    """

    status: Literal["completed", "retry", "failed"]
    reason: str = ""
    result: Mapping[str, Value] = field(default_factory=dict)

    @classmethod
    def completed(cls, result: Mapping[str, Value] | None = None) -> TaskOutcome:
        return cls("completed", "", dict(result or {}))

    @classmethod
    def retry(cls, reason: str) -> TaskOutcome:
        return cls("retry", reason)

    @classmethod
    def failed(cls, reason: str) -> TaskOutcome:
        return cls("failed", reason)


TaskHandler = Callable[[Task], Awaitable[TaskOutcome]]
"""The agent's work: fetch, drop or verify on its store. Must be idempotent (module docstring)."""

EventPublisher = Callable[[Envelope], Awaitable[None]]
"""Persists an event envelope (the event store); returns only once it is durable."""


@dataclass(frozen=True, slots=True)
class TaskResult:
    """One handled delivery, for metrics and logs (see ``TaskWorker(on_result=...)``).

    ``action`` is what the worker did with the message: ``completed`` / ``failed`` (reported and
    acked), ``retry`` (NAKed for redelivery after ``delay`` s), ``released`` (NAKed at once: stop,
    or the report could not be published).
    """

    task: Task
    outcome: TaskOutcome
    action: Literal["completed", "failed", "retry", "released"]
    duration: float
    delay: float = 0.0


@dataclass(slots=True)
class WorkerStats:
    """Counters of a worker since it started (the agent exports them as metrics)."""

    completed: int = 0
    failed: int = 0
    retried: int = 0
    released: int = 0
    malformed: int = 0
    in_flight: int = 0
    fetch_errors: int = 0


@dataclass(frozen=True, slots=True)
class Backoff:
    """Redelivery delay after a failed attempt: ``initial * factor**(attempt-1)``, capped.

    ``jitter`` (a fraction) spreads the retries of many tasks that failed together (a holder went
    away) so that they do not all come back in the same instant.
    """

    initial: float = 1.0
    factor: float = 2.0
    maximum: float = 60.0
    jitter: float = 0.2

    def delay(self, attempt: int) -> float:
        base = min(self.maximum, self.initial * self.factor ** max(0, attempt - 1))
        if self.jitter <= 0:
            return base
        return base * (1.0 - self.jitter * random.random())


def consumer_name(node: str) -> str:
    """The durable consumer of ``node`` on the task stream."""
    return f"tasks-{check_node_id(node)}"


# -- the worker -----------------------------------------------------------------------------------


class TaskWorker:
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
        queue = getattr(getattr(sub, "_sub", None), "_pending_queue", None)
        if not isinstance(queue, asyncio.Queue):
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
                self._trouble(f"fetching tasks failed: {_describe(exc)}; retrying{hint}")
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
            await self._reject(msg, f"undecodable: {_describe(exc)}")
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
            outcome = TaskOutcome.failed(_describe(exc))
        except Exception as exc:
            _log.info("node %s: %s task %s raised: %s", self.node, task.kind, task.id, exc)
            outcome = TaskOutcome.retry(_describe(exc))
        finally:
            del self._running[task.id]
        future.set_result(outcome)
        return outcome

    async def _keep_alive(self, msg: Msg) -> None:
        while True:
            await asyncio.sleep(self._heartbeat)
            with contextlib.suppress(nats.errors.Error):
                await msg.in_progress()

    async def _report(
        self,
        msg: Msg,
        envelope: Envelope,
        task: Task,
        outcome: TaskOutcome,
        event_type: str,
        started: float,
        *,
        permanent: bool = False,
    ) -> None:
        """Publish the final outcome, then ack; if the report fails, release for a retry.

        ``permanent`` (in TaskFailed) tells a failure retrying cannot fix from one that ran out of
        attempts, so the controller knows whether the same work elsewhere may succeed.
        """
        duration = round(time.monotonic() - started, 6)
        report: TaskCompleted | TaskFailed
        if event_type == TASK_COMPLETED:
            report = TaskCompleted(
                task_id=task.id,
                action=task.kind,
                node=task.node,
                root=task.root,
                volume=task.volume,
                attempts=task.attempt,
                duration=duration,
                result=dict(outcome.result),
            )
        else:
            report = TaskFailed(
                task_id=task.id,
                action=task.kind,
                node=task.node,
                root=task.root,
                volume=task.volume,
                attempts=task.attempt,
                reason=outcome.reason[:_MAX_REASON],
                permanent=permanent,
                duration=duration,
            )
        body = report.body()
        event = _event(envelope, event_type, body, msg)
        try:
            await self._publish_event(event)
        except Exception as exc:
            # Not reported means not done: redeliver; the handler is idempotent.
            _log.warning(
                "node %s: could not report %s of %s: %s", self.node, event_type, task.id, exc
            )
            await self._settle(msg, task, outcome, "released", started, self._backoff.delay(1))
            return
        try:
            await msg.ack_sync(timeout=5.0)
        except (nats.errors.Error, OSError) as exc:
            # Reported but not acked: the stream redelivers, the handler runs again harmlessly and
            # the repeated event carries the same id, so the event store drops it as a duplicate.
            _log.warning("node %s: ack of task %s failed: %s", self.node, task.id, exc)
        action: Literal["completed", "failed"] = (
            "completed" if event_type == TASK_COMPLETED else "failed"
        )
        if action == "completed":
            self.stats.completed += 1
        else:
            self.stats.failed += 1
            _log.warning(
                "node %s: %s task %s failed: %s", self.node, task.kind, task.id, outcome.reason
            )
        self._notify(TaskResult(task, outcome, action, duration))

    async def _settle(
        self,
        msg: Msg,
        task: Task,
        outcome: TaskOutcome,
        action: Literal["retry", "released"],
        started: float,
        delay: float | None = None,
    ) -> None:
        """NAK for redelivery: after a back-off for a retry, at once (or ``delay``) otherwise."""
        if delay is None:
            delay = self._backoff.delay(task.attempt) if action == "retry" else 0.0
        with contextlib.suppress(nats.errors.Error, OSError):
            await msg.nak(delay=delay or None)
        if action == "retry":
            self.stats.retried += 1
        else:
            self.stats.released += 1
        self._notify(TaskResult(task, outcome, action, time.monotonic() - started, delay))

    async def _reject(self, msg: Msg, reason: str) -> None:
        """A malformed or foreign message: count, log, report if an id is known, terminate."""
        self.stats.malformed += 1
        headers = msg.headers or {}
        seq = _stream_sequence(msg)
        _log.warning(
            "node %s: rejected malformed task message (stream seq %s, id %s): %s",
            self.node,
            seq,
            headers.get(MSG_ID),
            reason,
        )
        cause = _readable_cause(msg, self.node)
        if cause is not None:
            body = TaskFailed(
                task_id=cause.id,
                action=None,
                node=self.node,
                root=None,
                volume=None,
                attempts=1,
                reason=f"malformed task message: {reason}"[:_MAX_REASON],
                permanent=True,
            ).body()
            try:
                await self._publish_event(_event(cause, TASK_FAILED, body, msg))
            except Exception as exc:
                _log.warning("node %s: could not report malformed task: %s", self.node, exc)
        with contextlib.suppress(nats.errors.Error, OSError):
            await msg.term()

    def _notify(self, result: TaskResult) -> None:
        if self._on_result is None:
            return
        try:
            self._on_result(result)
        except Exception:
            _log.exception("node %s: task result observer failed", self.node)


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _stream_sequence(msg: Msg) -> int | None:
    try:
        return int(msg.metadata.sequence.stream)
    except Exception:
        return None


def _event(cause: Envelope, event_type: str, body: dict[str, Value], msg: Msg) -> Envelope:
    """An event caused by the task's envelope, with an id stable across redeliveries.

    The id is derived from the task id and the stream sequence of the task message: a redelivered
    message (reported, then not acked) yields the same id, which the event store drops as a
    duplicate; the same task queued again later (a new message) reports anew.
    """
    event = cause.caused(Content("event", event_type, body))
    seq = _stream_sequence(msg)
    if seq is None:
        return event
    return replace(event, id=f"{cause.id}.{seq}.{event_type}")


def _readable_cause(msg: Msg, node: str) -> Envelope | None:
    """The envelope to cause a TaskFailed for a malformed message, if any id can be read."""
    with contextlib.suppress(Exception):
        return decode(msg.data)
    headers = msg.headers or {}
    message_id = headers.get(MSG_ID)
    if not message_id:
        return None
    correlation = headers.get(CORRELATION) or message_id
    return Envelope(message_id, correlation, None, node, Content("command", "Unknown"))

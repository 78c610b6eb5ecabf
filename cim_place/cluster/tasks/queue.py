"""The task stream and the producer side: the controller queues work for one node's agent.

:func:`ensure_task_stream` creates the work-queue stream
``CIM_PLACE_TASKS`` in the hub domain; :class:`TaskQueue` publishes a task on the subject of its
node, and reads back the tasks still in the stream (:meth:`TaskQueue.queued`): an agent acks a
task only after its report is durable, so those are the tasks no report has ended yet, whoever
enqueued them.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from dataclasses import dataclass, replace

import nats.errors
import nats.js.errors
from nats.js import JetStreamContext
from nats.js.api import RetentionPolicy, StorageType, StreamConfig

from cim_place.cluster.nats.envelope import Envelope, EnvelopeError, decode
from cim_place.cluster.nats.subjects import TASKS_STREAM, Subjects
from cim_place.cluster.tasks.model import Task, decode_task, task_envelope
from cim_place.errors import TransportError

__all__ = [
    "DEFAULT_DUPLICATE_WINDOW",
    "Enqueued",
    "TaskQueue",
    "ensure_task_stream",
]

_log = logging.getLogger(__name__)

READERS = 16
"""Parts of the stream :meth:`TaskQueue.queued` reads at once (each a chain of requests)."""
DEFAULT_DUPLICATE_WINDOW = 3600.0
"""Seconds within which a repeated enqueue of the same task id is dropped by the stream.

Longer than the controller's periodic full pass, so a pass that re-derives the same tasks at the
same desired-state revision does not queue them again while they wait.
"""


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

    async def queued(self, limit: int) -> list[tuple[Task, float]]:
        """The tasks still in the stream (no report has ended them), oldest first, with the time
        the stream stored each; at most ``limit``.

        One request per message (the stream's next message after the last one read), so this is
        for a new leader's start, not a hot path; :data:`READERS` parts of the stream's
        sequences are read at once. A message that is not a task is skipped with a warning: the
        agent's worker terminates it when it is delivered.
        """
        try:
            state = (await self._js.stream_info(TASKS_STREAM)).state
            if not state.messages:
                return []
            first, span = state.first_seq, state.last_seq - state.first_seq + 1
            parts = min(READERS, span)
            bounds = [first + span * i // parts for i in range(parts + 1)]
            read = await asyncio.gather(
                *(self._read(low, high, limit) for low, high in itertools.pairwise(bounds))
            )
        except nats.errors.Error as exc:
            raise TransportError(f"could not read the tasks in {TASKS_STREAM}: {exc}") from exc
        return [found for part in read for found in part][:limit]

    async def _read(self, low: int, high: int, limit: int) -> list[tuple[Task, float]]:
        """Up to ``limit`` tasks stored at sequences ``low`` to ``high - 1``, in order."""
        found: list[tuple[Task, float]] = []
        sequence = low
        while sequence < high and len(found) < limit:
            try:
                msg = await self._js.get_msg(
                    TASKS_STREAM, seq=sequence, subject=self._subjects.all_tasks, next=True
                )
            except nats.js.errors.NotFoundError:
                break
            if msg.seq is None or msg.seq >= high:
                break
            sequence = msg.seq + 1
            try:
                task = decode_task(decode(msg.data or b""))
            except EnvelopeError as exc:
                _log.warning("%s message %d is not a task: %s", TASKS_STREAM, msg.seq, exc)
                continue
            found.append((task, msg.time.timestamp() if msg.time else time.time()))
        return found

"""How the task worker settles a task message: the outcome event, then the ack or the NAK.

This module owns :class:`OutcomeReporter`, the part of
:class:`~cim_place.cluster.tasks.worker.TaskWorker` that ends a delivery: a final outcome is
published as ``TaskCompleted`` / ``TaskFailed`` (caused by the task's envelope, with an id stable
across redeliveries) and acked only once that report is durable; a retry or a release is NAKed
with its back-off; a malformed message is counted, reported when an id can be read, and
terminated. It also owns the worker's counters (:class:`WorkerStats`).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Literal

import nats.errors
import nats.js.errors
from nats.aio.msg import Msg

from cim_place.cluster.events.types import TaskCompleted, TaskFailed
from cim_place.cluster.nats.envelope import (
    CORRELATION,
    MSG_ID,
    Content,
    Envelope,
    decode,
)
from cim_place.cluster.tasks.model import (
    TASK_COMPLETED,
    TASK_FAILED,
    Task,
)
from cim_place.cluster.tasks.outcome import (
    Backoff,
    TaskOutcome,
    TaskResult,
)
from cim_place.objectstore.dagcbor import Value

__all__ = ["EventPublisher", "OutcomeReporter", "WorkerStats", "describe_error"]

_log = logging.getLogger(__name__)

_MAX_REASON = 1000

EventPublisher = Callable[[Envelope], Awaitable[None]]
"""Persists an event envelope (the event store); returns only once it is durable."""


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


class OutcomeReporter:
    """Mixin of :class:`~cim_place.cluster.tasks.worker.TaskWorker`: reports and settles tasks."""

    # Set by TaskWorker.__init__.
    node: str
    stats: WorkerStats
    _publish_event: EventPublisher
    _backoff: Backoff
    _on_result: Callable[[TaskResult], None] | None

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


def describe_error(exc: BaseException) -> str:
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

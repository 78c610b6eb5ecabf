"""Tasks in flight and failures in the controller's projection.

This module owns :class:`TaskBook`: the tasks the controller enqueued and for which no report
arrived yet (by id and by CID, with :attr:`TaskBook.task_changes` for the controller's cached
budget), their expiry when a report was lost, and the failures per CID and ``(kind, node,
volume)`` whose count is the generation of the next such task (a retry gets a new id). A
``TaskCompleted`` / ``TaskFailed`` ends a task here (:meth:`TaskBook._task_ended`, called by
:meth:`~cim_place.cluster.controller.projection.Projection.apply_event`).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from cim_place.cluster.controller.projection_columns import ObjectColumns
from cim_place.cluster.events.types import TaskCompleted, TaskFailed
from cim_place.cluster.nats.envelope import Envelope
from cim_place.cluster.tasks.model import Task
from cim_place.objectstore.cid import Cid

__all__ = ["FailureKey", "LastFailure", "TaskBook", "TaskInFlight"]

FailureKey = tuple[str, str, str | None]
"""``(task kind, node, volume)`` of a failed task, per CID."""


@dataclass(frozen=True, slots=True)
class TaskInFlight:
    """A task the controller enqueued and for which no TaskCompleted / TaskFailed arrived yet."""

    id: str
    kind: str
    node: str
    root: Cid
    volume: str | None
    enqueued_at: float
    repair_policy: str | None = None
    """The policy whose ``repair.max_concurrent`` this task counts against (None: no repair)."""


@dataclass(frozen=True, slots=True)
class LastFailure:
    """The most recent TaskFailed of one (kind, node, volume) of a CID."""

    at: float
    permanent: bool
    reason: str


class TaskBook(ObjectColumns):
    """Tasks in flight and failures per CID (see
    :class:`~cim_place.cluster.controller.projection.Projection`)."""

    def __init__(self) -> None:
        super().__init__()
        self._tasks: dict[str, TaskInFlight] = {}
        self._tasks_by_cid: dict[bytes, set[str]] = {}
        self.task_changes = 0
        """Bumped whenever a task starts or ends: what the controller's cached budget checks."""
        self._failures: dict[bytes, dict[FailureKey, int]] = {}
        self._last_failure: dict[bytes, dict[FailureKey, LastFailure]] = {}

    def tasks_for(self, cid: Cid) -> tuple[TaskInFlight, ...]:
        """Tasks in flight about ``cid``, in the order they were enqueued."""
        ids = self._tasks_by_cid.get(cid, ())
        return tuple(sorted((self._tasks[i] for i in ids), key=lambda t: t.enqueued_at))

    def task(self, task_id: str) -> TaskInFlight | None:
        return self._tasks.get(task_id)

    def in_flight(self) -> Iterator[TaskInFlight]:
        """Every task in flight (for the controller's rate limits)."""
        return iter(self._tasks.values())

    @property
    def tasks_in_flight(self) -> int:
        return len(self._tasks)

    def failures(self, cid: Cid) -> Mapping[FailureKey, int]:
        """Failed tasks about ``cid``: ``(kind, node, volume) -> count``."""
        return dict(self._failures.get(cid, {}))

    def generation(self, cid: Cid, kind: str, node: str, volume: str | None) -> int:
        """The generation for the next such task: the number of failures of that task so far.

        A task that failed keeps its deterministic id for its generation; bumping the generation
        gives the retry a new id, so JetStream's duplicate window does not drop it.
        """
        return self._failures.get(cid, {}).get((kind, node, volume), 0)

    def last_failure(self, cid: Cid, key: FailureKey) -> LastFailure | None:
        """When the last failure of that task happened, whether it was permanent, and why."""
        return self._last_failure.get(cid, {}).get(key)

    def clear_failures(self, cid: Cid) -> None:
        """Forget the failures of ``cid`` (for example once it is placed again)."""
        self._failures.pop(cid, None)
        self._last_failure.pop(cid, None)

    def _task_ended(
        self, event: TaskCompleted | TaskFailed, envelope: Envelope, sequence: int, at: float
    ) -> set[Cid]:
        task = self._tasks.pop(event.task_id, None)
        if task is None and envelope.causation_id is not None:
            task = self._tasks.pop(envelope.causation_id, None)
        root = event.root if event.root is not None else (task.root if task else None)
        if task is not None:
            self._unindex_task(task)
        if root is None:
            return set()
        if isinstance(event, TaskFailed):
            kind = event.action or (task.kind if task else None)
            if kind is not None:
                volume = event.volume
                if volume is None and task is not None:
                    volume = task.volume
                key: FailureKey = (kind, event.node, volume)
                per_cid = self._failures.setdefault(root, {})
                per_cid[key] = per_cid.get(key, 0) + 1
                self._last_failure.setdefault(root, {})[key] = LastFailure(
                    at, event.permanent, event.reason
                )
        slot = self._index.get(root)
        if slot is not None and sequence:
            self._set_sequence(slot, sequence)
        return {root}

    # -- tasks ------------------------------------------------------------------------------------

    def task_enqueued(self, task: Task, now: float, *, repair_policy: str | None = None) -> None:
        """Record a task the controller just enqueued; a TaskCompleted/TaskFailed ends it.
        ``repair_policy``: the policy whose repair limit the task counts against, if any."""
        self._tasks[task.id] = TaskInFlight(
            task.id, task.kind, task.node, task.root, task.volume, now, repair_policy
        )
        self._tasks_by_cid.setdefault(task.root, set()).add(task.id)
        self.task_changes += 1

    def task_withdrawn(self, task_id: str) -> None:
        """Forget a task recorded by :meth:`task_enqueued` that the hub did not take after all."""
        task = self._tasks.pop(task_id, None)
        if task is not None:
            self._unindex_task(task)

    def expire_tasks(self, older_than: float) -> set[Cid]:
        """Forget tasks enqueued before ``older_than`` (their report was lost); their CIDs."""
        stale = [t for t in self._tasks.values() if t.enqueued_at < older_than]
        for task in stale:
            del self._tasks[task.id]
            self._unindex_task(task)
        return {t.root for t in stale}

    def _unindex_task(self, task: TaskInFlight) -> None:
        self.task_changes += 1
        ids = self._tasks_by_cid.get(task.root)
        if ids is not None:
            ids.discard(task.id)
            if not ids:
                del self._tasks_by_cid[task.root]

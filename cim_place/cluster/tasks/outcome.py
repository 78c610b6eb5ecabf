"""What becomes of a task: the handler contract, its outcome, the worker's result and back-off.

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

import random
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Literal

from cim_place.cluster.tasks.model import Task
from cim_place.errors import CimPlaceError, StoreFullError
from cim_place.objectstore.dagcbor import Value

__all__ = [
    "Backoff",
    "PermanentTaskError",
    "TaskHandler",
    "TaskOutcome",
    "TaskResult",
]


class PermanentTaskError(CimPlaceError):
    """Raised by a task handler for a failure that retrying cannot fix; the task fails at once."""


# Errors a handler may raise that mean "do not retry".
_PERMANENT_ERRORS: tuple[type[BaseException], ...] = (PermanentTaskError, StoreFullError)


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

"""Stopping background tasks reliably.

nats-py (2.16) may swallow a CancelledError that lands while a publish wakes its flusher, so a
single ``task.cancel()`` is sometimes lost and a loop keeps running; every service stops its
tasks through :func:`cancel_and_wait`, which cancels until the task has ended.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable


async def cancel_and_wait(tasks: Iterable[asyncio.Task[None]], *, every: float = 0.5) -> None:
    """Cancel ``tasks`` (again every ``every`` seconds) until each has ended."""
    everything = list(tasks)
    pending = {task for task in everything if not task.done()}
    while pending:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=every)
    for task in everything:
        # Retrieve each outcome so asyncio does not log "exception was never retrieved".
        with contextlib.suppress(asyncio.CancelledError, Exception):
            task.result()

"""The reconcile loop: which objects are reconciled when, and how many at once.

This module owns :class:`ControllerLoop`: the loop over the dirty CIDs (leader only; a standby
keeps the marks), walks of every object (an election, the full pass) a chunk at a time with the
marks made meanwhile taken between chunks, spaced by their own length when the full pass asks
for them, the warning when walks last longer than the full pass, reading a predecessor's tasks
in flight back after an election, and :data:`RECONCILE_WINDOW` reconciles in flight at once.
One object's reconcile is :mod:`cim_place.cluster.controller.reconcile_pass`.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Iterable

import nats.errors

from cim_place.cluster.controller.reconcile_pass import ControllerReconcile
from cim_place.errors import CimPlaceError, TransportError
from cim_place.objectstore.cid import Cid, to_str

__all__ = ["ADOPT_AT_MOST", "RECONCILE_WINDOW", "WALK_WARN_EVERY", "ControllerLoop"]

_log = logging.getLogger(__name__)

RECONCILE_WINDOW = 32
"""Reconciles one pass keeps in flight (each mostly waits on the hub: see ``_reconcile_each``)."""
WALK_WARN_EVERY = 3600.0
"""Seconds between two warnings that walks of every object last longer than the full pass."""
ADOPT_AT_MOST = 100_000
"""Tasks a new leader reads back from the task stream, and at most twice ``max_tasks``: the
leaders keep no more than that in flight together (10,000 take about 2 s: TaskQueue.queued)."""


class ControllerLoop(ControllerReconcile):
    """The controller's reconcile loop (see :class:`ControllerState`)."""

    async def _reconcile_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            if not self._acting or not self.caught_up.is_set():
                # A standby (or a leader still reading history) keeps the marks for later.
                if not self.caught_up.is_set():
                    await self.caught_up.wait()
                    self._wake.set()
                continue
            if self._adopt_due:
                self._adopt_due = False
                await self._adopt_tasks()
            batch, self._dirty = self._dirty, set()
            if self._all_dirty:
                # Every CID (the marks taken above are among them).
                self._all_dirty = False
                if not await self._timed_walk():
                    self._all_dirty = True
                    continue
            if not await self._reconcile_each([list(batch)]):
                self._dirty.update(batch)

    async def _adopt_tasks(self) -> None:
        """Count the tasks in flight that a previous leader enqueued (read from the task stream)
        against the limits, as if this process had enqueued them.

        Without this, a new leader (or a process taking a shard over) knew only its own tasks
        and could issue a whole limit's worth beside its predecessor's until their reports came
        in. A task whose report was applied before its message was acked is counted once more
        and forgotten at the next full pass after ``task_timeout``, like a lost report.
        """
        assert self._queue is not None
        try:
            limit = self.config.max_tasks
            queued = await self._queue.queued(
                ADOPT_AT_MOST if limit <= 0 else min(ADOPT_AT_MOST, 2 * limit)
            )
        except TransportError as exc:
            _log.warning("could not read the tasks in flight: %s; each counts when it reports", exc)
            return
        adopted = 0
        for task, at in queued:
            if (
                self.projection.task(task.id) is not None
                or task.root not in self.projection
                or not self.leads(task.root)
            ):
                continue
            # A repair's fetch carries its policy's bandwidth (a ``repair`` task is one anyway);
            # a repair fetch without a bandwidth counts as a plain fetch here.
            repair = task.kind == "repair" or task.rate_limit is not None
            policy = self._policy(task.root) if repair else None
            self.projection.task_enqueued(task, at, repair_policy=policy)
            adopted += 1
        if adopted:
            _log.info("controller %s counts %d tasks in flight from before", self.identity, adopted)

    async def _timed_walk(self) -> bool:
        """:meth:`_walk_all`, timed. The full pass spaces the walks it asks for by their length
        (:meth:`walk_wanted`); a walk longer than the full pass's period means the period is
        not what the operator set, who is told, at most once an hour."""
        started = time.monotonic()
        self._walking = True
        try:
            if not await self._walk_all():
                return False
        finally:
            self._walking = False
        ended = time.monotonic()
        took = ended - started
        self._walk_ended, self._walk_took = ended, took
        self.metrics.walk_seconds.set(took)
        if took > self.config.full_pass_every and started - self._walk_warned >= WALK_WARN_EVERY:
            self._walk_warned = started
            _log.warning(
                "a walk of every object (%d) took %.0f s, longer than full_pass (%.0f s): full "
                "passes start a walk at most every %.0f s (each walk, then as long without); set "
                "full_pass to at least that (docs/SCALE.md)",
                len(self.projection),
                took,
                self.config.full_pass_every,
                math.ceil(2 * took),
            )
        return True

    def walk_wanted(self, now: float) -> bool:
        """Whether a full pass at ``now`` (monotonic) asks for a walk of every object: not
        while one is under way or asked for, nor sooner after the last one ended than it
        lasted. At millions of objects a walk outlasts the full pass's period (a walk of 10M
        objects takes hours), and a walk asked for at every pass kept a core busy for good;
        spaced so, walks take at most half the leader's time. Elections, policy changes and
        every event still mark what they concern at once."""
        if self._walking or self._all_dirty:
            return False
        return now - self._walk_ended >= self._walk_took

    async def _walk_all(self) -> bool:
        """Reconcile every CID, a chunk at a time; False if leadership was lost on the way.

        Marks made during the walk (an upload, a task report, a node turning down) are taken
        before each next chunk: at millions of objects a walk lasts minutes to hours (about
        1,200 objects/s per shard measured), and an election or the full pass starts one, so
        new work must not wait for its end. A walk cut short (leadership lost, or a new walk
        asked for) resumes where it stopped and goes round to there: restarted from the first
        slot each time, walks cut shorter than they last would never reach the last objects.
        """
        for after, chunk in self.projection.cid_chunks(start=self._walk_cursor):
            if self._dirty:
                urgent, self._dirty = self._dirty, set()
                if not await self._reconcile_each([list(urgent)]):
                    self._dirty.update(urgent)
                    return False
            if not await self._reconcile_each([chunk]):
                return False
            self._walk_cursor = after
        return True

    async def _reconcile_each(self, chunks: Iterable[list[Cid]]) -> bool:
        """Reconcile the CIDs of ``chunks``, :data:`RECONCILE_WINDOW` at a time; False if
        leadership was lost on the way.

        Each reconcile waits on the hub several times (its status read and written, each task's
        enqueue acknowledged): one at a time, a backlog's ingest was bound by those round trips,
        not by the CPU. Reconciles of different CIDs share only the rate limits, which each
        takes before it awaits (:meth:`reconcile_one`); a CID is never in two reconciles of one
        pass, since the CIDs of one call are distinct.
        """
        pending = (cid for chunk in chunks for cid in chunk)
        lost = False

        async def work() -> None:
            nonlocal lost
            # One shared generator: each CID is taken by exactly one worker (``next`` never
            # awaits, so no two workers are inside it at once).
            for cid in pending:
                if lost or not self._acting:
                    lost = True
                    return
                if self.sharding is not None and not self.sharding.leads(cid):
                    continue  # another shard's: a takeover of that shard marks it again
                try:
                    await self.reconcile_one(cid)
                except (CimPlaceError, nats.errors.Error, TimeoutError) as exc:
                    _log.warning("reconcile of %s: %s; retrying shortly", to_str(cid), exc)
                    self._requeue(cid, 1.0)
                except Exception:
                    # A bug must cost one object a retry, never the whole loop.
                    _log.exception("reconcile of %s failed; retrying shortly", to_str(cid))
                    self._requeue(cid, 5.0)
                # Let events and heartbeats in between objects.
                await asyncio.sleep(0)

        await asyncio.gather(*(work() for _ in range(RECONCILE_WINDOW)))
        # Also when every CID was taken before the loss: a reconcile deposed halfway stops.
        return not lost and self._acting

"""The agent's durability service: background scrub of each volume, damage reports, and the
``scrub`` request an operator sends (``cim-place scrub``).

- Each volume has a :class:`~cim_place.objectstore.scrub.VolumeScrubber` and a
  :class:`~cim_place.objectstore.scrub.Foreground` that reads, fetches and block serving mark,
  so the scrub yields to them. A loop per volume starts a pass when one is due
  (``scrub.interval`` after the last full pass ended, or an interrupted pass to resume).
- Damage is reported wherever it is seen: by a scrub, by the block server refusing a corrupt
  block (:meth:`ScrubService.suspect`, which re-checks the pinned roots naming that block), by a
  read or a fetch (:meth:`ScrubService.report`). Each report marks the replica damaged in the
  volume's scrub state and publishes ``ReplicaDamaged`` (one event per kind of problem).
- ``<prefix>.agent.<node>.scrub`` runs a full pass of every volume now and answers with the
  report as JSON: ``{"node", "blocks_checked", "bytes_checked", "damaged": [...]}`` or
  ``{"error": ...}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

from cim_place.cluster.agent.metrics import AgentMetrics
from cim_place.cluster.events.types import ReplicaDamaged
from cim_place.cluster.nats.subjects import Subjects
from cim_place.errors import CimPlaceError, CorruptBlockError
from cim_place.objectstore import dag
from cim_place.objectstore.cid import Cid, to_str
from cim_place.objectstore.scrub import Damage, Foreground, Problem, ScrubReport, VolumeScrubber
from cim_place.objectstore.store import ObjectStore

_log = logging.getLogger(__name__)

CHECK_EVERY = 60.0
"""Seconds between two looks at whether a volume's pass is due."""

Publish = Callable[[ReplicaDamaged], Awaitable[None]]


class ScrubService:
    """Scrubs the node's volumes and reports damage. ``await start()``, ``await stop()``."""

    def __init__(
        self,
        nc: Any,
        node: str,
        volumes: dict[str, ObjectStore],
        publish: Publish,
        *,
        rate: int,
        interval: float,
        metrics: AgentMetrics,
        subjects: Subjects | None = None,
    ) -> None:
        self.nc = nc
        self.node = node
        self.volumes = volumes
        self.publish = publish
        self.interval = interval
        self.metrics = metrics
        self.subjects = subjects if subjects is not None else Subjects()
        self.foreground = {name: Foreground() for name in volumes}
        self.scrubbers = {
            name: VolumeScrubber(store, rate=rate, foreground=self.foreground[name])
            for name, store in volumes.items()
        }
        self._stop = threading.Event()
        # Set to end a background pass early (at the end of a root): on stop, or when an
        # operator's pass wants the volume.
        self._interrupt = threading.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._sub: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ondemand = asyncio.Lock()
        self._suspects: set[Cid] = set()
        self._suspecting: asyncio.Task[None] | None = None
        for name, scrubber in self.scrubbers.items():
            last = scrubber.last_full_pass()
            if last is not None:
                metrics.scrub_last_full_pass.labels(name).set(last)

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._sub = await self.nc.subscribe(
            self.subjects.agent_scrub(self.node), cb=self._on_request
        )
        self._tasks = [
            asyncio.create_task(self._background(name), name=f"cim-place-scrub-{name}")
            for name in self.scrubbers
        ]

    async def stop(self) -> None:
        self._stop.set()
        self._interrupt.set()
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
            self._sub = None
        if self._suspecting is not None:
            self._tasks.append(self._suspecting)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks = []
        for scrubber in self.scrubbers.values():
            scrubber.close()

    @contextlib.contextmanager
    def busy(self, volume: str | None = None) -> Iterator[None]:
        """Mark foreground work on ``volume`` (every volume when None) for the scrub to yield."""
        with contextlib.ExitStack() as stack:
            for name, foreground in self.foreground.items():
                if volume is None or name == volume:
                    stack.enter_context(foreground.busy())
            yield

    def touch(self) -> None:
        """A short foreground operation (a block served) happened on some volume."""
        for foreground in self.foreground.values():
            foreground.touch()

    # -- passes ---------------------------------------------------------------------------------

    async def _background(self, name: str) -> None:
        scrubber = self.scrubbers[name]
        while not self._stop.is_set():
            if scrubber.due(self.interval) and not self._ondemand.locked():
                try:
                    report = await asyncio.to_thread(
                        scrubber.run_pass, stop=self._interrupt, on_damage=self._damage_cb(name)
                    )
                    self._observe(name, report)
                except CimPlaceError as exc:
                    _log.warning("scrub of volume %s: %s", name, exc)
            await asyncio.sleep(min(CHECK_EVERY, max(1.0, self.interval / 10)))

    async def run_now(self) -> ScrubReport:
        """A full pass of every volume now (waits for a background pass to reach a root end)."""
        async with self._ondemand:
            self._interrupt.set()
            try:
                return await self._run_now()
            finally:
                if not self._stop.is_set():
                    self._interrupt.clear()

    async def _run_now(self) -> ScrubReport:
        total = ScrubReport(started_at=time.time())
        for name, scrubber in self.scrubbers.items():
            report = await asyncio.to_thread(
                scrubber.run_pass, resume=False, on_damage=self._damage_cb(name)
            )
            self._observe(name, report)
            total.blocks_checked += report.blocks_checked
            total.bytes_checked += report.bytes_checked
            total.roots_checked += report.roots_checked
            total.damaged.extend(report.damaged)
        total.complete = True
        total.finished_at = time.time()
        return total

    def _observe(self, volume: str, report: ScrubReport) -> None:
        self.metrics.scrub_bytes.labels(volume).inc(report.bytes_checked)
        self.metrics.scrub_blocks.labels(volume).inc(report.blocks_checked)
        if report.complete and report.finished_at is not None:
            self.metrics.scrub_last_full_pass.labels(volume).set(report.finished_at)
        _log.info(
            "scrub of volume %s: %d blocks, %d bytes, %d damaged%s",
            volume,
            report.blocks_checked,
            report.bytes_checked,
            len(report.damaged),
            "" if report.complete else " (stopped; resumes later)",
        )

    def _damage_cb(self, volume: str) -> Callable[[Cid, list[Damage]], None]:
        """Called in the scrub's thread: hand the damage to the event loop to publish."""

        def found(root: Cid, damage: list[Damage]) -> None:
            if self._loop is None:
                return
            fut = asyncio.run_coroutine_threadsafe(
                self._publish(root, volume, damage, "scrub"), self._loop
            )
            with contextlib.suppress(Exception):
                fut.result(timeout=30)

        return found

    # -- damage seen elsewhere ------------------------------------------------------------------

    async def report(
        self, root: Cid, volume: str, damage: list[tuple[Cid, Problem]], found_by: str
    ) -> None:
        """Damage of ``root`` on ``volume`` seen by a read or a fetch: record and publish."""
        scrubber = self.scrubbers[volume]
        await asyncio.to_thread(scrubber.state.mark_damaged, root, damage)
        await self._publish(root, volume, [Damage(root, b, p) for b, p in damage], found_by)

    async def recheck(self, root: Cid, volume: str) -> None:
        """Re-check ``root`` on ``volume`` if damage of it is recorded; report what remains."""
        scrubber = self.scrubbers.get(volume)
        if scrubber is None or not await asyncio.to_thread(scrubber.state.damage_of, root):
            return
        _, _, damage = await asyncio.to_thread(scrubber.check_root, root)
        if damage:
            await self._publish(root, volume, damage, "pin")

    def suspect(self, block: Cid) -> None:
        """A read (serving a peer, the gateway) met ``block`` corrupt: re-check the pinned roots
        naming it (callable from any thread; the check runs in a worker thread). A burst of
        refused blocks (one peer's fetch meets many) costs one look at the pins, not one per
        block."""
        if self._loop is not None:
            # Thread-safe: the gateway reads blocks in worker threads.
            self._loop.call_soon_threadsafe(self._suspect_soon, block)

    def _suspect_soon(self, block: Cid) -> None:
        assert self._loop is not None
        self._suspects.add(block)
        if self._suspecting is None or self._suspecting.done():
            self._suspecting = self._loop.create_task(self._check_suspects())

    async def _check_suspects(self) -> None:
        while self._suspects:
            blocks, self._suspects = self._suspects, set()
            for name, store in self.volumes.items():
                scrubber = self.scrubbers[name]

                def roots_with(store: ObjectStore = store, blocks: set[Cid] = blocks) -> list[Cid]:
                    return [
                        root
                        for root in store.pins.roots()
                        if blocks & dag.members(store.blocks, root)[0]
                    ]

                for root in await asyncio.to_thread(roots_with):
                    _, _, damage = await asyncio.to_thread(scrubber.check_root, root)
                    if damage:
                        await self._publish(root, name, damage, "serve")

    async def _publish(self, root: Cid, volume: str, damage: list[Damage], found_by: str) -> None:
        by_problem: dict[Problem, list[Cid]] = {}
        for item in damage:
            by_problem.setdefault(item.problem, []).append(item.block)
        for problem, blocks in sorted(by_problem.items()):
            self.metrics.damaged_blocks.labels(problem).inc(len(blocks))
            _log.error(
                "replica of %s on volume %s is damaged: %d %s block(s), first %s (found by %s)",
                to_str(root),
                volume,
                len(blocks),
                problem,
                to_str(blocks[0]),
                found_by,
            )
            try:
                await self.publish(
                    ReplicaDamaged(
                        root=root,
                        node=self.node,
                        volume=volume,
                        blocks=tuple(blocks),
                        problem=problem,
                        found_by=found_by,
                    )
                )
            except Exception as exc:  # the scrub state keeps it; the next pass reports again
                _log.warning("could not publish damage of %s: %s", to_str(root), exc)

    # -- the operator's request -----------------------------------------------------------------

    async def _on_request(self, msg: Any) -> None:
        if not msg.reply:
            return
        try:
            report = await self.run_now()
            answer: dict[str, object] = {"node": self.node, **report.as_json()}
        except Exception as exc:
            answer = {"node": self.node, "error": str(exc)}
        with contextlib.suppress(Exception):
            await self.nc.publish(msg.reply, json.dumps(answer).encode())


class ForegroundReads:
    """A block source whose every read counts as foreground work (serving peers, the gateway),
    so the scrub yields while the node serves; a read that meets a corrupt block is reported
    to ``on_corrupt`` (the error still reaches the reader: nothing corrupt is returned)."""

    def __init__(
        self,
        source: Any,
        touch: Callable[[], None],
        on_corrupt: Callable[[Cid], None] | None = None,
    ) -> None:
        self._source = source
        self._touch = touch
        self._on_corrupt = on_corrupt

    def has(self, cid: Cid) -> bool:
        return bool(self._source.has(cid))

    def get(self, cid: Cid) -> bytes:
        self._touch()
        try:
            data: bytes = self._source.get(cid)
        except CorruptBlockError:
            if self._on_corrupt is not None:
                self._on_corrupt(cid)
            raise
        return data

"""The invariants a chaos run checks at its end, once the workload and the faults have stopped.

This module owns invariants 3 to 5 of :mod:`cim_place.local.chaos`: every acknowledged object
converges to ``placed`` and reads back identical (``_converge``), no object reports more verified
copies than the volumes hold (``_check_copies``, checked on disk), no forged claim of a copy
is still counted (``_check_forgeries``), and invariant 7: every process of the domain runs again
(``_check_running``). :class:`RunChecks` is the base of the run
(:class:`~cim_place.local.chaos.Chaos`), which holds the state they read and reads objects back.
"""

from __future__ import annotations

import asyncio
import time

from cim_place.cluster.nats.connection import connected, jetstream
from cim_place.cluster.nats.subjects import HUB_DOMAIN
from cim_place.cluster.state.locations import LocationStore
from cim_place.local.chaos_faults import holds_whole
from cim_place.local.chaos_report import Acked, Report
from cim_place.local.domain import LocalDomain
from cim_place.objectstore import cid as cids

__all__ = ["RESTART_BOUND", "SCRUB_BOUND", "RunChecks"]

SCRUB_BOUND = 90.0
"""Seconds after convergence within which damage on disk must be found and forged claims
dropped (several scrub passes and inventory checks)."""
RESTART_BOUND = 60.0
"""Seconds after the other checks within which every killed process must run again (longer
than the supervisor's back-off after a few quick exits)."""


class RunChecks:
    """The end-of-run checks of a :class:`~cim_place.local.chaos.Chaos` run, on its state."""

    domain: LocalDomain
    report: Report
    acked: list[Acked]
    phantoms: list[str]
    last_fault_end: float | None

    def _admin_url(self) -> str:
        raise NotImplementedError  # the run's: the hub URL with the CLI's credentials

    async def _get(self, acked: Acked) -> bool:
        raise NotImplementedError  # the run's: one get through the CLI, bytes compared

    async def _converge(self) -> None:
        """After the last fault: every acknowledged object placed and readable, within a bound."""
        start = time.monotonic()
        pending = list(self.acked)
        states: dict[str, str] = {}
        # Polled in this process (the state the CLI's `status` shows, without a process start per
        # object and round), so that the time printed is the domain's, not the polling's.
        async with connected(self._admin_url()) as nc:
            store = await LocationStore(jetstream(nc, HUB_DOMAIN)).open(create=False)
            while pending and time.monotonic() - start < self.report.converge_bound:
                still = []
                for acked in pending:
                    try:
                        status = await store.get(cids.parse(acked.cid))
                    except Exception as exc:
                        status, states[acked.cid] = None, f"unreadable: {exc}"
                    if status is None or status.state != "placed":
                        still.append(acked)
                        if status is not None:
                            states[acked.cid] = status.state
                pending = still
                if pending:
                    await asyncio.sleep(1.0)
        if pending:
            self.report.lost = [f"{a.cid} ({states.get(a.cid, '?')})" for a in pending]
            return
        self.report.converge_seconds = time.monotonic() - start
        if self.last_fault_end is not None:
            self.report.since_last_fault = time.monotonic() - self.last_fault_end
        for acked in self.acked:
            if not await self._get(acked):
                self.report.lost.append(acked.cid)

    async def _check_copies(self) -> None:
        """Status never counts a copy that the volumes do not hold, verified. Damage on disk is
        invisible until a scrub reads it, so an overcount must clear within ``SCRUB_BOUND``
        (a few scrub passes) to count as kept."""
        damaged = any(self.report.injected.get(k) for k in ("corrupt-block", "delete-block"))
        deadline = time.monotonic() + (SCRUB_BOUND if damaged else 0.0)
        pending = list(self.acked)
        wrong: dict[str, list[str]] = {}
        async with connected(self._admin_url()) as nc:
            store = await LocationStore(jetstream(nc, HUB_DOMAIN)).open(create=False)
            while pending:
                wrong = {}
                for acked in pending:
                    status = await store.get(cids.parse(acked.cid))
                    if status is None:
                        continue
                    reported = {loc.node for loc in status.locations if loc.state == "pinned"}
                    for node in sorted(reported):
                        if not await asyncio.to_thread(
                            holds_whole, self.domain, node, cids.parse(acked.cid)
                        ):
                            wrong.setdefault(acked.cid, []).append(node)
                pending = [a for a in pending if a.cid in wrong]
                if not pending or time.monotonic() > deadline:
                    break
                await asyncio.sleep(2.0)
        self.report.overcounted = [f"{cid}: {nodes}" for cid, nodes in wrong.items()]

    async def _check_forgeries(self) -> None:
        """A forged claim of a copy is never counted once the inventory check ran; and how many
        events the controller rejected."""
        deadline = time.monotonic() + SCRUB_BOUND
        async with connected(self._admin_url()) as nc:
            store = await LocationStore(jetstream(nc, HUB_DOMAIN)).open(create=False)
            believed = list(self.phantoms)
            while believed:
                still = []
                for phantom in believed:
                    status = await store.get(cids.parse(phantom))
                    if status is not None and any(
                        loc.state == "pinned" for loc in status.locations
                    ):
                        still.append(phantom)
                believed = still
                if not believed or time.monotonic() > deadline:
                    break
                await asyncio.sleep(2.0)
            self.report.believed = believed
            summary = await store.summary()
            self.report.rejected_events = summary.rejected_events if summary is not None else 0

    async def _check_running(self) -> None:
        """Every process of the domain runs at the end: the supervisor brought back each one a
        fault killed. A process that stays down shows first as objects that never converge;
        this names it (a leaf server killed again while it restarted once stayed down)."""
        deadline = time.monotonic() + RESTART_BOUND
        while True:
            down = [
                f"{s.role}{f' {s.node}' if s.node else ''} (last exit {s.last_exit}, "
                f"{s.restarts} restart(s))"
                for s in self.domain.supervisor.children
                if not s.held and (s.child.pid is None or s.child.returncode() is not None)
            ]
            if not down or time.monotonic() > deadline:
                break
            await asyncio.sleep(1.0)
        self.report.down = down

"""The agent's read counts for demand-driven copies: reads in, one report per interval out.

The read paths (gateway, S3, ``get``, block serving) call :meth:`DemandReporter.record_read`;
nothing is sent per read. Every ``interval`` seconds the counts of the period are published on
``<prefix>.demand.<node>`` as ``DemandReported`` events in the envelope (core NATS: a lost report
only delays a copy, so it is not worth a stream). Counting is the pure
:class:`~cim_place.placement.demand_window.ReadRecorder`; this module owns the clock and NATS.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from nats.aio.client import Client

from cim_place.cluster.nats.envelope import Content, Envelope
from cim_place.cluster.nats.subjects import Subjects
from cim_place.objectstore.cid import Cid
from cim_place.placement.demand_window import DEMAND_REPORTED, ReadRecorder

log = logging.getLogger(__name__)


class DemandReporter:
    """Counts this node's reads and publishes them at a bounded rate."""

    def __init__(
        self,
        nc: Client,
        subjects: Subjects,
        node: str,
        *,
        interval: float = 5.0,
        max_entries: int = 100_000,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.nc = nc
        self.subject = subjects.demand(node)
        self.node = node
        self.interval = interval
        self.clock = clock
        self.recorder = ReadRecorder(
            reporter=node, start=clock(), interval=interval, max_entries=max_entries
        )
        self.reports_sent = 0
        self.reads_recorded = 0
        self.reads_dropped = 0
        self.bytes_local = 0
        self.bytes_remote = 0
        self._task: asyncio.Task[None] | None = None

    def record_read(
        self,
        cid: Cid,
        reader_node: str,
        service: str = "",
        size: int = 0,
        local: bool | None = None,
    ) -> None:
        """One read of ``cid`` by ``service`` running at ``reader_node`` (this node for the
        gateway, S3 and ``get``; the requesting node for blocks served to another node).
        ``local``: served from this node's own copy (True) or fetched from others (False)."""
        self.reads_recorded += 1
        if local is True:
            self.bytes_local += size
        elif local is False:
            self.bytes_remote += size
        self.recorder.record_read(cid, reader_node, service, self.clock(), size, local)

    async def flush(self) -> int:
        """Publish what is due; returns the number of reports sent."""
        sent = 0
        for report in self.recorder.flush(self.clock()):
            self.reads_dropped += report.dropped_reads
            envelope = Envelope.new(
                Content("event", DEMAND_REPORTED, report.to_dict()), owner=self.node
            )
            await self.nc.publish(self.subject, envelope.encode(), headers=envelope.headers())
            sent += 1
        self.reports_sent += sent
        return sent

    async def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name=f"demand-{self.node}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        with contextlib.suppress(Exception):
            await self.flush()

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.flush()
            except Exception as exc:  # a broken connection must not stop the counting
                log.warning("demand report not sent: %s", exc)

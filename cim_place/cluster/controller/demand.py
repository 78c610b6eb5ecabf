"""The controller's intake of read counts: ``<prefix>.demand.*`` into a demand window.

Each report is validated before it touches the window (an envelope carrying a
``DemandReported`` event whose reporter is the node of the subject it came on); a bad one is
counted and dropped, never fatal, like a bad event. Deciding on the counts is the pure
:func:`cim_place.placement.demand.decide`, driven by :mod:`cim_place.cluster.controller.cached`;
the shape of the window and the demand metrics are here.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from cim_place.cluster.nats.envelope import EnvelopeError, decode
from cim_place.cluster.nats.subjects import Subjects
from cim_place.errors import PlacementError
from cim_place.placement.demand import DemandRule
from cim_place.placement.demand_window import DEMAND_REPORTED, DemandReport, DemandWindow

log = logging.getLogger(__name__)

DEFAULT_HORIZON = 3600.0
DEFAULT_SLOT = 60.0


def window_shape(rules: Iterable[DemandRule]) -> tuple[float, float]:
    """``(horizon, slot)`` of the controller's window for the applied rules: the horizon is the
    longest ``window`` (at least one slot), the slot a tenth of the shortest window, between 1 s
    and 60 s (a 10 s window counted in 60 s slots would forget reads at every minute)."""
    windows = [r.window for r in rules]
    if not windows:
        return DEFAULT_HORIZON, DEFAULT_SLOT
    slot = min(DEFAULT_SLOT, max(1.0, math.floor(min(windows) / 10)))
    return max(max(windows), slot), slot


class DemandIntake:
    """Subscribes to every node's read counts and folds them into ``window``."""

    def __init__(self, nc: Client, subjects: Subjects, window: DemandWindow) -> None:
        self.nc = nc
        self.subjects = subjects
        self.window = window
        self.received = 0
        self.refused = 0
        self.last_report: DemandReport | None = None
        self.on_report: Callable[[DemandReport], None] | None = None
        """Told of each report once folded in (the controller's demand decisions)."""
        self._sub: Subscription | None = None

    async def start(self) -> None:
        self._sub = await self.nc.subscribe(self.subjects.all_demand, cb=self._on_message)

    async def stop(self) -> None:
        if self._sub is not None:
            await self._sub.unsubscribe()
            self._sub = None

    async def _on_message(self, msg: Msg) -> None:
        node = msg.subject.rsplit(".", 1)[-1]
        try:
            envelope = decode(msg.data)
            if envelope.content.type != DEMAND_REPORTED:
                raise PlacementError(f"unexpected {envelope.content.type!r}")
            report = DemandReport.from_dict(dict(envelope.content.body))
            if report.reporter != node:
                raise PlacementError(f"reporter {report.reporter!r} on the subject of {node!r}")
        except (EnvelopeError, PlacementError) as exc:
            self.refused += 1
            log.warning("demand report from %s dropped: %s", node, exc)
            return
        self.window.add(report)
        self.received += 1
        self.last_report = report
        if self.on_report is not None:
            self.on_report(report)

"""What the controller refused to believe: counted, logged, never fatal.

This module owns the bookkeeping of rejected input (the checks themselves are pure and live in
``cim_place.cluster.events.validate`` and ``cim_place.cluster.state.nodes.check_node_record``):

- a Prometheus counter ``cim_place_rejected_events_total{reason}`` (node records count under
  reason ``node-record``);
- :attr:`Rejections.total` for the ``rejected_events`` of the status summary;
- one log line per rejected record naming its subject (or node key) and what was wrong, at most
  :data:`LOG_PER_SECOND` a second so that a flood of junk cannot flood the log too (the lines
  held back are counted in the next one).

A node record is read again every second while it sits in the bucket: it is counted once per
distinct problem, not once per read.
"""

from __future__ import annotations

import logging
import time

from prometheus_client import CollectorRegistry, Counter

from cim_place.cluster.events.validate import Rejection

__all__ = ["LOG_PER_SECOND", "NODE_RECORD", "Rejections"]

_log = logging.getLogger(__name__)

LOG_PER_SECOND = 20
NODE_RECORD = "node-record"


class Rejections:
    """Counts and reports rejected events and node records for one controller."""

    def __init__(self, registry: CollectorRegistry, *, prefix: str = "cim.place") -> None:
        self.prefix = prefix
        self.counter = Counter(
            "cim_place_rejected_events",
            "Events and node records the controller refused (failed validation), by reason.",
            ["reason"],
            registry=registry,
        )
        self.total = 0
        self.by_reason: dict[str, int] = {}
        self._records: dict[str, str] = {}
        self._second = 0
        self._logged = 0
        self._held = 0

    def event(self, rejection: Rejection, node: str, event_type: str = "") -> None:
        """A rejected event published by ``node`` (the subject's node token)."""
        subject = f"{self.prefix}.evt.{node[:80]}.{event_type[:80] or '*'}"
        self._count(rejection.reason, f"rejected event on {subject}: {rejection.detail}")

    def node_record(self, key: str, problem: str) -> None:
        """A node record in KV ``cim-place-nodes`` that is not believed (once per problem)."""
        if self._records.get(key) == problem:
            return
        self._records[key] = problem
        self._count(NODE_RECORD, f"rejected node record {key[:80]!r}: {problem}")

    def _count(self, reason: str, line: str) -> None:
        self.total += 1
        self.by_reason[reason] = self.by_reason.get(reason, 0) + 1
        self.counter.labels(reason).inc()
        second = int(time.monotonic())
        if second != self._second:
            if self._held:
                _log.warning("%d more rejections not logged in the last second", self._held)
            self._second, self._logged, self._held = second, 0, 0
        if self._logged < LOG_PER_SECOND:
            self._logged += 1
            _log.warning("%s (reason %s)", line, reason)
        else:
            self._held += 1

"""Read counts for demand-driven copies: the agent's recorder and the controller's window.

Pure: no NATS, no clock (every call takes ``now``), no disk. Both sides have bounded memory.

- :class:`ReadRecorder` (agent side) counts reads per (object, reading node, service) as they
  happen, in a table of at most ``max_entries`` keys, and turns them into :class:`DemandReport`
  messages at most once per ``interval`` seconds: the domain sees window counts, never one message
  per read. Reads of a new key while the table is full are counted as ``dropped_reads`` and
  reported, not stored: a flood of distinct reads costs a counter, not memory.
- :class:`DemandWindow` (controller side) folds reports into time slots of ``slot`` seconds
  covering ``horizon`` seconds (the longest ``demand.window`` of any policy), and answers reads per
  object per node, per zone and per service over any window up to the horizon, at slot
  granularity. At most ``max_keys`` (slot, object, node, service) counters are kept; beyond that
  new ones are dropped and counted.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from cim_place.errors import PlacementError
from cim_place.objectstore.cid import Cid

K = TypeVar("K", bound=Hashable)

DEMAND_REPORTED = "DemandReported"
"""The event type of a :class:`DemandReport` in the envelope, on ``<prefix>.demand.<node>``."""


@dataclass(frozen=True, slots=True)
class ReadCount:
    """Reads of one object by one service from one node during a report's period."""

    cid: Cid
    node: str
    """The node the reads came from (where the reader runs, not the node that served them)."""
    service: str
    """The reading service's identity (its NATS or HTTP user); ``""`` when unknown."""
    reads: int
    bytes: int
    last_read: float


@dataclass(frozen=True, slots=True)
class DemandReport:
    """What one agent saw in ``[start, end)``, published on ``<prefix>.demand.<reporter>``."""

    reporter: str
    start: float
    end: float
    counts: tuple[ReadCount, ...]
    dropped_reads: int = 0
    local_bytes: int = 0
    """Bytes the reporter served from a copy of its own in the period."""
    remote_bytes: int = 0
    """Bytes the reporter served that it had to fetch from other nodes (no copy of its own)."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "reporter": self.reporter,
            "start": self.start,
            "end": self.end,
            "dropped_reads": self.dropped_reads,
            "local_bytes": self.local_bytes,
            "remote_bytes": self.remote_bytes,
            "counts": [
                [c.cid, c.node, c.service, c.reads, c.bytes, c.last_read] for c in self.counts
            ],
        }

    @classmethod
    def from_dict(cls, value: object) -> DemandReport:
        """A report from its wire form; PlacementError when it is not one (the controller counts
        and drops such a report, as it does a bad event)."""
        try:
            if not isinstance(value, dict):
                raise TypeError("not a mapping")
            counts = tuple(
                ReadCount(bytes(c[0]), str(c[1]), str(c[2]), int(c[3]), int(c[4]), float(c[5]))
                for c in value["counts"]
            )
            report = cls(
                reporter=str(value["reporter"]),
                start=float(value["start"]),
                end=float(value["end"]),
                counts=counts,
                dropped_reads=int(value.get("dropped_reads", 0)),
                local_bytes=int(value.get("local_bytes", 0)),
                remote_bytes=int(value.get("remote_bytes", 0)),
            )
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise PlacementError(f"malformed demand report: {exc}") from None
        if (
            not report.start <= report.end
            or any(c.reads < 1 or c.bytes < 0 for c in counts)
            or min(report.local_bytes, report.remote_bytes) < 0
        ):
            raise PlacementError("malformed demand report: bad period or counts")
        return report


class ReadRecorder:
    """Counts one agent's reads and reports them at a bounded rate (module docstring)."""

    def __init__(
        self,
        *,
        reporter: str,
        start: float,
        interval: float = 5.0,
        max_entries: int = 100_000,
        max_counts_per_report: int = 2_000,
    ) -> None:
        if interval <= 0 or max_entries < 1 or max_counts_per_report < 1:
            raise PlacementError("interval, max_entries and max_counts_per_report must be > 0")
        self.reporter = reporter
        self.interval = interval
        self.max_entries = max_entries
        self.max_counts_per_report = max_counts_per_report
        self._start = start
        self._table: dict[tuple[Cid, str, str], list[float]] = {}
        self._dropped = 0
        self._local = 0
        self._remote = 0

    def __len__(self) -> int:
        return len(self._table)

    def record_read(
        self,
        cid: Cid,
        node: str,
        service: str,
        now: float,
        size: int = 0,
        local: bool | None = None,
    ) -> None:
        """One read of ``size`` bytes of ``cid`` by ``service`` from ``node``; ``local``: served
        from a copy of the reporter's own (True) or fetched from others (False)."""
        if local is True:
            self._local += size
        elif local is False:
            self._remote += size
        key = (cid, node, service)
        entry = self._table.get(key)
        if entry is None:
            if len(self._table) >= self.max_entries:
                self._dropped += 1
                return
            self._table[key] = [1, size, now]
            return
        entry[0] += 1
        entry[1] += size
        entry[2] = max(entry[2], now)

    def due(self, now: float) -> bool:
        return now - self._start >= self.interval

    def flush(self, now: float) -> list[DemandReport]:
        """The reports of the period that ends at ``now``: none before ``interval`` has passed
        since the last flush, or when nothing was read; several when the counts exceed one
        report's size (so one message stays small)."""
        if not self.due(now):
            return []
        start, self._start = self._start, now
        table, self._table = self._table, {}
        dropped, self._dropped = self._dropped, 0
        local, remote, self._local, self._remote = self._local, self._remote, 0, 0
        if not table and not dropped and not local and not remote:
            return []
        counts = [
            ReadCount(cid, node, service, int(e[0]), int(e[1]), e[2])
            for (cid, node, service), e in sorted(table.items(), key=lambda kv: kv[0])
        ]
        step = self.max_counts_per_report
        chunks = [counts[i : i + step] for i in range(0, len(counts), step)] or [[]]
        return [
            DemandReport(
                self.reporter,
                start,
                now,
                tuple(chunk),
                dropped_reads=dropped if i == 0 else 0,
                local_bytes=local if i == 0 else 0,
                remote_bytes=remote if i == 0 else 0,
            )
            for i, chunk in enumerate(chunks)
        ]


@dataclass(frozen=True, slots=True)
class Reads:
    """Reads seen over a window: how many, how many bytes, and the last one's time."""

    count: int = 0
    bytes: int = 0
    last_read: float = -math.inf

    def plus(self, count: int, size: int, last_read: float) -> Reads:
        return Reads(self.count + count, self.bytes + size, max(self.last_read, last_read))


_Counter = list[float]  # [reads, bytes, last_read]


class DemandWindow:
    """Reads per object per node / zone / service over sliding windows (module docstring)."""

    def __init__(self, *, horizon: float, slot: float = 60.0, max_keys: int = 500_000) -> None:
        if slot <= 0 or horizon < slot or max_keys < 1:
            raise PlacementError("a demand window needs slot > 0, horizon >= slot, max_keys >= 1")
        self.horizon = horizon
        self.slot = slot
        self.max_keys = max_keys
        self.dropped = 0
        """Counters refused because ``max_keys`` was reached, plus reads the agents dropped."""
        self._slots: dict[int, dict[Cid, dict[tuple[str, str], _Counter]]] = {}
        self._services: dict[int, dict[str, dict[str, int]]] = {}
        # Reads per object per node over the whole horizon, kept up to date on add and expire,
        # so the common query (window == horizon) does not walk the slots.
        self._totals: dict[Cid, dict[str, _Counter]] = {}
        self._keys = 0
        self._newest = -(2**62)

    def __len__(self) -> int:
        """Counters held (the memory bound is on this)."""
        return self._keys

    def _slot_of(self, t: float) -> int:
        return math.floor(t / self.slot)

    def add(self, report: DemandReport) -> None:
        """Fold a report in; its reads count in the slot of the report's end. A report older
        than the horizon (relative to the newest report seen) is ignored."""
        n = self._slot_of(report.end)
        self.dropped += report.dropped_reads
        self._newest = max(self._newest, n)
        if n <= self._newest - self._span():
            return
        self.expire(report.end)  # first, so that expired counters free room for these
        objects = self._slots.setdefault(n, {})
        services = self._services.setdefault(n, {})
        totals = self._totals
        for c in report.counts:
            cid, node, reads = c.cid, c.node, c.reads
            per_object = objects.get(cid)
            if per_object is None:
                per_object = objects[cid] = {}
            counter = per_object.get((node, c.service))
            if counter is not None:
                counter[0] += reads
                counter[1] += c.bytes
                if c.last_read > counter[2]:
                    counter[2] = c.last_read
            elif self._keys < self.max_keys:
                per_object[(node, c.service)] = [reads, c.bytes, c.last_read]
                self._keys += 1
            else:
                self.dropped += reads
                if not per_object:
                    del objects[cid]
                continue
            per_node = totals.get(cid)
            if per_node is None:
                per_node = totals[cid] = {}
            total = per_node.get(node)
            if total is None:
                per_node[node] = [reads, c.bytes, c.last_read]
            else:
                total[0] += reads
                total[1] += c.bytes
                if c.last_read > total[2]:
                    total[2] = c.last_read
            if c.service:
                by_node = services.setdefault(c.service, {})
                by_node[node] = by_node.get(node, 0) + reads

    def _span(self) -> int:
        return math.ceil(self.horizon / self.slot)

    def expire(self, now: float) -> None:
        """Forget slots older than the horizon."""
        oldest = max(self._slot_of(now), self._newest) - self._span()
        for n in [n for n in self._slots if n <= oldest]:
            for cid, per in self._slots.pop(n).items():
                self._keys -= len(per)
                totals = self._totals[cid]
                for (node, _service), (count, size, _last) in per.items():
                    total = totals[node]
                    total[0] -= count
                    total[1] -= size
                    # The latest read is in the newest slot, which expires last: while any
                    # count remains, the total's last read is still inside the horizon.
                    if total[0] <= 0:
                        del totals[node]
                if not totals:
                    del self._totals[cid]
            self._services.pop(n, None)

    def _window(self, now: float, window: float) -> Iterator[int]:
        """Slots whose reads count in ``window`` seconds before ``now`` (whole slots)."""
        last = self._slot_of(now)
        first = last - min(math.ceil(window / self.slot), self._span())
        return (n for n in self._slots if first < n <= last)

    def objects(self, now: float, window: float) -> set[Cid]:
        """Every object read in the window."""
        out: set[Cid] = set()
        for n in self._window(now, window):
            out.update(self._slots[n])
        return out

    def by_node(self, cid: Cid, now: float, window: float) -> dict[str, Reads]:
        """Reads of ``cid`` per reading node in the window."""
        if window >= self.horizon and self._slot_of(now) >= self._newest:
            self.expire(now)
            return {
                node: Reads(int(t[0]), int(t[1]), t[2])
                for node, t in self._totals.get(cid, {}).items()
            }
        return self._fold(cid, now, window, lambda node, _service: node)

    def reads_at(self, cid: Cid, node: str) -> int:
        """Reads of ``cid`` from ``node`` over the horizon (the controller's cheap filter: only
        an object read ``min_reads`` times somewhere without a copy needs a decision)."""
        total = self._totals.get(cid, {}).get(node)
        return 0 if total is None else int(total[0])

    def busiest_node_reads(self, cid: Cid) -> int:
        """Reads of ``cid`` at its busiest node over the horizon (a cheap filter: an object
        whose busiest node is below ``min_reads`` gains no copy)."""
        return max((int(t[0]) for t in self._totals.get(cid, {}).values()), default=0)

    def by_zone(
        self, cid: Cid, now: float, window: float, zone_of: Mapping[str, K]
    ) -> dict[K, Reads]:
        """Reads of ``cid`` per zone of the reading node (nodes missing from ``zone_of`` are
        left out: their zone is unknown)."""
        out: dict[K, Reads] = {}
        for node, reads in self.by_node(cid, now, window).items():
            zone = zone_of.get(node)
            if zone is not None:
                out[zone] = out.get(zone, Reads()).plus(reads.count, reads.bytes, reads.last_read)
        return out

    def by_object_service(self, cid: Cid, now: float, window: float) -> dict[str, Reads]:
        """Reads of ``cid`` per reading service in the window."""
        return self._fold(cid, now, window, lambda _node, service: service)

    def service_nodes(self, service: str, now: float, window: float) -> dict[str, int]:
        """Reads by ``service`` (all objects) per node it read from: where the service runs."""
        out: dict[str, int] = {}
        for n in self._window(now, window):
            for node, count in self._services.get(n, {}).get(service, {}).items():
                out[node] = out.get(node, 0) + count
        return out

    def _fold(
        self, cid: Cid, now: float, window: float, key: Callable[[str, str], str]
    ) -> dict[str, Reads]:
        out: dict[str, Reads] = {}
        for n in self._window(now, window):
            for (node, service), (count, size, last) in self._slots[n].get(cid, {}).items():
                k = key(node, service)
                out[k] = out.get(k, Reads()).plus(int(count), int(size), last)
        return out


def add_reports(window: DemandWindow, reports: Iterable[DemandReport]) -> None:
    """Fold many reports in order (a convenience for replay and tests)."""
    for report in reports:
        window.add(report)

"""Scrub of one volume: re-read and re-hash every block of every pinned root, in the background.

A pin says "complete here" at the moment it was recorded; disks rot, files get deleted. A scrub
pass walks each pinned DAG (roots in CID order), reads every block from disk and hashes it, and
records what it found in ``<volume>/scrub.sqlite`` (:class:`ScrubState`):

- per root: when it was last verified whole, and its damage ((block, "corrupt"|"missing"), ...)
  when it has some: the replica is then damaged here until a repair clears it;
- the pass cursor: the last root finished, the counts so far and the damage found so far, written
  after each root, so a pass interrupted by a restart resumes after that root, not from scratch.

Three things keep a scrub in the background:

- a byte-rate token bucket (:class:`Throttle`, ``scrub.rate``, 50 MiB/s per volume by default);
- :class:`Foreground`: readers and fetches mark themselves busy; while any is, the scrubber waits
  before its next block (at most ``max_pause`` per block, so a never-idle volume is still
  scrubbed, slowly);
- gc is held off (shared gc lock) only for the root being checked, never for a whole pass.

A scrub never changes the blocks: repairing is the caller's (the agent re-fetches bad blocks).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from cim_place.errors import StoreError
from cim_place.objectstore.cid import DAG_PB, Cid, codec_of, matches, to_str
from cim_place.objectstore.dagpb import links_of
from cim_place.objectstore.scrub_state import Problem, ScrubState
from cim_place.objectstore.store import ObjectStore

DEFAULT_RATE = 50 * 1024 * 1024
"""Bytes per second a background scrub reads from one volume (``scrub.rate``)."""
DEFAULT_INTERVAL = 7 * 24 * 3600.0
"""Seconds between the starts of two full passes over a volume (``scrub.interval``)."""


@dataclass(frozen=True)
class Damage:
    """One bad block of one pinned root on this volume."""

    root: Cid
    block: Cid
    problem: Problem

    def as_json(self) -> dict[str, str]:
        return {"root": to_str(self.root), "block": to_str(self.block), "problem": self.problem}


@dataclass
class ScrubReport:
    """What a pass (or the part of it run so far) checked and found."""

    blocks_checked: int = 0
    bytes_checked: int = 0
    roots_checked: int = 0
    damaged: list[Damage] = field(default_factory=list)
    complete: bool = False
    """True when the pass reached the last root (False: stopped, resumes later)."""
    started_at: float = 0.0
    finished_at: float | None = None

    def as_json(self) -> dict[str, object]:
        return {
            "blocks_checked": self.blocks_checked,
            "bytes_checked": self.bytes_checked,
            "damaged": [d.as_json() for d in self.damaged],
        }


class Throttle:
    """A token bucket of bytes: ``take(n)`` sleeps so the long-run rate stays under ``rate``.

    ``rate`` None is unlimited. The bucket holds at most one second of tokens, so an idle spell
    does not let a later burst run at disk speed for long.
    """

    def __init__(
        self,
        rate: float | None,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if rate is not None and rate <= 0:
            raise StoreError(f"scrub rate must be more than 0 bytes/s, not {rate}")
        self.rate = rate
        self._clock = clock
        self._sleep = sleep
        self._tokens = float(rate or 0)
        self._at = clock()

    def take(self, n: int) -> None:
        if self.rate is None:
            return
        now = self._clock()
        self._tokens = min(self.rate, self._tokens + (now - self._at) * self.rate)
        self._at = now
        self._tokens -= n
        if self._tokens < 0:
            # Owe the debt in time: a block bigger than the bucket still passes, later.
            self._sleep(-self._tokens / self.rate)


class Foreground:
    """Foreground work on a volume (reads, fetches, serving peers) that a scrub yields to.

    Thread-safe; ``busy()`` may be entered from the event loop or a worker thread, and
    ``touch()`` marks a short operation (one block served). The scrubber waits while work runs
    and for ``quiet`` seconds after the last of it, so that a stream of short reads also counts.
    """

    def __init__(self, *, quiet: float = 0.25, clock: Callable[[], float] = time.monotonic) -> None:
        self.quiet = quiet
        self._clock = clock
        self._active = 0
        self._last = float("-inf")
        self._idle = threading.Condition()

    @contextlib.contextmanager
    def busy(self) -> Iterator[None]:
        with self._idle:
            self._active += 1
        try:
            yield
        finally:
            with self._idle:
                self._active -= 1
                self._last = self._clock()
                if self._active == 0:
                    self._idle.notify_all()

    def touch(self) -> None:
        self._last = self._clock()

    @property
    def active(self) -> bool:
        """Foreground work runs, or ran less than ``quiet`` seconds ago."""
        return self._active > 0 or self._clock() - self._last < self.quiet

    def wait_idle(self, timeout: float) -> bool:
        """Wait until no foreground work ran for ``quiet`` s, at most ``timeout`` s; True when
        idle."""
        deadline = self._clock() + timeout
        with self._idle:
            while self.active:
                left = deadline - self._clock()
                if left <= 0:
                    return False
                if self._active:
                    self._idle.wait(left)
                else:
                    self._idle.wait(min(left, self.quiet - (self._clock() - self._last)))
            return True


class VolumeScrubber:
    """Scrubs one :class:`ObjectStore`; a :class:`~cim_place.interfaces.Scrubber`.

    ``rate`` (bytes/s, None unlimited) and ``foreground`` keep it in the background;
    ``max_pause`` bounds the wait for foreground work per block.
    """

    def __init__(
        self,
        store: ObjectStore,
        *,
        rate: float | None = DEFAULT_RATE,
        foreground: Foreground | None = None,
        max_pause: float = 2.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.throttle = Throttle(rate)
        self.foreground = foreground or Foreground()
        self.max_pause = max_pause
        self.state = ScrubState(store.path / "scrub.sqlite")
        self._clock = clock
        self._pass_lock = threading.Lock()

    # -- the Scrubber protocol ----------------------------------------------------------------

    def scrub(self, roots: Sequence[Cid]) -> Iterator[tuple[Cid, Cid, str]]:
        for root in roots:
            for damage in self.check_root(root)[2]:
                yield damage.root, damage.block, damage.problem

    # -- passes -------------------------------------------------------------------------------

    def check_root(self, root: Cid) -> tuple[int, int, list[Damage]]:
        """(blocks read, bytes read, damage) of the DAG under ``root``; the state is updated."""
        blocks = size = 0
        damage: list[Damage] = []
        with self.store.writing():  # gc must not delete blocks under our feet
            seen: set[Cid] = set()
            stack = [root]
            while stack:
                cid = stack.pop()
                if cid in seen:
                    continue
                seen.add(cid)
                if self.foreground.active:
                    self.foreground.wait_idle(self.max_pause)
                try:
                    data = self.store.blocks.block_path(cid).read_bytes()
                except FileNotFoundError:
                    damage.append(Damage(root, cid, "missing"))
                    continue
                self.throttle.take(len(data))
                blocks += 1
                size += len(data)
                if not matches(cid, data):
                    damage.append(Damage(root, cid, "corrupt"))
                    continue  # the links of a corrupt node are unknown
                if codec_of(cid) == DAG_PB:
                    try:
                        stack.extend(reversed(links_of(DAG_PB, data)))
                    except ValueError:
                        damage.append(Damage(root, cid, "corrupt"))
            if self.store.pins.get(root) is None:
                return blocks, size, []  # unpinned meanwhile: nothing of ours to judge
            if damage:
                self.state.mark_damaged(root, [(d.block, d.problem) for d in damage])
            else:
                self.state.verified(root, self._clock())
        return blocks, size, damage

    def run_pass(
        self,
        *,
        resume: bool = True,
        stop: threading.Event | None = None,
        on_damage: Callable[[Cid, list[Damage]], None] | None = None,
    ) -> ScrubReport:
        """Scrub every pinned root; resume the interrupted pass unless ``resume`` is False.

        ``on_damage(root, damage)`` is called (in this thread) as soon as a root is found
        damaged, so the damage is reported before the pass ends.

        Returns the report of the whole pass (the part before a restart included); ``complete``
        is False when ``stop`` was set first (the cursor then stays for the next call).
        """
        with self._pass_lock:
            cursor = self.state.get("cursor") if resume else None
            report = _report_of(cursor) if isinstance(cursor, dict) else None
            after = bytes.fromhex(str(cursor["after"])) if report and cursor else b""
            if report is None:
                report = ScrubReport(started_at=self._clock())
            for root in sorted(self.store.pins.roots()):
                if root <= after:
                    continue
                if stop is not None and stop.is_set():
                    return report
                blocks, size, damage = self.check_root(root)
                report.blocks_checked += blocks
                report.bytes_checked += size
                report.roots_checked += 1
                report.damaged.extend(damage)
                if damage and on_damage is not None:
                    on_damage(root, damage)
                self.state.put("cursor", _cursor_of(report, root))
            report.complete = True
            report.finished_at = self._clock()
            self.state.put("cursor", None)
            self.state.put("last_full_pass", report.finished_at)
            return report

    def last_full_pass(self) -> float | None:
        value = self.state.get("last_full_pass")
        return float(value) if isinstance(value, (int, float)) else None

    def due(self, interval: float) -> bool:
        """Whether a pass should run now: one is under way, or the last ended ``interval`` ago."""
        if self.state.get("cursor") is not None:
            return True
        last = self.last_full_pass()
        return last is None or self._clock() - last >= interval

    def close(self) -> None:
        self.state.close()


def _cursor_of(report: ScrubReport, after: Cid) -> dict[str, object]:
    return {
        "after": after.hex(),
        "started_at": report.started_at,
        "blocks": report.blocks_checked,
        "bytes": report.bytes_checked,
        "roots": report.roots_checked,
        "damaged": [[d.root.hex(), d.block.hex(), d.problem] for d in report.damaged],
    }


def _report_of(cursor: dict[str, Any]) -> ScrubReport:
    damaged = cursor.get("damaged")
    return ScrubReport(
        blocks_checked=int(cursor.get("blocks", 0)),
        bytes_checked=int(cursor.get("bytes", 0)),
        roots_checked=int(cursor.get("roots", 0)),
        started_at=float(cursor.get("started_at", 0.0)),
        damaged=[
            Damage(bytes.fromhex(r), bytes.fromhex(b), p)
            for r, b, p in (damaged if isinstance(damaged, list) else [])
        ],
    )


__all__ = [
    "DEFAULT_INTERVAL",
    "DEFAULT_RATE",
    "Damage",
    "Foreground",
    "Problem",
    "ScrubReport",
    "ScrubState",
    "Throttle",
    "VolumeScrubber",
]

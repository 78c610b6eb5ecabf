"""Projection snapshots in JetStream, and the bounded event stream they allow.

This module owns the object store bucket ``cim-place-snapshots`` and the purge of
``CIM_PLACE_EVENTS`` (the bytes format is :mod:`cim_place.cluster.controller.snapshot_format`):

1. **Writing.** The leading controller, once caught up, writes a snapshot of its projection every
   ``snapshot_every_events`` events or ``snapshot_every`` seconds (whichever comes first, and
   only when events were applied since the last one), as the object
   ``projection-<sequence, 20 digits>``. The event loop pays only for the copy of the columns
   (:func:`~cim_place.cluster.controller.snapshot_format.take`); compression and hashing run in a
   thread. The object is read back and its checksum verified before it counts; then only the
   newest ``snapshots_kept`` are kept.
2. **Loading.** A starting controller (leader or standby) tries the snapshots newest first and
   restores the first valid one; a corrupt, truncated or old-format snapshot, or one newer than
   the event stream (a stream recreated since), is skipped with one log line. No valid snapshot:
   a full replay, as before. The event feed then starts after the snapshot's sequence.
3. **Purging.** With ``events_max_age`` or ``events_max_bytes`` set, the leader purges the head of
   ``CIM_PLACE_EVENTS`` after each snapshot, up to the lower of what those limits allow and the
   sequence of the *oldest* snapshot kept (so that falling back to any kept snapshot still finds
   its tail). Stream limits are never used: they would drop events no snapshot covers yet.

nats-py's ``ObjectStore.get`` concatenates chunk after chunk (quadratic on a large object) and
pays an ordered consumer and an executor call per chunk: snapshots are read with
:func:`cim_place.cluster.nats.objects.read_object` instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Protocol

import nats.errors
import nats.js.errors
from nats.js.api import (
    ObjectMeta,
    ObjectMetaOptions,
    ObjectStoreConfig,
    StorageType,
)
from nats.js.client import JetStreamContext
from nats.js.object_store import ObjectStore

from cim_place.cluster.controller.projection import Projection
from cim_place.cluster.controller.snapshot_format import adopt, seal, take
from cim_place.cluster.controller.snapshot_load import load_parts, verify_parts
from cim_place.cluster.nats.objects import read_object, read_object_parts
from cim_place.cluster.nats.subjects import EVENTS_STREAM

__all__ = [
    "SNAPSHOT_BUCKET",
    "RetentionPolicy",
    "SnapshotPolicy",
    "Snapshots",
    "purge_bound",
]

_log = logging.getLogger(__name__)

SNAPSHOT_BUCKET = "cim-place-snapshots"
_PREFIX = "projection-"
_CHUNK = 512 << 10
"""Object store chunk: fewer messages than nats-py's 128 KiB, under the 1 MiB max payload."""
_CHECK_EVERY = 1.0
_RETRY = 60.0
"""Seconds before trying again after a snapshot failed to write."""


@dataclass(frozen=True, slots=True)
class SnapshotPolicy:
    every_events: int = 100_000
    every_seconds: float = 600.0
    kept: int = 3


@dataclass(frozen=True, slots=True)
class RetentionPolicy:
    """Limits of ``CIM_PLACE_EVENTS``; 0 means none (every event is kept, the default)."""

    max_age: float = 0.0
    max_bytes: int = 0

    @property
    def bounded(self) -> bool:
        return self.max_age > 0 or self.max_bytes > 0


@dataclass(frozen=True, slots=True)
class Written:
    name: str
    sequence: int
    size: int
    objects: int
    stall: float
    """Seconds the event loop spent copying the projection."""
    seconds: float


class _Disbelief(Protocol):
    def forget_disproved(self, after_sequence: int) -> int: ...


class _PartsReader(io.BufferedIOBase):
    """A readable over a snapshot's pieces, consuming ``parts`` (each dropped once read): the
    object store takes it chunk by chunk, so the snapshot is never joined into one buffer on its
    way out and shrinks as it goes."""

    def __init__(self, parts: list[bytes]) -> None:
        super().__init__()
        parts.reverse()
        self._parts = parts
        self._left = memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        out = memoryview(buffer).cast("B")
        at = 0
        while at < len(out):
            if not self._left:
                if not self._parts:
                    break
                self._left = memoryview(self._parts.pop())
            taken = min(len(out) - at, len(self._left))
            out[at : at + taken] = self._left[:taken]
            self._left = self._left[taken:]
            at += taken
        return at


def _name(sequence: int) -> str:
    return f"{_PREFIX}{sequence:020d}"


def _sequence_of(name: str) -> int | None:
    digits = name[len(_PREFIX) :]
    return int(digits) if name.startswith(_PREFIX) and digits.isdigit() else None


class Snapshots:
    """Writes, loads and prunes snapshots of ``projection``, and purges what they cover."""

    def __init__(
        self,
        js: JetStreamContext,
        projection: Projection,
        *,
        policy: SnapshotPolicy | None = None,
        retention: RetentionPolicy | None = None,
        replicas: int = 1,
    ) -> None:
        self.js = js
        self.projection = projection
        self.policy = policy or SnapshotPolicy()
        self.retention = retention or RetentionPolicy()
        self.replicas = replicas
        self._store: ObjectStore | None = None
        self.last_written = 0
        """Sequence of the newest snapshot in the bucket (written or found)."""
        self._written_at = time.monotonic()
        self.restored = 0
        """Sequence of the snapshot this controller started from (0: a full replay)."""
        self.load_seconds = 0.0
        """Seconds :meth:`load` took (listing, reading, checking and restoring)."""
        self.written: list[Written] = []
        self.purged_to = 0
        """Highest sequence this controller purged (0: none)."""

    async def open(self) -> ObjectStore:
        if self._store is None:
            try:
                self._store = await self.js.object_store(SNAPSHOT_BUCKET)
            except nats.js.errors.BucketNotFoundError:
                config = ObjectStoreConfig(
                    description="cim-place projection snapshots (the controller's)",
                    storage=StorageType.FILE,
                    replicas=self.replicas,
                )
                with contextlib.suppress(nats.js.errors.BadRequestError):
                    await self.js.create_object_store(SNAPSHOT_BUCKET, config=config)
                self._store = await self.js.object_store(SNAPSHOT_BUCKET)
        return self._store

    async def listed(self) -> list[tuple[int, str]]:
        """``(sequence, name)`` of every snapshot in the bucket, newest first."""
        store = await self.open()
        try:
            infos = await store.list(ignore_deletes=True)
        except nats.js.errors.NotFoundError:
            return []
        found = []
        for info in infos:
            sequence = _sequence_of(info.name or "")
            if sequence is not None and not info.deleted:
                found.append((sequence, info.name or ""))
        return sorted(found, reverse=True)

    async def read(self, name: str) -> bytes:
        """The snapshot ``name`` whole (TransportError if it cannot be read whole)."""
        return await read_object(self.js, await self.open(), SNAPSHOT_BUCKET, name)

    # -- loading ---------------------------------------------------------------------------------

    async def load(self, disbelief: _Disbelief | None = None) -> int:
        """Restore the newest valid snapshot into the projection; its sequence (0: none).

        Call before the event feed starts; it must start after the returned sequence.
        """
        began = time.perf_counter()
        try:
            listed = await self.listed()
            last = (await self.js.stream_info(EVENTS_STREAM)).state
        except Exception as exc:
            # A start never fails because of snapshots: replaying everything is always correct.
            _log.warning("snapshots not read (%s): full replay", exc or type(exc).__name__)
            return 0
        if listed:
            self.last_written = listed[0][0]
        for sequence, name in listed:
            if sequence > last.last_seq:
                _log.warning(
                    "snapshot %s skipped: newer than the event stream (last %d)",
                    name,
                    last.last_seq,
                )
                continue
            started = time.perf_counter()
            try:
                # Chunk by chunk: at 10M objects the snapshot, its payload and the projection
                # would not fit twice in a controller's memory budget.
                parts = await read_object_parts(self.js, await self.open(), SNAPSHOT_BUCKET, name)
                size = sum(len(part) for part in parts)
                loaded = await asyncio.to_thread(load_parts, parts)
                del parts
            except Exception as exc:
                # Whatever the reason (corrupt, truncated, another format, a read that failed,
                # pruned meanwhile), an older snapshot or the full replay is as correct.
                _log.warning("snapshot %s skipped: %s", name, exc or type(exc).__name__)
                continue
            adopt(self.projection, loaded)
            forgotten = disbelief.forget_disproved(sequence) if disbelief is not None else 0
            if last.first_seq > sequence + 1:
                _log.warning(
                    "events %d..%d were purged before this snapshot: inventory digests repair "
                    "what they held",
                    sequence + 1,
                    last.first_seq - 1,
                )
            _log.info(
                "projection restored from snapshot %s: %d objects, sequence %d, %d bytes in "
                "%.2f s (%d disproved replicas dropped); replaying from %d",
                name,
                len(self.projection),
                sequence,
                size,
                time.perf_counter() - started,
                forgotten,
                sequence + 1,
            )
            self.restored = sequence
            self.load_seconds = time.perf_counter() - began
            return sequence
        if listed:
            _log.warning("no valid snapshot among %d: full replay", len(listed))
        return 0

    # -- writing ---------------------------------------------------------------------------------

    def due(self, now: float) -> bool:
        behind = self.projection.last_sequence - self.last_written
        if behind <= 0:
            return False
        return (
            behind >= self.policy.every_events
            or now - self._written_at >= self.policy.every_seconds
        )

    async def run(self, leading: Callable[[], bool], caught_up: asyncio.Event) -> None:
        """Write snapshots while leading and caught up, and purge after each; until cancelled."""
        await caught_up.wait()
        while True:
            await asyncio.sleep(_CHECK_EVERY)
            if not leading() or not self.due(time.monotonic()):
                continue
            try:
                await self.write()
                if self.retention.bounded and leading():
                    await self.purge()
            except Exception as exc:
                # A failed snapshot (or a bug in one) costs a retry, never the controller.
                _log.warning(
                    "snapshot not written: %s; trying again in %.0f s",
                    exc or type(exc).__name__,
                    _RETRY,
                )
                await asyncio.sleep(_RETRY)

    async def write(self) -> Written:
        """Write a snapshot of the projection now, verify it, keep the newest ``kept``."""
        store = await self.open()
        started = time.perf_counter()
        taken = take(self.projection)
        stall = time.perf_counter() - started
        sealed = await asyncio.to_thread(seal, taken)
        del taken
        name = _name(sealed.sequence)
        meta = ObjectMeta(
            name=name,
            description=f"projection at stream sequence {sealed.sequence}",
            options=ObjectMetaOptions(max_chunk_size=_CHUNK),
        )
        written = Written(name, sealed.sequence, sealed.size, sealed.objects, stall, 0.0)
        await store.put(name, _PartsReader(sealed.parts), meta=meta)
        del sealed
        # A snapshot counts once read back whole: what a restart will read.
        try:
            parts = await read_object_parts(self.js, store, SNAPSHOT_BUCKET, name)
            await asyncio.to_thread(verify_parts, parts)
            del parts
        except Exception:
            with contextlib.suppress(Exception):
                await store.delete(name)
            raise
        written = replace(written, seconds=time.perf_counter() - started)
        self.last_written = written.sequence
        self._written_at = time.monotonic()
        self.written.append(written)
        _log.info(
            "snapshot %s written: %d objects, %d bytes in %.2f s (event loop held %.3f s)",
            name,
            written.objects,
            written.size,
            written.seconds,
            stall,
        )
        await self.prune()
        return written

    async def prune(self) -> None:
        store = await self.open()
        for _, name in (await self.listed())[self.policy.kept :]:
            with contextlib.suppress(nats.js.errors.NotFoundError):
                await store.delete(name)

    # -- the bounded event stream ----------------------------------------------------------------

    async def purge(self, now: float | None = None) -> int:
        """Purge ``CIM_PLACE_EVENTS`` up to :func:`purge_bound`; the new first sequence - 1."""
        listed = await self.listed()
        if not listed or not self.retention.bounded:
            return 0
        covered = min(sequence for sequence, _ in listed[: self.policy.kept])
        allowed = await self._allowed(time.time() if now is None else now)
        bound = purge_bound(covered, allowed)
        state = (await self.js.stream_info(EVENTS_STREAM)).state
        if bound < state.first_seq:
            return 0
        await self.js.purge_stream(EVENTS_STREAM, seq=bound + 1)
        self.purged_to = bound
        _log.info(
            "events purged up to sequence %d (snapshot %d, limits allow %d)",
            bound,
            covered,
            allowed,
        )
        return bound

    async def _allowed(self, now: float) -> int:
        """The highest sequence the age and byte limits would remove (0: none)."""
        state = (await self.js.stream_info(EVENTS_STREAM)).state
        if not state.messages:
            return 0
        allowed = 0
        if self.retention.max_bytes and state.bytes > self.retention.max_bytes:
            # Messages are of similar size: remove the average share of the excess.
            average = state.bytes / state.messages
            count = math.ceil((state.bytes - self.retention.max_bytes) / average)
            allowed = state.first_seq + count - 1
        if self.retention.max_age:
            cutoff = now - self.retention.max_age
            allowed = max(
                allowed, await self.stored_before(cutoff, state.first_seq, state.last_seq)
            )
        return min(allowed, state.last_seq)

    async def stored_before(self, cutoff: float, low: int, high: int) -> int:
        """The last sequence in ``low..high`` stored before ``cutoff`` (``low - 1``: none); a
        binary search on stored times (about 24 reads at 10M events)."""
        found = low - 1
        while low <= high:
            middle = (low + high) // 2
            try:
                msg = await self.js.get_msg(EVENTS_STREAM, seq=middle, subject=">", next=True)
            except nats.js.errors.NotFoundError:
                high = middle - 1
                continue
            stored = msg.time.timestamp() if msg.time is not None else math.inf
            sequence = msg.seq or middle
            if stored < cutoff:
                found = sequence
                low = sequence + 1
            else:
                high = middle - 1
        return found


def purge_bound(covered: int, allowed: int) -> int:
    """The highest sequence a purge may remove: what the limits allow, never past ``covered``
    (the oldest kept snapshot's sequence)."""
    return max(0, min(covered, allowed))

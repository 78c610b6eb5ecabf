"""The materialised locations: one :class:`ObjectStatus` per CID, spread over KV shards.

This module owns reading and writing them. The controller writes a CID's status after each
reconcile (:meth:`LocationStore.put`) and the domain-wide :class:`Summary` now and then
(:meth:`LocationStore.put_summary`); ``cim-place status`` reads them with one KV get each, so a
status never fans out to the nodes.

Layout:

- KV ``cim-place-locations`` (the base bucket) holds the summary under :data:`SUMMARY_KEY` and the
  layout under :data:`LAYOUT_KEY` (``{"shards": 16}``), written once by the first controller;
- each CID's status lives in shard bucket ``cim-place-locations-NN``, NN = CRC-32 of the CID's
  text form modulo the shard count; key = that text (base32 for CIDv1, base58 for CIDv0: both
  valid KV key characters), value = :meth:`ObjectStatus.encode` (JSON, schema in
  :mod:`cim_place.placement.status`). History 1: only the current status matters.

Why shards: a status lookup is nats-server's "last message for a subject", and the first lookup
that lands in a file-store block not in the server's cache costs time that grows with the size of
the whole stream, not only of the block: 3.6 ms in a 300k-object stream, 13.5 ms at 1M (median of
the cold lookups, nats-server 2.15.1, measured with bench/status.py's records). The same 1M
objects in 8 streams cost 3.8 ms per cold lookup; 16 keep a million objects well inside the 10 ms
p99 a status lookup is allowed (docs/BENCHMARKS.md, "status"). Readers take the shard count from
the layout key, so a later version can change it without guessing.

Every put is a write. The controller skips writing a status equal to the one it last wrote
(reconciles are level-triggered and mostly find nothing changed); it keeps that record itself, a
column per object (cluster/controller/object_states.py), not here.

A value that does not decode (foreign or damaged data) is skipped and counted in
:attr:`LocationStore.garbage`, never raised: one bad key must not break ``status``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import zlib
from collections.abc import AsyncIterator

import nats.errors
import nats.js.errors
from nats.js.client import JetStreamContext
from nats.js.kv import KeyValue

from cim_place.cluster.nats import kv
from cim_place.errors import TransportError
from cim_place.objectstore.cid import Cid, to_str
from cim_place.placement.status import ObjectStatus, Summary

__all__ = ["LAYOUT_KEY", "SUMMARY_KEY", "LocationStore", "shard_of"]

SUMMARY_KEY = "_summary"
"""The key of the domain-wide :class:`Summary` (a CID's text never starts with ``_``)."""
LAYOUT_KEY = "_layout"
"""The key of the layout record in the base bucket: ``{"shards": N}``."""

_log = logging.getLogger(__name__)
_LIST_IDLE = 5.0


def _key(cid: Cid | str) -> str:
    return cid if isinstance(cid, str) else to_str(cid)


def shard_of(key: str, shards: int = kv.LOCATION_SHARDS) -> int:
    """The shard that holds ``key``'s status: stable across processes and versions."""
    return zlib.crc32(key.encode()) % shards


def _no_locations(detail: str) -> TransportError:
    return TransportError(
        f"KV bucket {kv.LOCATIONS} {detail} in the hub: no controller has materialised "
        "locations yet; start `cim-place controller` (or `cim-place up`), then retry"
    )


class LocationStore:
    """Reads and writes the locations in the hub domain.

    Usage: ``store = LocationStore(js_hub); await store.open()``, then :meth:`put` / :meth:`get`.
    """

    def __init__(self, js_hub: JetStreamContext) -> None:
        self._js = js_hub
        self._base: KeyValue | None = None
        self._shards: dict[int, KeyValue] = {}
        self.shard_count = kv.LOCATION_SHARDS
        self.writes = 0
        """KV writes done by :meth:`put` and :meth:`write`."""
        self.garbage = 0
        """Values that did not decode and were skipped."""

    async def open(self, *, create: bool = True, replicas: int | None = None) -> LocationStore:
        """Open the buckets (creating them, history 1, ``replicas`` or as the hub allows, when
        ``create``); returns self.

        With ``create=False`` (a reader such as ``cim-place status``) a missing bucket or layout
        raises TransportError saying that no controller has written locations yet; shard buckets
        are then opened on first use, so a single lookup costs one of them only.
        """
        if create:
            self._base = await kv.ensure_bucket(self._js, kv.LOCATIONS, replicas=replicas)
            await self._ensure_layout()
            for index in range(self.shard_count):
                self._shards[index] = await kv.ensure_bucket(
                    self._js, kv.location_shard(index), replicas=replicas
                )
            return self
        try:
            self._base = await kv.open_bucket(self._js, kv.LOCATIONS)
        except nats.js.errors.BucketNotFoundError:
            raise _no_locations("does not exist") from None
        except nats.errors.Error as error:
            raise TransportError(f"could not open KV bucket {kv.LOCATIONS}: {error}") from error
        shards = await self._read_layout()
        if shards is None:
            raise _no_locations("has no layout record")
        self.shard_count = shards
        return self

    async def _get_base(self, key: str, what: str) -> bytes | None:
        """The value of ``key`` in the base bucket, None if absent."""
        try:
            entry = await self.bucket.get(key)
        except nats.js.errors.KeyNotFoundError:
            return None
        except nats.errors.Error as error:
            raise TransportError(
                f"could not read the {what} from KV {kv.LOCATIONS}: {error}"
            ) from error
        return entry.value or b""

    async def _read_layout(self) -> int | None:
        value = await self._get_base(LAYOUT_KEY, "layout")
        if value is None:
            return None
        try:
            shards = json.loads(value)["shards"]
            if not isinstance(shards, int) or not 1 <= shards <= 1024:
                raise ValueError(f"shard count {shards!r} out of range")
        except (ValueError, KeyError, TypeError) as error:
            raise TransportError(
                f"the layout record in KV {kv.LOCATIONS} is damaged ({error}); delete key "
                f"{LAYOUT_KEY} and restart the controller, which rewrites every status"
            ) from error
        return shards

    async def _ensure_layout(self) -> None:
        """Write the layout if absent; a base bucket without one holds statuses written before
        the locations were sharded: it is emptied (the controller rewrites every status)."""
        shards = await self._read_layout()
        if shards is not None:
            if shards != kv.LOCATION_SHARDS:
                raise TransportError(
                    f"the locations in KV {kv.LOCATIONS} are laid out in {shards} shards but "
                    f"this cim-place writes {kv.LOCATION_SHARDS}; run a controller of the same "
                    "version as the one that wrote them"
                )
            return
        stream = f"KV_{kv.LOCATIONS}"
        with contextlib.suppress(nats.errors.Error):
            info = await self._js.stream_info(stream)
            if info.state.messages:
                _log.info("emptying %s: statuses of an unsharded layout", kv.LOCATIONS)
                await self._js.purge_stream(stream)
        layout = json.dumps({"shards": kv.LOCATION_SHARDS}).encode()
        try:
            await self.bucket.create(LAYOUT_KEY, layout)
        except nats.js.errors.KeyWrongLastSequenceError:
            pass  # another controller wrote it first: read it back below
        except nats.errors.Error as error:
            raise TransportError(
                f"could not write the layout to KV {kv.LOCATIONS}: {error}"
            ) from error
        await self._ensure_layout()

    @property
    def bucket(self) -> KeyValue:
        """The base bucket (summary and layout)."""
        if self._base is None:
            raise RuntimeError("LocationStore.open() must be awaited before use")
        return self._base

    async def shard(self, cid: Cid | str) -> KeyValue:
        """The shard bucket that holds ``cid``'s status (opened on first use)."""
        index = shard_of(_key(cid), self.shard_count)
        return self._shards.get(index) or await self._open_shard(index)

    # -- per CID ----------------------------------------------------------------------------------

    async def put(self, status: ObjectStatus) -> None:
        """Write ``status`` under its CID."""
        await self.write(status.cid, status.encode())

    async def write(self, cid: str, data: bytes) -> None:
        """Write an encoded status under ``cid``, unconditionally (the controller keeps its own
        record of what it wrote, a column per object: cluster/controller/object_states.py)."""
        bucket = await self.shard(cid)
        try:
            await bucket.put(cid, data)
        except nats.errors.Error as error:
            raise TransportError(
                f"could not write the status of {cid} to KV {bucket._name}: {error}; "
                "is the hub up? the next reconcile writes it again"
            ) from error
        self.writes += 1

    async def get(self, cid: Cid | str) -> ObjectStatus | None:
        """The stored status of ``cid`` (binary or text), or None if absent or not decodable."""
        key = _key(cid)
        bucket = await self.shard(key)
        try:
            entry = await bucket.get(key)
        except (nats.js.errors.KeyNotFoundError, nats.js.errors.InvalidKeyError):
            return None
        except nats.errors.Error as error:
            raise TransportError(
                f"could not read the status of {key} from KV {bucket._name}: {error}"
            ) from error
        return self._decode(key, entry.value)

    async def delete(self, cid: Cid | str) -> None:
        """Remove the status of ``cid`` (an object no longer tracked); absent is fine."""
        key = _key(cid)
        bucket = await self.shard(key)
        try:
            await bucket.delete(key)
        except nats.js.errors.KeyNotFoundError:
            pass
        except nats.errors.Error as error:
            raise TransportError(
                f"could not delete the status of {key} from KV {bucket._name}: {error}"
            ) from error

    # -- summary ----------------------------------------------------------------------------------

    async def put_summary(self, summary: Summary) -> None:
        try:
            await self.bucket.put(SUMMARY_KEY, summary.encode())
        except nats.errors.Error as error:
            raise TransportError(
                f"could not write the summary to KV {kv.LOCATIONS}: {error}"
            ) from error

    async def summary(self) -> Summary | None:
        """The last summary the controller wrote, or None (none yet, or not decodable)."""
        value = await self._get_base(SUMMARY_KEY, "summary")
        if value is None:
            return None
        try:
            return Summary.decode(value)
        except ValueError as error:
            self.garbage += 1
            _log.warning("skipping the summary in %s: %s", kv.LOCATIONS, error)
            return None

    # -- listing ----------------------------------------------------------------------------------

    async def list(self, state: str | None = None) -> AsyncIterator[ObjectStatus]:
        """Every stored status (only those in ``state``, if given), shard by shard.

        Reads each shard through one ordered consumer (the last value per key); at 1M objects
        that is a full scan, tens of seconds, so it serves ``status --filter`` and audits, not
        the controller's hot path.
        """
        for index in range(self.shard_count):
            bucket = self._shards.get(index) or await self._open_shard(index)
            async for status in self._list_shard(bucket, state):
                yield status

    async def _open_shard(self, index: int) -> KeyValue:
        name = kv.location_shard(index)
        try:
            bucket = await kv.open_bucket(self._js, name)
        except nats.js.errors.BucketNotFoundError:
            raise _no_locations(f"shard {name} does not exist") from None
        except nats.errors.Error as error:
            raise TransportError(f"could not open KV bucket {name}: {error}") from error
        self._shards[index] = bucket
        return bucket

    async def _list_shard(self, bucket: KeyValue, state: str | None) -> AsyncIterator[ObjectStatus]:
        name = bucket._name
        try:
            if not (await bucket.status()).values:
                return  # an empty shard
            # Deletes included: the last initial value may be a delete marker, and it is the one
            # that says the listing is complete (see below).
            watcher = await bucket.watchall()
        except nats.errors.Error as error:
            raise TransportError(f"could not list KV {name}: {error}") from error
        try:
            while True:
                try:
                    entry = await watcher.updates(timeout=_LIST_IDLE)  # type: ignore[no-untyped-call]
                except nats.errors.TimeoutError:
                    raise TransportError(
                        f"listing KV {name} stalled for {_LIST_IDLE:.0f} s; is the hub up? retry"
                    ) from None
                # nats-py's end-of-initial-values marker (None) can come before values that the
                # server pushed while the watcher was being set up (it compares the consumer's
                # pending count with what its callback has handled so far), so a small shard
                # could list short; the value with nothing pending after it ends the listing.
                if entry is None:
                    continue
                if entry.operation is None:
                    status = self._decode(entry.key, entry.value)
                    if status is not None and (state is None or status.state == state):
                        yield status
                if entry.delta == 0:
                    return
        finally:
            with contextlib.suppress(nats.errors.Error):
                await watcher.stop()  # type: ignore[no-untyped-call]

    def _decode(self, key: str, value: bytes | None) -> ObjectStatus | None:
        try:
            return ObjectStatus.decode(value or b"")
        except (ValueError, TypeError, KeyError, AttributeError, RecursionError) as error:
            self.garbage += 1
            _log.warning("skipping %s in the locations: %s", key, error)
            return None

"""The materialised locations: one :class:`ObjectStatus` per CID in KV ``cim-place-locations``.

This module owns reading and writing that bucket. The controller writes a CID's status after each
reconcile (:meth:`LocationStore.put`) and the domain-wide :class:`Summary` now and then
(:meth:`LocationStore.put_summary`); ``cim-place status`` reads them with one KV get each, so a
status never fans out to the nodes.

Layout: key = the CID's text form (base32 for CIDv1, base58 for CIDv0: both are valid KV key
characters), value = :meth:`ObjectStatus.encode` (JSON, schema in
:mod:`cim_place.placement.status`); the summary lives under :data:`SUMMARY_KEY`, which no CID text
can equal. History 1: only the current status matters.

A put whose encoding equals the last one this process wrote for that CID is skipped: reconciles
are level-triggered and mostly find nothing changed, and a KV write per no-op would load the hub
for nothing. The memory is one pair of ints per CID written (about 100 bytes); a process that did
not write a key (a new leader) writes it once more and is then in step.

A value that does not decode (foreign or damaged data) is skipped and counted in
:attr:`LocationStore.garbage`, never raised: one bad key must not break ``status``.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator

import nats.errors
import nats.js.errors
from nats.js.client import JetStreamContext
from nats.js.kv import KeyValue

from cim_place.cluster import kv
from cim_place.errors import TransportError
from cim_place.objectstore.cid import Cid, to_str
from cim_place.placement.status import ObjectStatus, Summary

__all__ = ["SUMMARY_KEY", "LocationStore"]

SUMMARY_KEY = "_summary"
"""The key of the domain-wide :class:`Summary` (a CID's text never starts with ``_``)."""

_log = logging.getLogger(__name__)
_LIST_IDLE = 5.0


def _key(cid: Cid | str) -> str:
    return cid if isinstance(cid, str) else to_str(cid)


class LocationStore:
    """Reads and writes KV ``cim-place-locations`` in the hub domain.

    Usage: ``store = LocationStore(js_hub); await store.open()``, then :meth:`put` / :meth:`get`.
    """

    def __init__(self, js_hub: JetStreamContext) -> None:
        self._js = js_hub
        self._bucket: KeyValue | None = None
        # hash(key) -> hash(encoding) of what this process last wrote (see the module docstring).
        self._written: dict[int, int] = {}
        self.writes = 0
        """KV writes done by :meth:`put` (skipped no-ops are not counted)."""
        self.skipped = 0
        """Puts skipped because the status was unchanged."""
        self.garbage = 0
        """Values that did not decode and were skipped."""

    async def open(self, *, create: bool = True) -> LocationStore:
        """Open the bucket (creating it with history 1 when ``create``); returns self.

        With ``create=False`` (a reader such as ``cim-place status``) a missing bucket raises
        TransportError saying that no controller has written locations yet.
        """
        if create:
            self._bucket = await kv.ensure_bucket(self._js, kv.LOCATIONS, history=1)
            return self
        try:
            self._bucket = await self._js.key_value(kv.LOCATIONS)
        except nats.js.errors.BucketNotFoundError:
            raise TransportError(
                f"KV bucket {kv.LOCATIONS} does not exist in the hub: no controller has "
                "materialised locations yet; start `cim-place controller`, then retry"
            ) from None
        except nats.errors.Error as error:
            raise TransportError(f"could not open KV bucket {kv.LOCATIONS}: {error}") from error
        return self

    @property
    def bucket(self) -> KeyValue:
        if self._bucket is None:
            raise RuntimeError("LocationStore.open() must be awaited before use")
        return self._bucket

    # -- per CID ----------------------------------------------------------------------------------

    async def put(self, status: ObjectStatus) -> bool:
        """Write ``status`` under its CID unless it equals what was last written; True if written.

        Callers should keep ``updated_at`` stable when nothing else changed (it is part of the
        encoding), or every put is a write.
        """
        data = status.encode()
        key_hash, value_hash = hash(status.cid), hash(data)
        if self._written.get(key_hash) == value_hash:
            self.skipped += 1
            return False
        try:
            await self.bucket.put(status.cid, data)
        except nats.errors.Error as error:
            raise TransportError(
                f"could not write the status of {status.cid} to KV {kv.LOCATIONS}: {error}; "
                "is the hub up? the next reconcile writes it again"
            ) from error
        self._written[key_hash] = value_hash
        self.writes += 1
        return True

    async def get(self, cid: Cid | str) -> ObjectStatus | None:
        """The stored status of ``cid`` (binary or text), or None if absent or not decodable."""
        key = _key(cid)
        try:
            entry = await self.bucket.get(key)
        except (nats.js.errors.KeyNotFoundError, nats.js.errors.InvalidKeyError):
            return None
        except nats.errors.Error as error:
            raise TransportError(
                f"could not read the status of {key} from KV {kv.LOCATIONS}: {error}"
            ) from error
        return self._decode(key, entry.value)

    async def delete(self, cid: Cid | str) -> None:
        """Remove the status of ``cid`` (an object no longer tracked); absent is fine."""
        key = _key(cid)
        self._written.pop(hash(key), None)
        try:
            await self.bucket.delete(key)
        except nats.js.errors.KeyNotFoundError:
            pass
        except nats.errors.Error as error:
            raise TransportError(
                f"could not delete the status of {key} from KV {kv.LOCATIONS}: {error}"
            ) from error

    def forget_written(self) -> None:
        """Drop the memory of past writes (after losing and regaining leadership, say)."""
        self._written.clear()

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
        try:
            entry = await self.bucket.get(SUMMARY_KEY)
        except nats.js.errors.KeyNotFoundError:
            return None
        except nats.errors.Error as error:
            raise TransportError(
                f"could not read the summary from KV {kv.LOCATIONS}: {error}"
            ) from error
        try:
            return Summary.decode(entry.value or b"")
        except ValueError as error:
            self.garbage += 1
            _log.warning("skipping the summary in %s: %s", kv.LOCATIONS, error)
            return None

    # -- listing ----------------------------------------------------------------------------------

    async def list(self, state: str | None = None) -> AsyncIterator[ObjectStatus]:
        """Every stored status (only those in ``state``, if given), in stream order.

        Reads the whole bucket through one ordered consumer (the last value per key); at 1M
        objects that is a full scan of the bucket, tens of seconds, so it serves
        ``status --filter`` and audits, not the controller's hot path.
        """
        try:
            watcher = await self.bucket.watchall(ignore_deletes=True)
        except nats.errors.Error as error:
            raise TransportError(f"could not list KV {kv.LOCATIONS}: {error}") from error
        try:
            while True:
                try:
                    entry = await watcher.updates(timeout=_LIST_IDLE)  # type: ignore[no-untyped-call]
                except nats.errors.TimeoutError:
                    raise TransportError(
                        f"listing KV {kv.LOCATIONS} stalled for {_LIST_IDLE:.0f} s; "
                        "is the hub up? retry"
                    ) from None
                if entry is None:  # the end of the initial values
                    return
                if entry.key == SUMMARY_KEY:
                    continue
                status = self._decode(entry.key, entry.value)
                if status is not None and (state is None or status.state == state):
                    yield status
        finally:
            with contextlib.suppress(nats.errors.Error):
                await watcher.stop()  # type: ignore[no-untyped-call]

    def _decode(self, key: str, value: bytes | None) -> ObjectStatus | None:
        try:
            return ObjectStatus.decode(value or b"")
        except (ValueError, TypeError, KeyError, AttributeError, RecursionError) as error:
            self.garbage += 1
            _log.warning("skipping %s in KV %s: %s", key, kv.LOCATIONS, error)
            return None

"""A node's ordered index of S3 object keys: a listing page costs O(log n + page), not a scan.

JetStream KV reads neither in key order nor from a point, and its subject filters match whole
tokens, not string prefixes. So each node that serves listings keeps, per bucket, the keys in
a sorted list (Python's ``str`` order is code-point order, which is UTF-8 byte order: the order
S3 lists in) with the fields a listing shows. It is built on the first listing from KV
``cim-place-s3-objects`` (one pull consumer, the last value of each key), and before every
listing it is brought up to date by reading only the KV changes since the stream sequence it
last applied; one STREAM.INFO request says how far the stream goes. A listing therefore sees
every write acknowledged before it started, on whichever node (S3's read-after-write), and
costs O(log n + page + changes since the previous listing). Memory: about 200 bytes per object
on each node that has served a listing; the index lives as long as the S3 app.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import bisect
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field

import nats.errors
from nats.js import api
from nats.js.client import JetStreamContext

from cim_place.errors import TransportError
from cim_place.http.s3.index import OBJECTS, ObjectRecord

_log = logging.getLogger(__name__)

_BATCH = 512
_EMPTY: Mapping[str, str] = {}


def bucket_token(bucket: str) -> str:
    """The first token of a bucket's object keys in the KV (see ``index.object_kv_key``)."""
    return bucket.replace(".", "_")


def decode_key(encoded: str) -> str | None:
    """The S3 key of a KV key's second token (base32hex, no padding); None if not one."""
    try:
        return base64.b32hexdecode(encoded + "=" * (-len(encoded) % 8)).decode()
    except (binascii.Error, ValueError, UnicodeDecodeError):
        return None


@dataclass
class BucketKeys:
    """One bucket's keys, sorted, and what a listing shows of each."""

    keys: list[str] = field(default_factory=list)
    records: dict[str, ObjectRecord] = field(default_factory=dict)

    def apply(self, changes: Mapping[str, ObjectRecord | None]) -> None:
        """Put or (None) remove keys; a large batch re-sorts once instead of inserting."""
        if len(changes) > 64 and len(changes) * 8 > len(self.keys):
            for key, record in changes.items():
                if record is None:
                    self.records.pop(key, None)
                else:
                    self.records[key] = record
            self.keys = sorted(self.records)
            return
        for key, record in changes.items():
            known = key in self.records
            if record is None:
                if known:
                    del self.records[key]
                    del self.keys[bisect.bisect_left(self.keys, key)]
            else:
                self.records[key] = record
                if not known:
                    bisect.insort(self.keys, key)


class OrderedKeys:
    """The sorted keys of every bucket, kept up to date from the KV (``js``: the hub's)."""

    def __init__(self, js: JetStreamContext, kv: str = OBJECTS) -> None:
        self._js = js
        self.kv = kv
        self.stream = f"KV_{kv}"
        self._buckets: dict[str, BucketKeys] = {}
        self._seq = 0
        self._lock = asyncio.Lock()
        self.applied = 0
        """KV entries read into the index so far (a listing reads only what changed)."""

    async def bucket(self, bucket: str) -> BucketKeys:
        """The keys of ``bucket`` as of now (every write acknowledged before the call)."""
        await self.refresh()
        return self._buckets.get(bucket_token(bucket)) or BucketKeys()

    async def refresh(self) -> None:
        async with self._lock:
            try:
                info = await self._js.stream_info(self.stream)
            except nats.errors.Error as exc:
                raise TransportError(f"cannot read the S3 object index: {exc}") from exc
            if info.state.last_seq > self._seq:
                await self._read_from(self._seq + 1, info.state.last_seq)

    async def _read_from(self, start: int, upto: int) -> None:
        """Apply the KV entries from sequence ``start`` (all of them at least to ``upto``)."""
        initial = start == 1
        config = api.ConsumerConfig(
            deliver_policy=(
                api.DeliverPolicy.LAST_PER_SUBJECT
                if initial
                else api.DeliverPolicy.BY_START_SEQUENCE
            ),
            opt_start_seq=None if initial else start,
            ack_policy=api.AckPolicy.NONE,
            inactive_threshold=30.0,
        )
        changes: dict[str, dict[str, ObjectRecord | None]] = {}
        seq = self._seq
        prefix = f"$KV.{self.kv}."
        try:
            sub = await self._js.pull_subscribe(f"{prefix}>", stream=self.stream, config=config)
            try:
                pending = (await sub.consumer_info()).num_pending or 0
                while pending:
                    for msg in await sub.fetch(min(pending, _BATCH), timeout=5):
                        pending = msg.metadata.num_pending
                        seq = max(seq, msg.metadata.sequence.stream)
                        self._note(changes, msg.subject[len(prefix) :], msg)
            finally:
                await sub.unsubscribe()
        except nats.errors.Error as exc:
            raise TransportError(f"cannot read the S3 object index: {exc}") from exc
        for token, bucket_changes in changes.items():
            self._buckets.setdefault(token, BucketKeys()).apply(bucket_changes)
            if not self._buckets[token].keys:
                del self._buckets[token]
        self._seq = max(seq, upto)

    def _note(
        self, changes: dict[str, dict[str, ObjectRecord | None]], kv_key: str, msg: object
    ) -> None:
        token, _, encoded = kv_key.partition(".")
        key = decode_key(encoded)
        if key is None:
            _log.warning("ignoring S3 index entry %r: not a bucket.key entry", kv_key[:100])
            return
        self.applied += 1
        data: bytes = getattr(msg, "data", b"")
        operation = (getattr(msg, "headers", None) or {}).get("KV-Operation")
        record: ObjectRecord | None = None
        if data and operation not in ("DEL", "PURGE"):
            try:
                doc = json.loads(data)
                # Only what a listing shows is kept: metadata and headers stay in the KV.
                record = ObjectRecord(
                    key=doc["key"],
                    cid=doc["cid"],
                    etag=doc["etag"],
                    size=int(doc["size"]),
                    mtime=float(doc["mtime"]),
                    metadata=_EMPTY,
                    headers=_EMPTY,
                )
            except (ValueError, KeyError, TypeError) as exc:
                _log.warning("ignoring S3 index entry %r: %s", kv_key[:100], exc)
                return
        changes.setdefault(token, {})[key] = record

"""The S3 state in the domain's KV: buckets, the key -> object index, multipart uploads.

Buckets (KV ``cim-place-s3-buckets``): one key per bucket name, JSON ``{"created", "region",
"owner"}``.

Objects (KV ``cim-place-s3-objects``): one key per object, ``<bucket>.<key in base32hex>``
(a bucket's dots become ``_``, which bucket names never hold, so ``<bucket>.>`` selects exactly
one bucket; base32hex keeps any UTF-8 key a valid KV key token). The value is the JSON of
:class:`ObjectRecord`: the S3 key, root CID, ETag, size, mtime, user metadata, stored headers,
the node that took it. Listings read the keys in order from ``cim_place.http.s3.ordered`` (a
sorted index each node keeps up to date from this KV), not from a scan of the bucket.

Uploads (KV ``cim-place-s3-uploads``): ``<upload id>.meta`` (bucket, key, node, volume,
metadata, initiated) and one ``<upload id>.p<number>`` per part (ETag, size), so parts sent in
parallel never race on one key.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import nats.errors
import nats.js.errors
from nats.js import api
from nats.js.client import JetStreamContext
from nats.js.kv import KeyValue

from cim_place.cluster.nats.kv import ensure_bucket
from cim_place.errors import TransportError

if TYPE_CHECKING:
    from cim_place.http.s3.ordered import OrderedKeys

BUCKETS = "cim-place-s3-buckets"
OBJECTS = "cim-place-s3-objects"
UPLOADS = "cim-place-s3-uploads"


def object_kv_key(bucket: str, key: str) -> str:
    encoded = base64.b32hexencode(key.encode()).decode().rstrip("=")
    return f"{bucket.replace('.', '_')}.{encoded}"


@dataclass(frozen=True, slots=True)
class BucketRecord:
    name: str
    created: float
    region: str
    owner: str = ""


@dataclass(frozen=True, slots=True)
class ObjectRecord:
    key: str
    cid: str
    etag: str
    """Without quotes."""
    size: int
    mtime: float
    metadata: Mapping[str, str] = field(default_factory=dict)
    """User metadata (x-amz-meta-*, names lower-case, without the prefix)."""
    headers: Mapping[str, str] = field(default_factory=dict)
    """Stored representation headers: content-type, content-encoding, cache-control..."""
    node: str = ""
    parts: int = 0


@dataclass(frozen=True, slots=True)
class UploadRecord:
    upload_id: str
    bucket: str
    key: str
    node: str
    volume: str
    initiated: float
    metadata: Mapping[str, str] = field(default_factory=dict)
    headers: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class PartRecord:
    number: int
    etag: str
    size: int
    mtime: float


def _json(value: Any) -> bytes:
    return json.dumps(asdict(value), sort_keys=True).encode()


class S3Index:
    """Reads and writes the three buckets (``js``: JetStream of the hub's domain)."""

    def __init__(self, js: JetStreamContext) -> None:
        self._js = js
        self._kvs: dict[str, KeyValue] = {}
        self._ordered: OrderedKeys | None = None

    async def _kv(self, name: str) -> KeyValue:
        kv = self._kvs.get(name)
        if kv is None:
            kv = self._kvs[name] = await ensure_bucket(self._js, name)
        return kv

    async def _get(self, bucket: str, key: str) -> bytes | None:
        kv = await self._kv(bucket)
        try:
            entry = await kv.get(key)
        except nats.js.errors.KeyNotFoundError:
            return None
        except nats.errors.Error as exc:
            raise TransportError(f"cannot read {bucket}/{key[:80]}: {exc}") from exc
        return entry.value

    async def _put(self, bucket: str, key: str, value: bytes) -> None:
        kv = await self._kv(bucket)
        try:
            await kv.put(key, value)
        except nats.errors.Error as exc:
            raise TransportError(f"cannot write {bucket}/{key[:80]}: {exc}") from exc

    async def _delete(self, bucket: str, key: str) -> None:
        kv = await self._kv(bucket)
        try:
            await kv.delete(key)
        except nats.errors.Error as exc:
            raise TransportError(f"cannot delete {bucket}/{key[:80]}: {exc}") from exc

    async def _scan(self, bucket: str, pattern: str, *, limit: int = 0) -> list[bytes]:
        await self._kv(bucket)
        return [v for _, v in await kv_entries(self._js, bucket, pattern, limit=limit)]

    # -- buckets --

    async def bucket(self, name: str) -> BucketRecord | None:
        value = await self._get(BUCKETS, name)
        return None if value is None else BucketRecord(**json.loads(value))

    async def create_bucket(self, record: BucketRecord) -> bool:
        """False when the bucket exists already."""
        kv = await self._kv(BUCKETS)
        try:
            await kv.create(record.name, _json(record))
        except nats.js.errors.KeyWrongLastSequenceError:
            return False
        except nats.errors.Error as exc:
            raise TransportError(f"cannot create bucket {record.name}: {exc}") from exc
        return True

    async def buckets(self) -> list[BucketRecord]:
        found = [BucketRecord(**json.loads(v)) for v in await self._scan(BUCKETS, ">")]
        return sorted(found, key=lambda b: b.name)

    async def delete_bucket(self, name: str) -> None:
        await self._delete(BUCKETS, name)

    # -- objects --

    async def get(self, bucket: str, key: str) -> ObjectRecord | None:
        value = await self._get(OBJECTS, object_kv_key(bucket, key))
        return None if value is None else _object(value)

    async def put(self, bucket: str, record: ObjectRecord) -> None:
        await self._put(OBJECTS, object_kv_key(bucket, record.key), _json(record))

    async def delete(self, bucket: str, key: str) -> None:
        await self._delete(OBJECTS, object_kv_key(bucket, key))

    async def ordered(self, bucket: str) -> tuple[Sequence[str], Mapping[str, ObjectRecord]]:
        """The keys of ``bucket`` sorted, and what a listing shows of each (the ordered
        index, up to date with every write acknowledged before the call)."""
        if self._ordered is None:
            from cim_place.http.s3.ordered import OrderedKeys

            await self._kv(OBJECTS)
            self._ordered = OrderedKeys(self._js)
        keys = await self._ordered.bucket(bucket)
        return keys.keys, keys.records

    async def objects(self, bucket: str, *, limit: int = 0) -> list[ObjectRecord]:
        """The bucket's objects sorted by key (UTF-8 byte order, as S3 lists them)."""
        pattern = f"{bucket.replace('.', '_')}.>"
        records = [_object(v) for v in await self._scan(OBJECTS, pattern, limit=limit)]
        return sorted(records, key=lambda r: r.key.encode())

    # -- uploads --

    async def upload(self, upload_id: str) -> UploadRecord | None:
        if not upload_id.isalnum() or len(upload_id) > 64:
            return None
        value = await self._get(UPLOADS, f"{upload_id}.meta")
        return None if value is None else UploadRecord(**json.loads(value))

    async def put_upload(self, record: UploadRecord) -> None:
        await self._put(UPLOADS, f"{record.upload_id}.meta", _json(record))

    async def put_part(self, upload_id: str, part: PartRecord) -> None:
        await self._put(UPLOADS, f"{upload_id}.p{part.number:05d}", _json(part))

    async def parts(self, upload_id: str) -> list[PartRecord]:
        docs = [json.loads(v) for v in await self._scan(UPLOADS, f"{upload_id}.*")]
        found = [PartRecord(**doc) for doc in docs if "number" in doc]
        return sorted(found, key=lambda p: p.number)

    async def uploads(self) -> list[UploadRecord]:
        return [UploadRecord(**json.loads(v)) for v in await self._scan(UPLOADS, "*.meta")]

    async def drop_upload(self, upload_id: str) -> None:
        for part in await self.parts(upload_id):
            await self._delete(UPLOADS, f"{upload_id}.p{part.number:05d}")
        await self._delete(UPLOADS, f"{upload_id}.meta")


async def kv_entries(
    js: JetStreamContext, bucket: str, pattern: str, *, limit: int = 0
) -> list[tuple[str, bytes]]:
    """(key, value) of the live keys matching ``pattern``, read with a pull consumer.

    Not nats-py's KV watch: its end-of-values marker can come before values the push
    consumer delivered while it was being set up (a listing right after a write came back
    empty). A pull consumer delivers nothing before it is asked, so its pending count at
    creation is exact.
    """
    values: list[tuple[str, bytes]] = []
    prefix = f"$KV.{bucket}."
    try:
        sub = await js.pull_subscribe(
            f"$KV.{bucket}.{pattern}",
            stream=f"KV_{bucket}",
            config=api.ConsumerConfig(
                deliver_policy=api.DeliverPolicy.LAST_PER_SUBJECT,
                ack_policy=api.AckPolicy.NONE,
                inactive_threshold=30.0,
            ),
        )
        try:
            pending = (await sub.consumer_info()).num_pending or 0
            while pending and not (limit and len(values) >= limit):
                for msg in await sub.fetch(min(pending, 256), timeout=5):
                    pending = msg.metadata.num_pending
                    operation = (msg.headers or {}).get("KV-Operation")
                    if msg.data and operation not in ("DEL", "PURGE"):
                        values.append((msg.subject[len(prefix) :], msg.data))
        finally:
            await sub.unsubscribe()
    except nats.errors.Error as exc:
        raise TransportError(f"cannot list {bucket} ({pattern}): {exc}") from exc
    return values[:limit] if limit else values


def _object(value: bytes) -> ObjectRecord:
    doc = json.loads(value)
    return ObjectRecord(**doc)

"""What every S3 handler shares: the node's volumes and hooks, the KV index, and the three
things an S3 write does to the domain (pin + announce, index + name, event).

An S3 object is an object of the domain: ``BUCKET/KEY`` is its domain name (KV
``cim-place-names``) and its pin's name, so policies match it by name glob or by the pin metadata
``s3-bucket``; it is pinned on this node and announced with the agent's own ``on_pinned`` hook
(the same ObjectStored an upload produces); every put and delete publishes
``<prefix>.evt.<node>.s3.ObjectCreated|ObjectRemoved`` on the node's outbox.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from cim_place.cluster.events.publisher import EventPublisher
from cim_place.cluster.nats.envelope import Content, Envelope
from cim_place.cluster.nats.subjects import Subjects
from cim_place.cluster.state.name_record import NamingError, check_name
from cim_place.cluster.state.names import NameRegistry
from cim_place.errors import CimPlaceError
from cim_place.http.s3.errors import S3Error, no_such_bucket
from cim_place.http.s3.index import BucketRecord, ObjectRecord, S3Index
from cim_place.http.s3.keys import KeyStore
from cim_place.interfaces import Pin
from cim_place.objectstore.cid import Cid, parse, to_str
from cim_place.objectstore.store import ObjectStore

_log = logging.getLogger(__name__)

OnPinned = Callable[[Pin], Awaitable[None] | None]
OnUnpinned = Callable[[Pin, str], Awaitable[None] | None]
BUCKET_LABEL = "s3-bucket"
"""Pin metadata naming an S3 object's bucket (policies: ``labels: {s3-bucket: shop}``)."""

_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_IP = re.compile(r"^\d+\.\d+\.\d+\.\d+$")
_NAME_SAFE = re.compile(r"[-/_.a-zA-Z0-9]")
MAX_KEY_BYTES = 1024


def check_bucket_name(name: str) -> str:
    if not _BUCKET.match(name) or ".." in name or ".-" in name or "-." in name or _IP.match(name):
        raise S3Error(
            "InvalidBucketName",
            f"bucket name {name[:70]!r}: 3-63 characters a-z 0-9 . -, starting and ending "
            "with a letter or digit",
        )
    return name


def check_key(key: str) -> str:
    if not key or len(key.encode()) > MAX_KEY_BYTES:
        raise S3Error("KeyTooLongError" if key else "InvalidArgument", "keys are 1-1024 bytes")
    if "\x00" in key:
        raise S3Error("InvalidArgument", "keys may not contain NUL")
    return key


def domain_name(bucket: str, key: str) -> str | None:
    """The domain name of an S3 object: ``BUCKET/KEY``, characters outside the name alphabet
    written ``=XX`` (UTF-8 bytes), a '.' that would start, end or double up written ``=2E``.
    None when the result is longer than a name may be (the object then has no domain name)."""
    out: list[str] = []
    text = f"{bucket}/{key}"
    for i, char in enumerate(text):
        dot_bad = char == "." and (i == len(text) - 1 or (out and out[-1].endswith(".")))
        if _NAME_SAFE.fullmatch(char) and not dot_bad:
            out.append(char)
        else:
            out.append("".join(f"={b:02X}" for b in char.encode()))
    name = "".join(out)
    try:
        return check_name(name)
    except NamingError:
        return None


@dataclass
class S3Context:
    node: str
    volumes: Mapping[str, ObjectStore]
    volume_for: Callable[[int | None], ObjectStore]
    index: S3Index
    keys: KeyStore
    names: NameRegistry
    events: EventPublisher
    on_pinned: OnPinned
    on_unpinned: OnUnpinned
    region: str
    nc: Any = None
    subjects: Subjects = field(default_factory=Subjects)
    on_read: Callable[[Cid, str | None, int], None] | None = None
    executor: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(8, thread_name_prefix="cim-place-s3")
    )
    name_objects: bool = True
    """Whether puts and deletes write the domain name ``BUCKET/KEY`` (see S3Node)."""

    async def need_bucket(self, bucket: str) -> BucketRecord:
        record = await self.index.bucket(bucket)
        if record is None:
            raise no_such_bucket(bucket)
        return record

    def volume_name(self, store: ObjectStore) -> str:
        return next(name for name, s in self.volumes.items() if s is store)

    def holder(self, cid: Cid) -> ObjectStore | None:
        """A volume of this node holding the whole object (pinned)."""
        for store in self.volumes.values():
            if store.pins.get(cid) is not None:
                return store
        return None

    async def fetched(self, cid: Cid, size: int) -> ObjectStore | None:
        """Fetch ``cid`` from the nodes that hold it into a volume here (verified, not pinned:
        a cached read that gc may take later); None when no node answers."""
        if self.nc is None:
            return None
        from cim_place.cluster.exchange.fetch import fetch_dag
        from cim_place.cluster.exchange.holders import find_holders

        holders = [
            h
            for h in await find_holders(self.nc, cid, expected=1, subjects=self.subjects)
            if h.node != self.node
        ]
        if not holders:
            return None
        store = self.volume_for(size)
        await fetch_dag(self.nc, cid, holders, store.blocks, subjects=self.subjects)
        return store

    async def commit(self, bucket: str, record: ObjectRecord, pin: Pin, by: str) -> None:
        """Announce the pin, index the object, name it, publish ObjectCreated; then release
        what the key held before."""
        await _call(self.on_pinned(pin))
        old = await self.index.get(bucket, record.key)
        await self.index.put(bucket, record)
        name = domain_name(bucket, record.key) if self.name_objects else None
        if name is not None:
            await self.names.set(name, pin.root, by=f"s3:{by}")
        await self.publish(
            "s3.ObjectCreated",
            bucket=bucket,
            key=record.key,
            cid=record.cid,
            etag=record.etag,
            size=record.size,
            name=name or "",
            by=by,
        )
        if old is not None and old.cid != record.cid:
            await self.release(parse(old.cid))

    async def remove(self, bucket: str, key: str, by: str) -> ObjectRecord | None:
        old = await self.index.get(bucket, key)
        if old is None:
            return None
        await self.index.delete(bucket, key)
        name = domain_name(bucket, key) if self.name_objects else None
        if name is not None:
            with contextlib.suppress(NamingError):  # removed by someone else meanwhile
                await self.names.rm(name, by=f"s3:{by}")
        await self.publish(
            "s3.ObjectRemoved", bucket=bucket, key=key, cid=old.cid, name=name or "", by=by
        )
        await self.release(parse(old.cid))
        return old

    async def release(self, cid: Cid) -> None:
        """Unpin ``cid`` on this node unless a domain name still points at it."""
        try:
            if any(record.cid == cid for record in await self.names.ls()):
                return
        except CimPlaceError as exc:
            _log.warning("not unpinning %s: names unreadable (%s)", to_str(cid), exc)
            return
        for volume, store in self.volumes.items():
            pin = store.pins.get(cid)
            if pin is not None and store.pins.remove(cid):
                await _call(self.on_unpinned(pin, volume))

    async def publish(self, event_type: str, **body: str | int) -> None:
        envelope = Envelope.new(
            Content("event", event_type, {**body, "node": self.node, "at": int(time.time())}),
            owner=self.node,
        )
        await self.events.publish(envelope)


async def _call(result: Awaitable[None] | None) -> None:
    if inspect.isawaitable(result):
        await result

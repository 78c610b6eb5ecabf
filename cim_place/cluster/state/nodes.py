"""Node registration and heartbeats in KV ``cim-place-nodes``.

Each agent writes one key (its node id) every heartbeat interval: labels, tags, volumes with
capacity/used/free bytes, version, started-at, the time of this beat and, when the node runs one,
the address of its bulk block stream. The bucket has a TTL, so a
node whose heartbeats stop expires from the bucket by itself and is seen as down; a node that
is merely late still shows its last beat, and the controller applies its own grace period.
A graceful stop does not delete the key: a restart for an upgrade is not a departure.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import nats.errors
import nats.js.errors
from nats.js.client import JetStreamContext
from nats.js.kv import KeyValue

from cim_place.cluster.nats import kv
from cim_place.errors import TransportError
from cim_place.runtime.lifecycle import cancel_and_wait

NODE_TTL = 30.0
"""Seconds after its last heartbeat that a node's record expires (the bucket's TTL)."""

_log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class VolumeStatus:
    name: str
    capacity: int
    used: int
    free: int


@dataclass(frozen=True, slots=True)
class NodeRecord:
    node: str
    labels: Mapping[str, str] = field(default_factory=dict)
    tags: tuple[str, ...] = ()
    volumes: tuple[VolumeStatus, ...] = ()
    version: str = ""
    started_at: float = 0.0
    heartbeat_at: float = 0.0
    block_stream: str = ""
    """host:port of the node's bulk block stream ("" = none); fetchers get it from a grant."""

    def encode(self) -> bytes:
        extra: dict[str, str] = {}
        if self.block_stream:
            # Only when set: records of nodes without a stream stay as they were.
            extra["block_stream"] = self.block_stream
        return json.dumps(
            {
                **extra,
                "node": self.node,
                "labels": dict(self.labels),
                "tags": list(self.tags),
                "volumes": [
                    {"name": v.name, "capacity": v.capacity, "used": v.used, "free": v.free}
                    for v in self.volumes
                ],
                "version": self.version,
                "started_at": self.started_at,
                "heartbeat_at": self.heartbeat_at,
            },
            sort_keys=True,
        ).encode()

    @classmethod
    def decode(cls, data: bytes) -> NodeRecord:
        """Parse a record; raises ValueError (with what was wrong) for anything malformed."""
        try:
            doc = json.loads(data)
            return cls(
                node=str(doc["node"]),
                labels={str(k): str(v) for k, v in doc.get("labels", {}).items()},
                tags=tuple(str(t) for t in doc.get("tags", [])),
                volumes=tuple(
                    VolumeStatus(str(v["name"]), int(v["capacity"]), int(v["used"]), int(v["free"]))
                    for v in doc.get("volumes", [])
                ),
                version=str(doc.get("version", "")),
                started_at=float(doc.get("started_at", 0.0)),
                heartbeat_at=float(doc.get("heartbeat_at", 0.0)),
                block_stream=str(doc.get("block_stream", "")),
            )
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"malformed node record: {exc!r}") from None


async def nodes_bucket(js_hub: JetStreamContext) -> KeyValue:
    return await kv.ensure_bucket(js_hub, kv.NODES, history=1, ttl=NODE_TTL)


async def list_nodes(js_hub: JetStreamContext) -> list[NodeRecord]:
    """Every node whose heartbeat has not expired, by node id; malformed records are skipped."""
    bucket = await nodes_bucket(js_hub)
    try:
        keys = await bucket.keys()
    except nats.js.errors.NoKeysError:
        return []
    records = []
    for key in sorted(keys):
        try:
            entry = await bucket.get(key)
        except nats.js.errors.KeyNotFoundError:
            continue
        if entry.value:
            try:
                records.append(NodeRecord.decode(entry.value))
            except ValueError as exc:
                _log.warning("skipping node record %s: %s", key, exc)
    return records


class Heartbeat:
    """Writes this node's record now and every ``interval`` seconds until stopped.

    :meth:`soon` asks for an early beat (the agent calls it when a pin changes its volume usage),
    so ``cim-place nodes`` shows new usage within about a second rather than an interval; early
    beats are at least ``MIN_GAP`` seconds apart, however often they are asked for.
    """

    MIN_GAP = 1.0

    def __init__(
        self,
        js_hub: JetStreamContext,
        record: Callable[[], NodeRecord],
        *,
        interval: float = 5.0,
        on_restored: Callable[[], None] | None = None,
    ) -> None:
        self._js = js_hub
        self._on_restored = on_restored
        self._record = record
        self._interval = interval
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._soon = asyncio.Event()
        # Opened on the first beat and kept: a beat is then one put, not a bucket look-up and a
        # put. Forgotten after a failed beat, so the next one opens (or re-creates) it again.
        self._bucket: KeyValue | None = None
        self.beats = 0
        self.failures = 0

    def soon(self) -> None:
        """Beat early (within ``MIN_GAP`` seconds of the last beat) instead of at the interval."""
        self._soon.set()

    async def beat(self) -> None:
        """Write one heartbeat; raises TransportError when the hub cannot be reached."""
        record = self._record()
        try:
            if self._bucket is None:
                self._bucket = await nodes_bucket(self._js)
            await self._bucket.put(record.node, record.encode())
        except nats.errors.Error as exc:
            self._bucket = None
            raise TransportError(f"heartbeat of {record.node} not written: {exc}") from exc
        self.beats += 1

    async def start(self) -> None:
        """Register (first beat, best effort: the hub may be away) and keep beating."""
        self._task = asyncio.create_task(self._run(), name="cim-place-heartbeat")

    async def _run(self) -> None:
        failing = False
        while not self._stopping:
            started = time.monotonic()
            self._soon.clear()  # a change during this beat asks for the next one
            try:
                await self.beat()
            except (TransportError, TimeoutError) as exc:
                # A leaf cut off from the hub keeps working; its record expires, as it should.
                self.failures += 1
                failing = True
                _log.debug("%s", exc)
            except Exception:
                # A heartbeat must outlive any one bad beat (a volume read failing, say).
                self.failures += 1
                failing = True
                _log.exception("heartbeat failed")
            else:
                if failing and self._on_restored is not None:
                    self._on_restored()
                failing = False
            # Until the interval ends, or an early beat is asked for (but not within MIN_GAP).
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    self._soon.wait(), max(0.0, self._interval - (time.monotonic() - started))
                )
            gap = min(self.MIN_GAP, self._interval) - (time.monotonic() - started)
            if gap > 0:
                await asyncio.sleep(gap)

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is None:
            return
        self._stopping = True
        await cancel_and_wait([task])

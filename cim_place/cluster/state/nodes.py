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
import math
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import nats.errors
import nats.js.errors
from nats.js.client import JetStreamContext
from nats.js.kv import KeyValue

from cim_place.cluster.nats import kv
from cim_place.cluster.nats.kv_listing import latest_entries
from cim_place.errors import TransportError
from cim_place.runtime.lifecycle import cancel_and_wait

NODE_TTL = 30.0
"""Seconds after its last heartbeat that a node's record expires (the bucket's TTL)."""
LATE_BEATS = 3
"""Heartbeats a node may miss before it is late (the controller's default ``late_after``:
15 s at the default 5 s interval)."""


def heartbeat_grace(interval: float) -> float:
    """Seconds a node may stay silent before it counts as late: ``LATE_BEATS`` heartbeat
    intervals, at most the record's TTL. A peer that does not answer for this long is treated
    as gone by the block exchange too
    (:func:`cim_place.cluster.exchange.fetch_model.request_timeout`).
    """
    return min(NODE_TTL, LATE_BEATS * interval)


_log = logging.getLogger(__name__)

# Limits of what a heartbeat may say (the event checks, cim_place.cluster.events.validate, use
# the same): a record outside them is not believed, so one node's junk never reaches placement.
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
MAX_BYTES = 1 << 62
"""Largest capacity, used or free byte count believed (about 4.6 EB)."""
MAX_CLOCK_SKEW = 86_400.0
MAX_LABELS = 64
MAX_TAGS = 64
MAX_VOLUMES = 256
MAX_TEXT = 256


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
        except OverflowError:
            # int(Infinity): JSON that Python's parser accepts but no byte count can be.
            raise ValueError("malformed node record: a byte count is not finite") from None


def check_node_record(
    record: NodeRecord, key: str | None = None, *, now: float | None = None
) -> str | None:
    """None when ``record`` (stored under ``key``) may be believed; else what is wrong with it.

    The node id must be valid and equal its key (a node writes only its own key; NATS enforces
    that, this catches a record that names another node); volumes named like node ids, unique,
    with capacity/used/free integers in 0..MAX_BYTES; labels, tags and texts within limits;
    times finite and plausible.
    """
    if not _NAME.match(record.node):
        return f"node id {record.node[:80]!r} is not valid"
    if key is not None and record.node != key:
        return f"record of node {record.node!r} stored under key {key[:80]!r}"
    if len(record.labels) > MAX_LABELS or len(record.tags) > MAX_TAGS:
        return f"more than {MAX_LABELS} labels or {MAX_TAGS} tags"
    for name, value in record.labels.items():
        if not name or len(name) > MAX_TEXT or len(value) > MAX_TEXT:
            return f"label {name[:40]!r} is empty or longer than {MAX_TEXT} characters"
    for tag in record.tags:
        if not tag or len(tag) > MAX_TEXT:
            return f"tag {tag[:40]!r} is empty or longer than {MAX_TEXT} characters"
    if len(record.volumes) > MAX_VOLUMES:
        return f"{len(record.volumes)} volumes; at most {MAX_VOLUMES}"
    names: set[str] = set()
    for volume in record.volumes:
        if not _NAME.match(volume.name) or volume.name in names:
            return f"volume name {volume.name[:80]!r} is not valid or not unique"
        names.add(volume.name)
        for what in ("capacity", "used", "free"):
            value = getattr(volume, what)
            if type(value) is not int or not 0 <= value <= MAX_BYTES:
                return f"volume {volume.name} {what} {value!r} is not a byte count"
    clock = time.time() if now is None else now
    for what, at in (("heartbeat_at", record.heartbeat_at), ("started_at", record.started_at)):
        # A time in the future would keep a silent node "up"; one in the past only makes it
        # look late, which is harmless, so only negative and future times are refused.
        if not math.isfinite(at) or at < 0 or at > clock + MAX_CLOCK_SKEW:
            return f"{what} {at!r} is not a plausible time"
    if len(record.version) > MAX_TEXT or len(record.block_stream) > MAX_TEXT:
        return f"version or block_stream longer than {MAX_TEXT} characters"
    return None


async def nodes_bucket(js_hub: JetStreamContext) -> KeyValue:
    return await kv.ensure_bucket(js_hub, kv.NODES, history=1, ttl=NODE_TTL)


InvalidRecord = Callable[[str, str], None]
"""Told ``(key, what is wrong)`` of each node record :func:`list_nodes` skips."""


async def list_nodes(
    js_hub: JetStreamContext, *, on_invalid: InvalidRecord | None = None
) -> list[NodeRecord]:
    """Every node whose heartbeat has not expired, by node id; malformed records and records
    that fail :func:`check_node_record` are skipped (and passed to ``on_invalid``)."""
    bucket = await nodes_bucket(js_hub)
    records = []
    for entry in sorted(await latest_entries(bucket), key=lambda e: e.key):
        key = entry.key
        if entry.value:
            try:
                record = NodeRecord.decode(entry.value)
            except ValueError as exc:
                problem: str | None = str(exc)
            else:
                problem = check_node_record(record, key)
            if problem is None:
                records.append(record)
            elif on_invalid is not None:
                on_invalid(key, problem)
            else:
                _log.warning("skipping node record %s: %s", key, problem)
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

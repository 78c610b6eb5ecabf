"""The controller at scale: replay of millions of objects through real NATS, its memory, ingest.

    .venv/bin/python bench/controller_scale.py                       # 1,000,000 objects (~4 min)
    .venv/bin/python bench/controller_scale.py --objects 100000      # a quick look
    .venv/bin/python bench/controller_scale.py --objects 10000000    # through NATS: ~1 h,
                                                                     # ~15 GB of disk in /tmp
    .venv/bin/python bench/controller_scale.py --objects 10000000 --in-process  # memory, ~10 min

The domain is the planner bench's (bench/plan.py): 100 volumes of 10 TiB on 50 nodes in 10
zones, objects with random sha2-256 CIDv1s and sizes, placed 3 copies zone-spread by the batch
planner. Simulated agents (one per node) then report every copy as the agent does: one
``ObjectStored`` envelope per copy on ``cim-place.evt.<node>.ObjectStored``, with its message id
header, published pipelined straight into ``CIM_PLACE_EVENTS`` on a real 1-server hub (a
temporary directory, a free port), as the hub's sourcing of the agents' outboxes would store it.
Objects carry no name and no metadata (``--names`` gives each a 20-byte name).

Measured in the same run, each beside its baseline:

1. **publish**: the raw JetStream publish rate of the pre-encoded events (nats-py
   ``publish_async``, pipelined; the encoding is done outside the timed part);
2. **read**: the raw JetStream read rate of the whole stream (an ordered push consumer as the
   controller's EventFeed opens it, each message counted and dropped), against
3. **replay**: a controller's start without snapshot: the real ``EventFeed`` into a fresh
   ``Projection`` until caught up (what a restart costs today); then the projection's bytes per
   object (resident-memory delta across the replay, and the bytes its arrays hold), the
   process's RSS, and the index's lookup rate;
4. **ingest** (``--backlog`` objects, default 20,000, on a second, fresh hub): each new object
   stored once by one agent (an upload), then a real ``Controller`` (leader, task rate limits
   lifted) started on that backlog until every fetch that places the two missing copies is
   enqueued: objects per second from start to the last task, beside the raw publish rate.

``--shards-ingest`` measures only step 4, with controller *processes* (``cim-place controller``
subprocesses, as deployed), once with one process and ``--shards 1`` and once with two
processes and ``--shards 2`` on the same machine, each on a fresh hub with the same backlog;
progress is read from the task stream (``CIM_PLACE_TASKS``, which no agent drains here)::

    .venv/bin/python bench/controller_scale.py --shards-ingest --backlog 4000   # ~2 min

On a machine with fewer free cores than shard processes plus the hub need, the cores bound the
ratio (the bench prints that ceiling); ``--cpu-quota 0.5`` gives each controller process half a
core through its own cgroup (bench/cpu_quota.py), which emulates a core per process.

``--walk`` measures the leader's steady-state memory: the projection of ``--objects`` objects
built in process (as ``--in-process``), then one walk of every object by a real ``Controller``
(reconcile, status index, per-object states) whose hub I/O (status reads and writes, task
enqueues) is replaced by no-ops; the RSS growth over the walk per object is printed beside the
bytes the projection's arrays hold; then one full pass's rebalance check, every object in one
go (as before the scan was bounded) beside the bounded scan, with the longest time each held
the event loop; then the forgetting of a shard no longer led (every object: the bench has one
shard), its whole time beside the longest hold of the loop::

    .venv/bin/python bench/controller_scale.py --walk --objects 200000          # ~2 min
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import gc
import os
import resource
import subprocess
import sys
import tempfile
import time
from array import array
from collections.abc import Iterator
from pathlib import Path

import nats.js.errors
import numpy as np
import numpy.typing as npt
from cpu_quota import CpuQuota
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from plan import CID_PREFIX, derive_keys, topology

from cim_place.cluster.controller import periodic
from cim_place.cluster.controller.projection import Projection
from cim_place.cluster.controller.projection_columns import _WIDTH as REPLICA_CELLS
from cim_place.cluster.controller.service import Controller, ControllerConfig
from cim_place.cluster.controller.shards import FORGET_CHUNK, forget_shard
from cim_place.cluster.events.feed import EventFeed
from cim_place.cluster.events.readers import StoredEvent
from cim_place.cluster.events.store import ensure_event_store
from cim_place.cluster.events.types import ObjectStored, event_envelope, inventory_digest
from cim_place.cluster.nats.connection import connected, jetstream
from cim_place.cluster.nats.envelope import Content, Envelope
from cim_place.cluster.nats.subjects import EVENTS_STREAM, TASKS_STREAM, Subjects
from cim_place.cluster.state.locations import LocationStore
from cim_place.cluster.state.nodes import NodeRecord, VolumeStatus, nodes_bucket
from cim_place.local.topologies import start_hub
from cim_place.placement.batch import NO_VOLUME, plan_batch
from cim_place.placement.model import NodeMap, PlacementRule, SpreadLevel, Volume

PAGE = os.sysconf("SC_PAGE_SIZE")
CHUNK = 50_000  # objects encoded, then published, per step (bounds the bench's own memory)
SUBJECTS = Subjects()


def rss() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * PAGE


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def mib(n: float) -> str:
    return f"{n / 2**20:,.0f} MiB"


# -- the synthetic domain ---------------------------------------------------------------------


class Domain:
    """The planner bench's topology and ``objects`` objects placed on it, 3 copies each."""

    def __init__(self, objects: int, seed: int, names: bool) -> None:
        rng = np.random.default_rng(seed)
        self.volumes: list[Volume] = topology(rng)
        self.node_map = NodeMap(self.volumes)
        self.names = names
        self.count = objects
        self.digests = rng.bytes(32 * objects)
        self.sizes = rng.integers(1024, 64 * 2**20, size=objects, dtype=np.int64)
        rule = PlacementRule(replicas=3, spread=SpreadLevel.ZONE, load_cap=0.25)
        keys = derive_keys(self.digests, objects)
        self.placement: npt.NDArray[np.uint16] = plan_batch(keys, self.sizes, rule, self.node_map)
        del keys
        if (self.placement == NO_VOLUME).any():
            raise SystemExit("the planner left copies unplaced: the domain is too small")
        # One envelope template per volume: the bytes of an ObjectStored whose CID and message
        # id are patched in place (dag-cbor is canonical: same lengths, same offsets).
        self.templates = [_Template(v.node, v.name, names) for v in self.node_map.volumes]

    def cid(self, i: int) -> bytes:
        return CID_PREFIX + self.digests[32 * i : 32 * i + 32]

    def events(
        self, start: int, stop: int, copies: int = 3
    ) -> Iterator[list[tuple[str, bytes, dict[str, str]]]]:
        """(subject, payload, headers) of ``copies`` ObjectStored per object, in chunks."""
        serial = start * 3
        for first in range(start, stop, CHUNK):
            chunk = []
            for i in range(first, min(stop, first + CHUNK)):
                cid = self.cid(i)
                size = int(self.sizes[i])
                for v in self.placement[i, :copies].tolist():
                    serial += 1
                    chunk.append(self.templates[v].event(cid, size, i, serial))
            yield chunk


_PLACEHOLDER_CID = CID_PREFIX + bytes(range(32))
_PLACEHOLDER_ID = "f" * 32
_PLACEHOLDER_SIZE = 2**31 + 12345  # a 4-byte CBOR integer, patched too
_RUN = os.urandom(8).hex()  # 16 hex digits: unique message ids per run


class _Template:
    def __init__(self, node: str, volume: str, names: bool) -> None:
        event = ObjectStored(
            root=_PLACEHOLDER_CID,
            size=_PLACEHOLDER_SIZE,
            blocks=1,
            volume=volume,
            owner="bench",
            name="n" * 20 if names else None,
            metadata={},
        )
        envelope = event_envelope(event, owner=node)
        data = envelope.encode().replace(envelope.id.encode(), _PLACEHOLDER_ID.encode())
        self.data = data
        self.cid_at = data.index(_PLACEHOLDER_CID)
        self.size_at = data.index(b"\x1a" + _PLACEHOLDER_SIZE.to_bytes(4, "big")) + 1
        self.id_at = [i for i in range(len(data)) if data.startswith(_PLACEHOLDER_ID.encode(), i)]
        self.name_at = data.index(b"n" * 20) if names else -1
        self.headers = {
            key: _PLACEHOLDER_ID if value == envelope.id else value
            for key, value in envelope.headers().items()
        }
        self.subject = SUBJECTS.event(node, ObjectStored.TYPE)

    def event(
        self, cid: bytes, size: int, i: int, serial: int
    ) -> tuple[str, bytes, dict[str, str]]:
        data = bytearray(self.data)
        data[self.cid_at : self.cid_at + len(cid)] = cid
        # Sizes stay 4-byte CBOR integers (64 KiB and up), so the encoding keeps its length.
        data[self.size_at : self.size_at + 4] = max(size, 65536).to_bytes(4, "big")
        message_id = f"{_RUN}{serial:016x}"
        raw_id = message_id.encode()
        for at in self.id_at:
            data[at : at + 32] = raw_id
        if self.name_at >= 0:
            data[self.name_at : self.name_at + 20] = f"object-{i:013d}".encode()
        headers = dict(self.headers)
        for key, value in headers.items():
            if value == _PLACEHOLDER_ID:
                headers[key] = message_id
        return self.subject, bytes(data), headers


async def event_store(js: JetStreamContext, domain: Domain) -> None:
    """CIM_PLACE_EVENTS as the controller creates it, taking the simulated agents' subjects
    directly (in a domain it sources them from the leaves' outboxes; the messages are the same)."""
    await ensure_event_store(js, replicas=1)
    config = (await js.stream_info(EVENTS_STREAM)).config
    config.subjects = sorted({SUBJECTS.events_of(v.node) for v in domain.volumes})
    await js.update_stream(config)


# -- 1. publish ---------------------------------------------------------------------------------


async def publish(
    js: JetStreamContext, chunks: Iterator[list[tuple[str, bytes, dict[str, str]]]], window: int
) -> tuple[int, float, float]:
    """(events, seconds publishing, seconds encoding): each chunk encoded, then published."""
    events = 0
    publishing = encoding = 0.0
    while True:
        started = time.perf_counter()
        chunk = next(chunks, None)
        encoding += time.perf_counter() - started
        if chunk is None:
            return events, publishing, encoding
        started = time.perf_counter()
        pending = []
        for subject, payload, headers in chunk:
            pending.append(await js.publish_async(subject, payload, headers=headers))
            if len(pending) >= window:
                await asyncio.gather(*pending)
                pending.clear()
        await asyncio.gather(*pending)
        publishing += time.perf_counter() - started
        events += len(chunk)


# -- 2. raw read --------------------------------------------------------------------------------


async def raw_read(nc: Client, js: JetStreamContext, total: int) -> float:
    """Seconds to receive every message of the stream, counted and dropped (no decode)."""
    done = asyncio.Event()
    count = 0

    async def on_message(msg: Msg) -> None:
        nonlocal count
        if not msg.data and msg.headers and "Status" in msg.headers:
            if msg.reply:  # flow control: ask for the next window
                await nc.publish(msg.reply)
            elif stalled := msg.headers.get("Nats-Consumer-Stalled"):
                await nc.publish(stalled)
            return
        count += 1
        if count >= total:
            done.set()

    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox, cb=on_message, pending_msgs_limit=-1, pending_bytes_limit=-1)
    started = time.perf_counter()
    info = await js.add_consumer(
        EVENTS_STREAM,
        ConsumerConfig(
            deliver_subject=inbox,
            deliver_policy=DeliverPolicy.ALL,
            ack_policy=AckPolicy.NONE,
            flow_control=True,
            idle_heartbeat=2.0,
            mem_storage=True,
            num_replicas=1,
        ),
    )
    await done.wait()
    seconds = time.perf_counter() - started
    await sub.unsubscribe()
    with contextlib.suppress(Exception):
        await js.delete_consumer(EVENTS_STREAM, info.name)
    return seconds


# -- 3. replay ----------------------------------------------------------------------------------


def held_bytes(projection: Projection) -> int:
    """Bytes allocated to the projection's per-object arrays (over-allocation included) and to
    its CID index; the interning and sparse dicts, a few KiB here, are left out."""
    index = projection._index
    total = sum(sys.getsizeof(a) for a in (index._records, index._table, index._free))
    for value in vars(projection).values():
        if isinstance(value, array | bytearray):
            total += sys.getsizeof(value)
    return total


async def replay(js: JetStreamContext, total: int) -> tuple[Projection, float, int]:
    """A fresh projection fed from the first event until caught up: (it, seconds, RSS delta)."""
    gc.collect()
    before = rss()
    projection = Projection()

    def apply(stored: StoredEvent) -> None:
        projection.apply_event(stored.envelope, node=stored.node, at=stored.stored_at)

    feed = EventFeed(js, apply)
    started = time.perf_counter()
    await feed.start()
    await feed.caught_up.wait()
    seconds = time.perf_counter() - started
    await feed.stop()
    gc.collect()
    if projection.applied != total:
        raise SystemExit(f"replay applied {projection.applied} of {total} events")
    return projection, seconds, rss() - before


def lookups(projection: Projection, domain: Domain, count: int) -> tuple[float, float]:
    """(lookups/s of the projection's CID index, of a dict of the same CIDs) over ``count``."""
    rng = np.random.default_rng(7)
    cids = [domain.cid(int(i)) for i in rng.integers(0, domain.count, size=count)]
    index = projection._index
    started = time.perf_counter()
    for cid in cids:
        index.get(cid)
    ours = time.perf_counter() - started
    table = {cid: n for n, cid in enumerate(cids)}
    started = time.perf_counter()
    for cid in cids:
        table.get(cid)
    theirs = time.perf_counter() - started
    return count / ours, count / theirs


def build_in_process(domain: Domain) -> tuple[Projection, int, float]:
    """The projection of ``domain`` built without NATS: envelopes made in memory, as the
    EventFeed hands them over, and applied directly. Returns it, the events applied and the
    seconds taken."""
    bodies = []
    for v in domain.node_map.volumes:
        event = ObjectStored(
            root=_PLACEHOLDER_CID, size=1, blocks=1, volume=v.name, owner="bench", metadata={}
        )
        bodies.append((v.node, event.body()))
    link = type(bodies[0][1]["root"])  # the codec's CID link
    projection = Projection()
    sequence = 0
    started = time.perf_counter()
    for i in range(domain.count):
        cid = domain.cid(i)
        size = int(domain.sizes[i])
        for v in domain.placement[i].tolist():
            node, template = bodies[v]
            body = dict(template)
            body["root"] = link(cid)
            body["size"] = size
            sequence += 1
            envelope = Envelope("e", "e", None, node, Content("event", "ObjectStored", body))
            projection.apply_event(envelope.with_sequence(sequence), node=node, at=1.7e9)
    return projection, sequence, time.perf_counter() - started


def fill_in_process(domain: Domain) -> None:
    """``--in-process``: the projection's memory at sizes the hub would take long to publish."""
    gc.collect()
    before = rss()
    projection, sequence, seconds = build_in_process(domain)
    gc.collect()
    delta = rss() - before
    n = len(projection)
    if n != domain.count:
        raise SystemExit(f"{n} objects tracked of {domain.count}: rejected {projection.rejections}")
    held = held_bytes(projection)
    print(f"{'build envelopes + apply_event (no NATS)':44s} {sequence / seconds:12,.0f} events/s")
    print(f"{'projection: RSS delta':44s} {delta / n:12.1f} bytes/object  ({mib(delta)})")
    print(
        f"{'projection: bytes its arrays hold':44s} {held / n:12.1f} bytes/object"
        f"  ({mib(held)}; CID index {projection._index.nbytes / n:.1f}, "
        f"table {projection._index.capacity:,} cells)"
    )
    ours, theirs = lookups(projection, domain, 200_000)
    print(f"{'CID index lookups':44s} {ours:12,.0f} /s  (baseline: dict {theirs:,.0f} /s)")
    drift_check(projection, domain)
    print(f"{'process RSS now / peak':44s} {mib(rss()):>12s} / {mib(peak_rss())}")


def drift_check(projection: Projection, domain: Domain) -> None:
    """What the shard-0 leader does per InventoryDigest (every 5 minutes per volume): list the
    roots projected on the volume and hash them, all while the event loop is held. Beside it,
    the replica column scanned as before (a lookup table gathered, then ``.any`` over rows)."""
    fullest = int(np.bincount(domain.placement.ravel()).argmax())
    volume = domain.node_map.volumes[fullest]
    started = time.perf_counter()
    roots = projection.cids_on(volume.node, volume.name)
    listed = time.perf_counter() - started
    inventory_digest(roots)
    hashed = time.perf_counter() - started - listed
    location = projection._location_id[(volume.node, volume.name)]
    column = np.frombuffer(projection._rep, dtype=np.uint16).reshape(-1, REPLICA_CELLS)
    started = time.perf_counter()
    table = np.zeros(2**16, dtype=bool)
    table[location] = True
    np.flatnonzero(table[column].any(axis=1))
    before = time.perf_counter() - started
    del column
    print(
        f"{'inventory digest of the fullest volume':44s} {(listed + hashed) * 1e3:9.0f} ms held"
        f"  ({len(roots):,} roots: listed {listed * 1e3:.0f} ms, hashed {hashed * 1e3:.0f} ms; "
        f"baseline: the column scanned as before, gather and .any over rows {before * 1e3:.0f} ms)"
    )


# -- 4. ingest by a real controller --------------------------------------------------------------


async def beat(js: JetStreamContext, domain: Domain, stop: asyncio.Event) -> None:
    """Heartbeats of the simulated agents (every 2 s), as their Heartbeat writes them."""
    bucket = await nodes_bucket(js)
    by_node: dict[str, list[Volume]] = {}
    for volume in domain.volumes:
        by_node.setdefault(volume.node, []).append(volume)
    started = time.time()
    while not stop.is_set():
        now = time.time()
        for node, volumes in by_node.items():
            record = NodeRecord(
                node=node,
                labels=dict(volumes[0].labels),
                volumes=tuple(
                    VolumeStatus(v.name, v.capacity, v.capacity - v.free, v.free) for v in volumes
                ),
                version="bench",
                started_at=started,
                heartbeat_at=now,
            )
            await bucket.put(node, record.encode())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 2.0)


async def ingest(
    directory: Path, domain: Domain, window: int, timeout: float, lease: float
) -> None:
    backlog = domain.count
    hub = start_hub(directory, size=1)
    stop = asyncio.Event()
    try:
        async with connected(hub.urls) as nc:
            js = jetstream(nc, "hub")
            await event_store(js, domain)
            beats = asyncio.create_task(beat(js, domain, stop))
            events, publishing, _ = await publish(js, domain.events(0, backlog, copies=1), window)
            config = ControllerConfig(
                servers=(hub.url,),
                identity="bench",
                lease=lease,
                full_pass_every=3600.0,
                max_tasks_per_node=1 << 40,
                max_bytes_per_node=1 << 62,
                max_tasks=1 << 40,
            )
            controller = Controller(config)
            wanted = 2 * backlog  # each object stored once, on a 3-copy policy
            started = time.perf_counter()
            await controller.start()
            try:
                await asyncio.wait_for(controller.caught_up.wait(), timeout)
                ready = time.perf_counter() - started
                deadline = time.perf_counter() + timeout
                while not controller.is_leader and time.perf_counter() < deadline:
                    await asyncio.sleep(0.01)
                leads = time.perf_counter() - started
                while controller.projection.tasks_in_flight < wanted:
                    if time.perf_counter() > deadline:
                        break
                    await asyncio.sleep(0.05)
                took = time.perf_counter() - started
                issued = controller.projection.tasks_in_flight
            finally:
                await controller.stop()
            stop.set()
            await beats
    finally:
        hub.stop()
    print(f"\n== ingest: a backlog of {backlog:,} new objects (one copy each), a real Controller")
    print(f"{'raw publish (same hub)':44s} {events / publishing:12,.0f} events/s")
    print(f"{'controller start -> caught up':44s} {ready:12.2f} s")
    print(f"{'controller start -> leads':44s} {leads:12.2f} s")
    print(
        f"{'controller start -> all fetches enqueued':44s} {took:12.2f} s  "
        f"{backlog / took:9,.0f} objects/s  ({issued:,} of {wanted:,} tasks)"
    )
    print(
        f"{'  of which leading -> all enqueued':44s} {took - leads:12.2f} s  "
        f"{backlog / (took - leads):9,.0f} objects/s"
    )


async def ingest_processes(
    directory: Path,
    domain: Domain,
    window: int,
    timeout: float,
    shards: int,
    lease: float,
    quota: float | None = None,
) -> tuple[float, float, float, float, float]:
    """Step 4 with ``shards`` controller processes (``--shards shards``): (raw publish events/s,
    seconds from spawning them to the last fetch enqueued, seconds from the first fetch to it,
    CPU seconds the controller processes used, CPU seconds the hub's nats-server used meanwhile).
    With ``quota``, each controller process runs in its own cgroup limited to that many cores."""
    backlog = domain.count
    hub = start_hub(directory, size=1)
    stop = asyncio.Event()
    config = directory / "controller.yaml"
    config.write_text(
        f"lease: {lease:g}s\nfull_pass: 1h\nmax_tasks_per_node: 1000000000\nmax_tasks: 1000000000\n"
        "max_bytes_per_node: 1000000000000000\n"
    )
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    processes: list[subprocess.Popen[bytes]] = []
    quotas: list[CpuQuota] = []
    try:
        async with connected(hub.urls) as nc:
            js = jetstream(nc, "hub")
            await event_store(js, domain)
            beats = asyncio.create_task(beat(js, domain, stop))
            events, publishing, _ = await publish(js, domain.events(0, backlog, copies=1), window)
            wanted = 2 * backlog  # each object stored once, on a 3-copy policy
            hub_pid = hub.servers[0].pid
            hub_cpu_before = cpu_seconds(hub_pid) if hub_pid else 0.0
            started = time.perf_counter()
            for i in range(shards):
                command = [sys.executable, "-m", "cim_place.cli", "controller", "--config"]
                command += [str(config), "--server", hub.url, "--identity", f"bench-{i}"]
                command += ["--shards", str(shards), "--log-level", "warning"]
                if quota is not None:
                    quotas.append(CpuQuota(quota, f"cim-bench-{os.getpid()}-{shards}-{i}"))
                    command = quotas[-1].wrap(command)
                log = (directory / f"controller-{i}.log").open("wb")
                processes.append(subprocess.Popen(command, stdout=log, stderr=log, env=env))
            first = 0.0
            issued = 0
            deadline = started + timeout
            while issued < wanted and time.perf_counter() < deadline:
                await asyncio.sleep(0.05)
                with contextlib.suppress(Exception):  # the stream appears with a controller
                    issued = (await js.stream_info(TASKS_STREAM)).state.messages
                if issued and not first:
                    first = time.perf_counter()
                if any(p.poll() is not None for p in processes):
                    raise SystemExit(f"a controller exited; see {directory}/controller-*.log")
            took = time.perf_counter() - started
            if issued < wanted:
                raise SystemExit(f"only {issued:,} of {wanted:,} tasks within {timeout:.0f} s")
            cpu = sum(cpu_seconds(p.pid) for p in processes)
            hub_pid = hub.servers[0].pid
            hub_cpu = cpu_seconds(hub_pid) - hub_cpu_before if hub_pid else 0.0
            stop.set()
            await beats
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        for cgroup in quotas:
            cgroup.remove()
        hub.stop()
    return events / publishing, took, took - (first - started), cpu, hub_cpu


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a running process (/proc/<pid>/stat)."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def shards_ingest(args: argparse.Namespace) -> None:
    print(
        f"== ingest by controller processes: a backlog of {args.backlog:,} new objects "
        "(one copy each, two to place), one shard against two"
    )
    if args.cpu_quota is not None:
        print(
            f"   each controller process limited to {args.cpu_quota:g} core(s) by its own cgroup "
            "(the hub is not): a machine with a core per process, emulated"
        )
    rates: dict[int, float] = {}
    busy_rates: dict[int, float] = {}
    cores_used: dict[int, float] = {}
    with tempfile.TemporaryDirectory(prefix="cim-bench-shards-", dir=args.tmp) as tmp:
        for shards in args.counts:
            domain = Domain(args.backlog, args.seed + 1, args.names)
            raw, took, busy, cpu, hub_cpu = await ingest_processes(
                Path(tmp) / f"shards-{shards}",
                domain,
                args.window,
                args.timeout,
                shards,
                args.lease,
                args.cpu_quota,
            )
            rates[shards] = args.backlog / took
            cores_used[shards] = (cpu + hub_cpu) / took
            busy_rates[shards] = args.backlog / busy
            print(f"{'raw publish (same hub)':44s} {raw:12,.0f} events/s")
            print(
                f"{f'{shards} shard(s), {shards} process(es): spawn -> all enqueued':44s} "
                f"{took:12.2f} s  {args.backlog / took:9,.0f} objects/s"
            )
            print(
                f"{'  first task -> all enqueued':44s} {busy:12.2f} s  "
                f"{args.backlog / busy:9,.0f} objects/s"
            )
            print(
                f"{'  controller CPU (all processes)':44s} {cpu:12.2f} s  "
                f"{1000 * cpu / args.backlog:9.2f} ms/object  "
                f"(load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)"
            )
            print(
                f"{'  hub nats-server CPU meanwhile':44s} {hub_cpu:12.2f} s  "
                f"{1000 * hub_cpu / args.backlog:9.2f} ms/object"
            )
    if not {1, 2} <= set(args.counts):
        return
    cores = os.cpu_count() or 1
    # What the machine allows: N shards cannot go faster than the cores there are over the
    # cores one shard (with its hub) kept busy, even if sharding cost nothing per object.
    print(
        f"{'cores busy (controllers + hub): one / two':44s} {cores_used[1]:12.2f} / "
        f"{cores_used[2]:.2f} of {cores}"
    )
    print(
        f"{'ceiling here: min(2, cores / one shard busy)':44s} "
        f"{min(2.0, cores / cores_used[1]):12.2f}x  "
        "(if two shards cost no more CPU per object than one)"
    )
    print(f"{'two shards / one shard (spawn -> all)':44s} {rates[2] / rates[1]:12.2f}x")
    print(
        f"{'two shards / one shard (first task -> all)':44s} {busy_rates[2] / busy_rates[1]:12.2f}x"
    )


class _NoBucket:
    """A status shard whose writes go nowhere and which holds no status."""

    _name = "none"

    async def put(self, key: str, value: bytes) -> int:
        return 0

    async def get(self, key: str) -> None:
        raise nats.js.errors.KeyNotFoundError()


class _NoQueue:
    async def enqueue(self, task: object, *, cause: object = None) -> None:
        return None


async def walk(domain: Domain) -> None:
    """The leader's memory once it has reconciled every object (``--walk``)."""
    projection, _, _ = build_in_process(domain)
    del domain.templates
    n = domain.count
    # No heartbeat comes during the walk: nodes must not turn late or down meanwhile (their
    # objects would be marked and reconciled again, with repairs).
    config = ControllerConfig(
        max_tasks=1 << 40,
        max_tasks_per_node=1 << 40,
        max_bytes_per_node=1 << 62,
        late_after=1e9,
        down_after=2e9,
    )
    controller = Controller(config)
    controller.projection = projection
    now = time.time()
    by_node: dict[str, list[Volume]] = {}
    for volume in domain.volumes:
        by_node.setdefault(volume.node, []).append(volume)
    controller._last_records = {
        node: NodeRecord(
            node=node,
            labels=dict(volumes[0].labels),
            volumes=tuple(
                VolumeStatus(v.name, v.capacity, v.capacity - v.free, v.free) for v in volumes
            ),
            heartbeat_at=now,
        )
        for node, volumes in by_node.items()
    }
    store = LocationStore(None)  # type: ignore[arg-type]

    async def shard(cid: object) -> _NoBucket:
        return _NoBucket()

    store.shard = shard  # type: ignore[method-assign,assignment]
    controller.locations = store
    controller._queue = _NoQueue()  # type: ignore[assignment]
    controller._acting = True
    controller.caught_up.set()
    controller.liveness(now)
    controller._dirty.clear()
    gc.collect()
    before = rss()
    started = time.perf_counter()
    if not await controller._walk_all():
        raise SystemExit("the walk stopped")
    took = time.perf_counter() - started
    gc.collect()
    grown = rss() - before
    print("\n== one walk of every object by a real Controller (hub I/O replaced by no-ops)")
    print(f"{'projection: bytes its arrays hold':44s} {held_bytes(projection) / n:12.1f} B/object")
    print(f"{'RSS growth over the walk':44s} {grown / n:12.1f} B/object  ({mib(grown)})")
    print(
        f"{'  of which per-object states (arrays)':44s} "
        f"{controller.object_states.nbytes / n:12.1f} B/object"
    )
    print(f"{'walk':44s} {took:12.1f} s  {n / took:9,.0f} objects/s (no hub)")
    print(f"{'process RSS now / peak':44s} {mib(rss()):>12s} / {mib(peak_rss())}")
    await rebalance_checks(controller, n)
    await forget_checks(controller)


async def rebalance_checks(controller: Controller, n: int) -> None:
    """One full pass's rebalance check after the walk: every object in one go without a
    yield (the baseline: what each full pass did before the scan was bounded), then the
    bounded scan in chunks; the time each held the event loop at most."""
    print("\n== a full pass's rebalance check (no move is due: the objects are where planned)")
    configured = controller.config
    chunk = periodic.REBALANCE_CHUNK
    runs = (
        ("every object, in one go (before)", n, n),
        (f"{configured.rebalance_scan_per_pass:,} objects, in chunks (now)", 0, chunk),
    )
    for label, scan, size in runs:
        controller.config = dataclasses.replace(
            configured, rebalance_scan_per_pass=scan or configured.rebalance_scan_per_pass
        )
        periodic.REBALANCE_CHUNK = size
        before = controller.metrics.rebalance_scanned._value.get()
        gaps = LoopGaps()
        await gaps.start()
        started = time.perf_counter()
        moves = await controller.rebalance(time.time())
        took = time.perf_counter() - started
        await gaps.stop()
        checked = controller.metrics.rebalance_scanned._value.get() - before
        print(
            f"{label:44s} {checked:12,.0f} checked in {took:.2f} s ({checked / took:,.0f}/s), "
            f"{moves} moves, event loop held at most {1000 * gaps.longest:,.0f} ms"
        )
    periodic.REBALANCE_CHUNK = chunk
    controller.config = configured


async def forget_checks(controller: Controller) -> None:
    """What a process does when it stops leading a shard: forget its objects' states and
    status rows, a chunk at a time (the bench's single shard: every object). In one go the
    loop would be held for the whole time, the baseline beside the longest hold in chunks."""
    gaps = LoopGaps()
    await gaps.start()
    started = time.perf_counter()
    forgotten = await forget_shard(
        0,
        controller.object_states,
        controller.projection.keys_at,
        (controller._under, controller._below_min),
        controller.status_index,
        won_back=lambda: False,
    )
    took = time.perf_counter() - started
    await gaps.stop()
    print("\n== a shard no longer led, forgotten (states, status rows)")
    print(
        f"{'forgotten':44s} {forgotten:12,} objects in {took:.2f} s "
        f"({1e6 * took / max(forgotten, 1):.1f} us/object): in one go the loop is held that long"
    )
    print(
        f"{'in chunks of ' + format(FORGET_CHUNK, ',') + ', loop held at most':44s} "
        f"{1000 * gaps.longest:12,.0f} ms"
    )


class LoopGaps:
    """The longest time the event loop went without giving this task a turn."""

    def __init__(self) -> None:
        self.longest = 0.0
        self._done = False
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._tick())
        await asyncio.sleep(0)

    async def stop(self) -> None:
        self._done = True
        if self._task is not None:
            await self._task

    async def _tick(self) -> None:
        last = time.perf_counter()
        while not self._done:
            await asyncio.sleep(0)
            now = time.perf_counter()
            self.longest = max(self.longest, now - last)
            last = now


# -- main -----------------------------------------------------------------------------------------


async def run(args: argparse.Namespace) -> None:
    if args.shards_ingest:
        await shards_ingest(args)
        return
    started = time.perf_counter()
    domain = Domain(args.objects, args.seed, args.names)
    print(
        f"{args.objects:,} objects, 3 copies, {len(domain.node_map.volumes)} volumes on "
        f"{len({v.node for v in domain.volumes})} nodes in 10 zones; names: "
        f"{'20 bytes' if args.names else 'none'} (domain built in "
        f"{time.perf_counter() - started:.1f} s)"
    )
    if args.in_process:
        fill_in_process(domain)
        return
    if args.walk:
        await walk(domain)
        return
    with tempfile.TemporaryDirectory(prefix="cim-bench-scale-", dir=args.tmp) as tmp:
        hub = start_hub(Path(tmp) / "hub", size=1)
        try:
            async with connected(hub.urls) as nc:
                js = jetstream(nc, "hub")
                await event_store(js, domain)
                events, publishing, encoding = await publish(
                    js, domain.events(0, args.objects), args.window
                )
                stream = await js.stream_info(EVENTS_STREAM)
                if stream.state.messages != events:
                    raise SystemExit(f"the stream holds {stream.state.messages} of {events} events")
                print(
                    f"{'raw publish (nats-py publish_async)':44s} {events / publishing:12,.0f} "
                    f"events/s  ({events:,} events, {stream.state.bytes / 2**20:,.0f} MiB "
                    f"stream; encoding apart: {encoding:.1f} s)"
                )
                seconds = await raw_read(nc, js, events)
                label = "raw read (push consumer, no decode)"
                print(f"{label:44s} {events / seconds:12,.0f} events/s")
                projection, seconds, delta = await replay(js, events)
                print(
                    f"{'replay: EventFeed -> Projection':44s} {events / seconds:12,.0f} events/s"
                    f"  ({seconds:.1f} s to caught up, {len(projection):,} objects)"
                )
            del domain.templates
            held = held_bytes(projection)
            n = len(projection)
            print(
                f"{'projection: RSS delta across the replay':44s} {delta / n:12.1f} bytes/object"
                f"  ({mib(delta)})"
            )
            print(
                f"{'projection: bytes its arrays hold':44s} {held / n:12.1f} bytes/object"
                f"  ({mib(held)}; CID index {projection._index.nbytes / n:.1f}, "
                f"table {projection._index.capacity:,} cells)"
            )
            ours, theirs = lookups(projection, domain, 200_000)
            print(f"{'CID index lookups':44s} {ours:12,.0f} /s  (baseline: dict {theirs:,.0f} /s)")
            print(f"{'process RSS now / peak':44s} {mib(rss()):>12s} / {mib(peak_rss())}")
            del projection
            gc.collect()
        finally:
            hub.stop()
        if args.backlog:
            backlog = Domain(args.backlog, args.seed + 1, args.names)
            await ingest(Path(tmp) / "ingest", backlog, args.window, args.timeout, args.lease)
    print(f"\ntotal {time.perf_counter() - started:.0f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--objects", type=int, default=1_000_000, help="objects replayed")
    parser.add_argument(
        "--backlog", type=int, default=20_000, help="new objects the controller ingests (0: skip)"
    )
    parser.add_argument("--names", action="store_true", help="give each object a 20-byte name")
    parser.add_argument("--window", type=int, default=4096, help="publishes in flight")
    parser.add_argument("--seed", type=int, default=20261205)
    parser.add_argument(
        "--in-process", action="store_true", help="projection memory only, no NATS (10M in minutes)"
    )
    parser.add_argument("--timeout", type=float, default=600.0, help="ingest hang guard (s)")
    parser.add_argument("--tmp", default=None, help="directory for the hub's stream files")
    parser.add_argument(
        "--shards-ingest",
        action="store_true",
        help="ingest only, by controller processes: one shard against two (--backlog objects)",
    )
    parser.add_argument(
        "--counts",
        type=lambda text: [int(n) for n in text.split(",")],
        default=[1, 2],
        help="with --shards-ingest: the shard counts to run, comma-separated (default 1,2)",
    )
    parser.add_argument(
        "--walk",
        action="store_true",
        help="the leader's memory after one walk of every object (in process, no hub)",
    )
    parser.add_argument(
        "--lease", type=float, default=3.0, help="the controllers' lease in seconds (default 3)"
    )
    parser.add_argument(
        "--cpu-quota",
        type=float,
        default=None,
        help="with --shards-ingest: limit each controller process to this many cores "
        "(its own cgroup; needs root; bench/cpu_quota.py)",
    )
    args = parser.parse_args()
    if args.objects < 1 or args.backlog < 0 or args.window < 1:
        print("--objects must be at least 1, --backlog at least 0, --window at least 1")
        sys.exit(2)
    asyncio.run(run(args))


if __name__ == "__main__":
    main()

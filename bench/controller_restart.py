"""Controller restart: a full replay of ``CIM_PLACE_EVENTS`` against a snapshot plus its tail.

On a real 1-server hub in a temporary directory, with the raw JetStream read rate of the same
stream measured in the same run as the baseline:

1. ``--objects`` objects at ``--copies`` copies (``ObjectStored`` events over 10 nodes with 10
   volumes each, published into outbox streams in the hub's domain and sourced into the event
   store, as leaves' outboxes are).
2. Baseline: one ordered push consumer reads the whole stream, counting messages (no decode):
   the floor of any replay on this machine.
3. Controller A starts on an empty snapshot bucket: ``start()`` -> ``caught_up`` is a full replay.
   It then writes a snapshot (reported: bytes, seconds, and how long the event loop was held).
4. ``--tail`` more events (new objects), then controller B starts: ``start()`` -> ``caught_up``
   is the snapshot load plus the tail's replay.

A placeholder process holds the leadership lease throughout (its own process, so the bench's
busy event loop never lets the lease lapse), so neither controller reconciles (no nodes exist: a
leader would write a status for every object): the figures are the projection's alone.

Usage: ``.venv/bin/python bench/controller_restart.py [--objects 1000000] [--copies 1]
[--tail 10000]`` (publishing is the slow part: about 8k events/s through the sourced outboxes).

``--synthetic N`` measures the restart at sizes the hub would take an hour to publish (10M objects
x 3 copies): the bench process builds the projection of ``bench/controller_scale.py``'s synthetic
domain in memory (no NATS), writes it as a snapshot to the hub's ``cim-place-snapshots`` bucket
(as a leading controller does), publishes ``--tail`` more events, and then starts a real
controller in a fresh process (with ``MALLOC_MMAP_THRESHOLD_=131072``, as SCALE.md says to run
it): reported are the seconds from that process's start to ``caught_up`` (interpreter and imports
included) and its peak RSS, beside the raw read of the same snapshot object (the floor).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from controller_scale import Domain, build_in_process, raw_read
from nats.js import JetStreamContext

from cim_place.cluster.controller.service import Controller, ControllerConfig
from cim_place.cluster.controller.snapshot import SNAPSHOT_BUCKET, Snapshots
from cim_place.cluster.events.publisher import EventPublisher
from cim_place.cluster.events.sources import attach_hub_outbox
from cim_place.cluster.events.store import ensure_event_store, ensure_outbox
from cim_place.cluster.events.types import ObjectStored, event_envelope
from cim_place.cluster.nats.connection import connected, jetstream
from cim_place.cluster.nats.objects import read_object
from cim_place.cluster.nats.subjects import EVENTS_STREAM
from cim_place.cluster.state.leader import LeaderElection
from cim_place.cluster.state.lease import read_leader
from cim_place.local.topologies import Hub, start_hub
from cim_place.objectstore.cid import RAW, make_cid

NODES = [f"bench{i}" for i in range(10)]
VOLUMES = [f"v{i}" for i in range(10)]
BATCH = 20_000


def stored(i: int, copy: int) -> tuple[str, ObjectStored]:
    node = NODES[(i + copy) % len(NODES)]
    return node, ObjectStored(
        root=make_cid(RAW, i.to_bytes(8, "big")),
        size=1 << 20,
        blocks=4,
        volume=VOLUMES[i % len(VOLUMES)],
        owner="bench",
        name=f"bench/object-{i}",
        metadata={},
    )


async def publish(js: JetStreamContext, first: int, objects: int, copies: int) -> float:
    """Publish the events of objects ``first``.. ``first + objects``; seconds until all stored
    in the event store."""
    publishers = {node: EventPublisher(js, node) for node in NODES}
    target = (await js.stream_info(EVENTS_STREAM)).state.last_seq + objects * copies
    started = time.perf_counter()
    for start in range(first, first + objects, BATCH):
        per_node: dict[str, list[object]] = {node: [] for node in NODES}
        for i in range(start, min(start + BATCH, first + objects)):
            for copy in range(copies):
                node, event = stored(i, copy)
                per_node[node].append(event_envelope(event, owner=node))
        await asyncio.gather(
            *(publishers[n].publish_many(e) for n, e in per_node.items())  # type: ignore[arg-type]
        )
    while (await js.stream_info(EVENTS_STREAM)).state.last_seq < target:
        await asyncio.sleep(0.05)
    for publisher in publishers.values():
        await publisher.close()
    return time.perf_counter() - started


async def restart(hub: Hub, identity: str) -> tuple[Controller, float, float]:
    """A new controller; seconds from ``start()`` to ``caught_up``, and to ``start()``'s return."""
    return await restart_at(hub.url, identity)


async def restart_at(url: str, identity: str) -> tuple[Controller, float, float]:
    """:func:`restart` on the hub at ``url``."""
    controller = Controller(
        ControllerConfig(
            servers=(url,),
            identity=identity,
            snapshot_every_events=10**12,  # written below, when the bench says
            snapshot_every=10**9,
            full_pass_every=10**6,
        )
    )
    started = time.perf_counter()
    await controller.start()
    returned = time.perf_counter() - started
    await controller.caught_up.wait()
    return controller, time.perf_counter() - started, returned


async def hold_lease(url: str) -> None:
    """Hold the controller lease until killed (the bench's placeholder leader)."""
    async with connected(url) as nc:
        election = LeaderElection(jetstream(nc, "hub"), "bench-placeholder", lease=6.0)
        await election.start()
        await asyncio.Event().wait()


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_rss_mib() -> float:
    """This process image's peak resident set (VmHWM). Not ``ru_maxrss``: after fork and exec
    that keeps the parent's peak (the bench's own, gigabytes at 10M objects)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return rss_mib()


async def prepare(js: JetStreamContext, url: str) -> subprocess.Popen[bytes]:
    """The event store and every outbox attached, and a placeholder process holding the lease
    (so no controller of the bench reconciles); returns that process."""
    await ensure_event_store(js, replicas=1)
    # The controller's own outbox (its tombstones) too, attached while the stream is empty:
    # changing the sources of a stream of a million events can outlast a request's timeout.
    for node in [*NODES, "hub"]:
        await ensure_outbox(js, node)
        await attach_hub_outbox(js, node)
    holder = subprocess.Popen([sys.executable, __file__, "--hold-lease", url])
    while (await read_leader(js)) is None:
        await asyncio.sleep(0.1)
    return holder


async def main(objects: int, copies: int, tail: int) -> None:
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="cim-place-bench-") as tmp:
        hub = start_hub(Path(tmp) / "hub", size=1)
        try:
            async with connected(hub.url) as nc:
                js = jetstream(nc, "hub")
                holder = await prepare(js, hub.url)
                events = objects * copies
                seconds = await publish(js, 0, objects, copies)
                print(
                    f"== {objects} objects x {copies} copies = {events} events over "
                    f"{len(NODES)} nodes x {len(VOLUMES)} volumes"
                )
                print(
                    f"published and sourced        {seconds:8.2f} s  {events / seconds:9.0f} ev/s"
                )
                raw = await raw_read(js._nc, js, events)
                print(f"baseline: raw JetStream read {raw:8.2f} s  {events / raw:9.0f} ev/s")

                first, full, full_start = await restart(hub, "bench-a")
                try:
                    assert len(first.projection) == objects
                    print(
                        f"restart, full replay         {full:8.2f} s  {events / full:9.0f} ev/s "
                        f"(start() -> caught_up; {full / raw:.1f}x the raw read; start() "
                        f"returned after {full_start:.2f} s)"
                    )
                    assert first.snapshots is not None
                    written = await first.snapshots.write()
                    print(
                        f"snapshot written             {written.seconds:8.2f} s  "
                        f"{written.size / 2**20:.1f} MiB, event loop held {written.stall:.3f} s"
                    )
                finally:
                    await first.stop()
                tail_seconds = await publish(js, objects, tail, 1)
                second, warm, warm_start = await restart(hub, "bench-b")
                try:
                    assert second.snapshots is not None
                    assert second.snapshots.restored == written.sequence
                    assert len(second.projection) == objects + tail
                    print(
                        f"restart, snapshot + {tail} tail {warm:8.2f} s  "
                        f"({full / warm:.1f}x faster than the full replay; tail published in "
                        f"{tail_seconds:.2f} s; start() returned after {warm_start:.2f} s, of "
                        f"which reading and restoring the snapshot "
                        f"{second.snapshots.load_seconds:.2f} s)"
                    )
                finally:
                    await second.stop()
                holder.terminate()
                holder.wait()
                print(f"bench process max RSS {rss_mib():.0f} MiB (both controllers, one process)")
        finally:
            hub.stop()


async def run_controller(url: str) -> None:
    """``--run-controller``: a controller in this fresh process; print when it caught up."""
    controller, caught_up, returned = await restart_at(url, "bench-large")
    try:
        assert controller.snapshots is not None
        print(
            json.dumps(
                {
                    "caught_up": caught_up,
                    "start_returned": returned,
                    "snapshot_load": controller.snapshots.load_seconds,
                    "restored": controller.snapshots.restored,
                    "objects": len(controller.projection),
                    "rss_mib": peak_rss_mib(),
                }
            ),
            flush=True,
        )
    finally:
        await controller.stop()


async def synthetic(objects: int, tail: int) -> None:
    """``--synthetic``: see the module docstring."""
    logging.basicConfig(level=logging.WARNING)
    started = time.perf_counter()
    domain = Domain(objects, seed=7, names=False)
    projection, events, seconds = build_in_process(domain)
    del domain
    print(
        f"== {objects:,} objects x 3 copies = {events:,} events, built in memory in "
        f"{time.perf_counter() - started:.0f} s ({events / seconds:,.0f} events/s applied)"
    )
    with tempfile.TemporaryDirectory(prefix="cim-place-bench-") as tmp:
        hub = start_hub(Path(tmp) / "hub", size=1)
        try:
            async with connected(hub.url) as nc:
                js = jetstream(nc, "hub")
                holder = await prepare(js, hub.url)
                # The snapshot stands for every event up to the stream's last one so far.
                await publish(js, objects, 1, 1)
                projection.last_sequence = (await js.stream_info(EVENTS_STREAM)).state.last_seq
                snapshots = Snapshots(js, projection)
                written = await snapshots.write()
                print(
                    f"snapshot written             {written.seconds:8.2f} s  "
                    f"{written.size / 2**20:.1f} MiB, event loop held {written.stall:.3f} s"
                )
                del projection, snapshots
                store = await js.object_store(SNAPSHOT_BUCKET)
                began = time.perf_counter()
                data = await read_object(js, store, SNAPSHOT_BUCKET, written.name)
                raw = time.perf_counter() - began
                print(
                    f"baseline: raw read of it     {raw:8.2f} s  "
                    f"{len(data) / raw / 2**20:,.0f} MiB/s (the object, no decode)"
                )
                del data
                await publish(js, objects + 1, tail, 1)
                env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
                began = time.perf_counter()
                child = await asyncio.create_subprocess_exec(
                    sys.executable,
                    __file__,
                    "--run-controller",
                    hub.url,
                    env=env,
                    stdout=asyncio.subprocess.PIPE,
                )
                line = await child.stdout.readline() if child.stdout else b""
                wall = time.perf_counter() - began
                await child.wait()
                holder.terminate()
                holder.wait()
                if not line:
                    raise SystemExit("the controller process printed nothing")
                found = json.loads(line)
                if found["objects"] != objects + tail or found["restored"] != written.sequence:
                    raise SystemExit(f"the restarted controller is not what was written: {found}")
                print(
                    f"restart, new process         {wall:8.2f} s  process start -> caught_up "
                    f"({wall - found['caught_up']:.2f} s interpreter and imports, "
                    f"{found['snapshot_load']:.2f} s reading "
                    f"and restoring the snapshot, {tail:,}-event tail; {wall / raw:.1f}x the raw "
                    f"read)"
                )
                print(
                    f"controller peak RSS          {found['rss_mib']:8.0f} MiB  "
                    f"({found['rss_mib'] * 2**20 / found['objects']:.0f} B/object, process "
                    f"included)"
                )
        finally:
            hub.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--objects", type=int, default=1_000_000)
    parser.add_argument("--copies", type=int, default=1)
    parser.add_argument("--tail", type=int, default=10_000)
    parser.add_argument("--synthetic", type=int, metavar="N", help="see the module docstring")
    parser.add_argument("--hold-lease", metavar="URL", help=argparse.SUPPRESS)
    parser.add_argument("--run-controller", metavar="URL", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run_controller:
        asyncio.run(run_controller(args.run_controller))
    elif args.synthetic:
        asyncio.run(synthetic(args.synthetic, args.tail))
    elif args.hold_lease:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(hold_lease(args.hold_lease))
    else:
        asyncio.run(main(args.objects, args.copies, args.tail))

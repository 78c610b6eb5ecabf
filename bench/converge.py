"""Convergence: from ``add`` to three pinned copies, and the controller's event ingest rate.

Two parts, each on its own real nats-servers in a temporary directory, with baselines measured
in the same run:

1. **convergence** (a 1-server hub, 4 leaves, one in-process :class:`Agent` per leaf in zones
   z1..z4 with fsync "none", a :class:`Controller` started first, a policy of 3 copies in
   different zones): for each of ``--objects`` distinct 1 KiB payloads, the time from the start
   of :func:`~cim_place.cluster.exchange.upload_client.upload` (round robin over the 4 nodes, from a
   client on
   the hub) to the moment 3 agents hold the object pinned. An agent subclass records the moment
   it announces each ObjectStored (right after the pin), so no polling skews the figure.
   Objects go ``--concurrency`` at a time (default 1: sequentially). Printed: p50 / p99 / max,
   with the steps (upload answered, fetch tasks enqueued, second and third copy) and, as
   baselines, a raw request/reply round trip hub client -> leaf client and a durable publish
   into a leaf outbox. Target: p50 <= 200 ms.
2. **ingest** (a 1-server hub and 4 leaves, no agents): ``--events`` ObjectStored events for
   objects that do not exist, published with ``EventPublisher.publish_many`` into the 4 leaf
   outboxes and sourced into the hub's event store; then a fresh :class:`Controller` starts and
   the rate at which its projection applies the backlog is measured (``projection.applied``,
   polled every 2 ms, from the first event applied to the last; also start to ``caught_up``).
   Beside it: the raw pipelined ``js.publish_async`` rate of one publisher, same payloads and
   headers, into a scratch stream on the same hub. Target: ingest >= the publish rate of one
   publisher.

Part 2 runs ``--rounds`` times on the same backlog (each round: the raw publisher into a new
scratch stream, then a new controller), and reports the median of the rounds' ratios, which a
machine shared with other work disturbs less than a single pair of figures.

Usage: ``.venv/bin/python bench/converge.py [--objects 200] [--events 20000] [--concurrency 1]
[--rounds 3]``
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import random
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats.errors
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import StorageType, StreamConfig

from cim_place.cluster.agent.config import AgentConfig, VolumeConfig
from cim_place.cluster.agent.service import Agent
from cim_place.cluster.controller.service import Controller, ControllerConfig
from cim_place.cluster.events.publisher import EventPublisher
from cim_place.cluster.events.sources import attach_leaf
from cim_place.cluster.events.store import ensure_event_store, ensure_outbox
from cim_place.cluster.events.types import ObjectStored, event_envelope
from cim_place.cluster.exchange.fetch import wait_for_holder
from cim_place.cluster.exchange.upload_client import upload
from cim_place.cluster.nats.connection import connected, jetstream
from cim_place.cluster.nats.envelope import Envelope
from cim_place.cluster.nats.subjects import EVENTS_STREAM, Subjects
from cim_place.cluster.state.nodes import list_nodes
from cim_place.cluster.state.policies import PolicyStore
from cim_place.interfaces import Pin
from cim_place.local.servers import NatsServer
from cim_place.local.topologies import Hub, add_leaf, start_hub
from cim_place.objectstore.cid import RAW, Cid, make_cid
from cim_place.objectstore.unixfs import import_file
from cim_place.placement.reconcile_model import ReconcileResult
from cim_place.policies.validate import load_text

NODES = [f"n{i}" for i in range(1, 5)]
POLICY = """
name: three-zones
replicas: 3
spread: {domain: zone, max_per_domain: 1}
"""
OBJECT_SIZE = 1024
COPIES = 3
SCRATCH = "BENCH_SCRATCH"


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def ms(seconds: float) -> str:
    return f"{seconds * 1000:8.1f} ms"


def load_average() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} {five:.2f} {fifteen:.2f}"


# -- part 1: convergence --------------------------------------------------------------------------


@dataclass
class Timeline:
    """When each step of one object's convergence happened (perf_counter seconds)."""

    started: float = 0.0
    uploaded: float = 0.0
    enqueued: float = 0.0
    pins: list[float] = field(default_factory=list)
    converged: asyncio.Event = field(default_factory=asyncio.Event)


class Watch:
    """The timelines of the objects in flight, keyed by root CID."""

    def __init__(self) -> None:
        self.timelines: dict[bytes, Timeline] = {}

    def pinned(self, root: bytes) -> None:
        timeline = self.timelines.get(root)
        if timeline is None:
            return
        timeline.pins.append(time.perf_counter())
        if len(timeline.pins) >= COPIES:
            timeline.converged.set()

    def enqueued(self, root: bytes) -> None:
        timeline = self.timelines.get(root)
        if timeline is not None and not timeline.enqueued:
            timeline.enqueued = time.perf_counter()


class WatchedAgent(Agent):
    """An agent that reports the moment it announces a pinned copy (the pin precedes it)."""

    watch: Watch

    async def _announce_stored(self, pin: Pin, volume: str) -> None:
        self.watch.pinned(pin.root)
        await super()._announce_stored(pin, volume)


class WatchedController(Controller):
    """A controller that reports the moment it has enqueued an object's first tasks."""

    watch: Watch

    async def reconcile_one(self, cid: Cid, *, rebalance: bool = False) -> ReconcileResult | None:
        result = await super().reconcile_one(cid, rebalance=rebalance)
        if result is not None and result.actions:
            self.watch.enqueued(cid)
        return result


def payload(i: int) -> bytes:
    return random.Random(f"object-{i}").randbytes(OBJECT_SIZE)


async def until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not reached within {timeout:.0f} s")
        await asyncio.sleep(0.01)


async def converge_one(nc: Any, watch: Watch, i: int, seed: int) -> Timeline:
    """Upload object ``seed`` through node ``i % 4`` and wait for its third pinned copy."""
    data = payload(seed)
    node = NODES[i % len(NODES)]
    # The root CID is computed before the clock starts (as `cim-place cid` does) so that the
    # timeline is registered before any pin, the upload's own included, can be announced.
    root = import_file(io.BytesIO(data), None).root
    timeline = Timeline()
    watch.timelines[root] = timeline
    try:
        timeline.started = time.perf_counter()
        result = await upload(
            nc, node, io.BytesIO(data), name=f"obj-{seed}", owner="bench", size=len(data)
        )
        timeline.uploaded = time.perf_counter()
        if result.cid != root:
            raise AssertionError("the agent stored another root CID than the bench computed")
        await asyncio.wait_for(timeline.converged.wait(), timeout=60)
    finally:
        del watch.timelines[root]
    return timeline


async def baselines(hub: Hub, leaf: NatsServer, samples: int = 200) -> dict[str, float]:
    """p50 of a raw request/reply hub -> leaf client and of one durable outbox publish."""
    out: dict[str, float] = {}
    async with connected(hub.url) as hub_nc, connected(leaf.url) as leaf_nc:

        async def echo(msg: Msg) -> None:
            await msg.respond(b"ok")

        await leaf_nc.subscribe("bench.echo", cb=echo)
        await leaf_nc.flush()
        # The leaf forwards the new interest to the hub asynchronously: retry until it is there.
        for _ in range(100):
            try:
                await hub_nc.request("bench.echo", b"", timeout=2.0)
                break
            except nats.errors.NoRespondersError:
                await asyncio.sleep(0.02)
        times = []
        for _ in range(samples):
            started = time.perf_counter()
            await hub_nc.request("bench.echo", b"", timeout=2.0)
            times.append(time.perf_counter() - started)
        out["request/reply hub client -> leaf client"] = statistics.median(times)
        js_leaf = jetstream(leaf_nc)
        await ensure_outbox(js_leaf, "bench-base")
        publisher = EventPublisher(js_leaf, "bench-base")
        times = []
        for i in range(samples):
            envelope = event_envelope(stored(-1 - i), owner="bench-base")
            started = time.perf_counter()
            await publisher.publish(envelope)
            times.append(time.perf_counter() - started)
        out["durable publish into a leaf outbox"] = statistics.median(times)
    return out


async def bench_convergence(tmp: Path, objects: int, concurrency: int) -> None:
    print(
        f"== convergence: {objects} objects of {OBJECT_SIZE} B, {COPIES} copies in 3 of 4 zones, "
        f"{concurrency} at a time (load {load_average()})"
    )
    hub = start_hub(tmp / "hub", size=1)
    leaves: dict[str, NatsServer] = {}
    agents: list[WatchedAgent] = []
    controller: WatchedController | None = None
    watch = Watch()
    try:
        for name in NODES:
            leaves[name] = add_leaf(hub, tmp / "leaves" / name, name)
        async with connected(hub.url) as nc:
            store = await PolicyStore.open(jetstream(nc, "hub"), create=True)
            await store.apply(load_text(POLICY, "bench.yaml"), actor="bench")
        # The controller first, as `cim-place up` does: it creates the streams the agents use.
        controller = WatchedController(ControllerConfig(servers=(hub.url,), identity="bench"))
        controller.watch = watch
        await controller.start()
        for index, name in enumerate(NODES, start=1):
            config = AgentConfig(
                node=name,
                volumes=(VolumeConfig("v0", tmp / "volumes" / name),),
                servers=(leaves[name].url,),
                labels={"region": "eu", "zone": f"z{index}", "host": name},
            )
            agent = WatchedAgent(config, fsync="none")
            agent.watch = watch
            await agent.start()
            agents.append(agent)
        ctl = controller
        await until(lambda: ctl.is_leader and ctl.caught_up.is_set(), 60, "controller leads")
        async with connected(hub.url) as nc:
            for name in NODES:
                assert await wait_for_holder(nc, name, timeout=30)
            js = jetstream(nc, "hub")
            deadline = time.monotonic() + 30
            while len(await list_nodes(js)) < len(NODES) and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            # Warm-up: the controller sees every node, the task consumers and inboxes exist.
            for i in range(8):
                await converge_one(nc, watch, i, seed=-1 - i)
            timelines: list[Timeline] = []
            queue = list(range(objects))
            failures = 0

            async def worker() -> None:
                nonlocal failures
                while queue:
                    i = queue.pop(0)
                    try:
                        timelines.append(await converge_one(nc, watch, i, seed=i))
                    except TimeoutError:
                        failures += 1

            began = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(concurrency)))
            elapsed = time.perf_counter() - began
        base = await baselines(hub, leaves[NODES[0]])
        report_convergence(timelines, failures, elapsed, base)
    finally:
        for agent in agents:
            await agent.stop(grace=1)
        if controller is not None:
            await controller.stop()
        for leaf in leaves.values():
            leaf.stop()
        hub.stop()


def report_convergence(
    timelines: list[Timeline], failures: int, elapsed: float, base: dict[str, float]
) -> None:
    total = [t.pins[COPIES - 1] - t.started for t in timelines]

    def line(label: str, samples: list[float], target: str = "") -> None:
        print(
            f"{label:44s} p50 {ms(percentile(samples, 0.5))}  p99 {ms(percentile(samples, 0.99))}"
            f"  max {ms(max(samples))}  {target}"
        )

    line("add -> 3 copies pinned", total, "(target p50 <= 200 ms)")
    line("  add -> upload answered (1st copy)", [t.uploaded - t.started for t in timelines])
    enqueued = [t for t in timelines if t.enqueued]
    line("  upload answered -> fetch tasks enqueued", [t.enqueued - t.uploaded for t in enqueued])
    line("  tasks enqueued -> 2nd copy pinned", [t.pins[1] - t.enqueued for t in enqueued])
    line("  tasks enqueued -> 3rd copy pinned", [t.pins[2] - t.enqueued for t in enqueued])
    print(
        f"{len(timelines)} converged, {failures} not within 60 s; {len(timelines) / elapsed:.1f} "
        f"objects/s overall"
    )
    for label, seconds in base.items():
        print(f"baseline: {label:35s} p50 {ms(seconds)}")


# -- part 2: ingest -------------------------------------------------------------------------------


def stored(i: int) -> ObjectStored:
    return ObjectStored(
        root=make_cid(RAW, i.to_bytes(8, "big", signed=True)),
        size=OBJECT_SIZE,
        blocks=1,
        volume="v0",
        owner="bench",
        name=f"object-{i}",
        metadata={"source": "bench"},
    )


async def timed(action: Awaitable[object]) -> float:
    started = time.perf_counter()
    await action
    return time.perf_counter() - started


async def raw_publish(
    js: JetStreamContext, stream: str, messages: list[tuple[str, bytes, dict[str, str]]]
) -> None:
    futures = [
        await js.publish_async(subject, data, stream=stream, headers=headers)
        for subject, data, headers in messages
    ]
    await asyncio.gather(*futures)


@dataclass
class IngestRound:
    """One round of part 2: the raw publisher's rate, then a fresh controller's ingest."""

    raw_rate: float
    ingest: float
    caught_up: float
    start: float
    load: str
    raw_cpu: float
    """Events per CPU-second of this process while publishing raw (the publisher's own cost)."""
    ingest_cpu: float
    """Events per CPU-second of this process (the controller) from first event to last."""

    @property
    def ratio(self) -> float:
        return self.ingest / self.raw_rate


async def ingest_round(
    js_hub: JetStreamContext,
    hub: Hub,
    messages: list[tuple[str, bytes, dict[str, str]]],
    total: int,
    index: int,
) -> IngestRound:
    """Raw publish into a new scratch stream, then a new controller reads the whole backlog."""
    load = load_average()
    # Baseline: one publisher, the same payloads and headers, into a scratch stream on the hub
    # (file storage, deduplication by Nats-Msg-Id as in the outboxes). A new stream per round,
    # or the duplicate window would turn every publish of a later round into a cheap duplicate.
    scratch = f"{SCRATCH}_{index}"
    await js_hub.add_stream(
        StreamConfig(
            name=scratch,
            subjects=[f"bench.scratch{index}.>"],
            storage=StorageType.FILE,
            duplicate_window=120.0,
        )
    )
    ours = [
        (f"bench.scratch{index}.{subject}", data, headers) for subject, data, headers in messages
    ]
    await raw_publish(js_hub, scratch, ours[:100])  # warm-up: inboxes, stream files
    cpu = time.process_time()
    raw_seconds = await timed(raw_publish(js_hub, scratch, ours[100:] + ours[:100]))
    raw_cpu = time.process_time() - cpu
    await js_hub.delete_stream(scratch)

    controller = Controller(ControllerConfig(servers=(hub.url,), identity=f"bench-ingest-{index}"))
    projection = controller.projection
    first = 0.0
    first_cpu = 0.0
    applied = 0

    async def watch() -> float:
        # Polls from before start(): events already flow while start() finishes its setup.
        nonlocal first, first_cpu, applied
        while projection.applied < total:
            if not first and projection.applied:
                first, first_cpu = time.perf_counter(), time.process_time()
                applied = projection.applied
            await asyncio.sleep(0.002)
        return time.perf_counter()

    watcher = asyncio.create_task(watch())
    try:
        started = time.perf_counter()
        await controller.start()
        ready = time.perf_counter()
        applied_at = await watcher
        ingest_cpu = time.process_time() - first_cpu
        await controller.caught_up.wait()
        caught_up_at = time.perf_counter()
    finally:
        watcher.cancel()
        await controller.stop()
    return IngestRound(
        raw_rate=total / raw_seconds,
        ingest=total / (applied_at - first),
        caught_up=caught_up_at - started,
        start=ready - started,
        load=load,
        raw_cpu=total / raw_cpu,
        ingest_cpu=(total - applied) / ingest_cpu,
    )


async def bench_ingest(tmp: Path, events: int, rounds: int) -> None:
    print(
        f"== ingest: {events} ObjectStored events over {len(NODES)} leaf outboxes, {rounds} "
        f"round(s) (load {load_average()})"
    )
    hub = start_hub(tmp / "hub", size=1)
    leaves: dict[str, NatsServer] = {}
    subjects = Subjects()
    try:
        for name in NODES:
            leaves[name] = add_leaf(hub, tmp / "leaves" / name, name)
        async with connected(hub.url) as hub_nc:
            js_hub = jetstream(hub_nc, "hub")
            await ensure_event_store(js_hub, replicas=1)
            per_node = events // len(NODES)
            batches: dict[str, list[Envelope]] = {
                name: [
                    event_envelope(stored(n * per_node + i), owner=name) for i in range(per_node)
                ]
                for n, name in enumerate(NODES)
            }
            total = per_node * len(NODES)

            publish_seconds = 0.0
            for name in NODES:
                async with connected(leaves[name].url) as leaf_nc:
                    js_leaf = jetstream(leaf_nc)
                    await ensure_outbox(js_leaf, name, subjects)
                    await attach_leaf(js_hub, name)
                    publisher = EventPublisher(js_leaf, name, subjects=subjects)
                    publish_seconds += await timed(publisher.publish_many(batches[name]))
                    await publisher.close()
            began = time.perf_counter()
            while (await js_hub.stream_info(EVENTS_STREAM)).state.messages < total:
                await asyncio.sleep(0.05)
            sourced = time.perf_counter() - began

            messages = [
                (f"{name}.ObjectStored", e.encode(), e.headers())
                for name, batch in batches.items()
                for e in batch
            ]
            results = []
            for index in range(rounds):
                result = await ingest_round(js_hub, hub, messages, total, index)
                results.append(result)
                print(
                    f"round {index + 1}: controller ingest (first event -> all applied) "
                    f"{result.ingest:7.0f} events/s, raw js.publish_async {result.raw_rate:7.0f} "
                    f"events/s: {result.ratio:.2f}x; start() -> caught_up {result.caught_up:.2f} s "
                    f"(start() {result.start:.2f} s); load {result.load}; per CPU-second of "
                    f"this process: ingest {result.ingest_cpu:.0f}, raw publish "
                    f"{result.raw_cpu:.0f} events"
                )

        ratio = statistics.median(r.ratio for r in results)
        print(
            f"controller ingest, median of {rounds}      "
            f"{statistics.median(r.ingest for r in results):9.0f} events/s  "
            f"({ratio:.2f}x the raw publisher, median of the rounds' ratios; target >= 1x)"
        )
        print(
            f"baseline: raw js.publish_async, one publisher  "
            f"{statistics.median(r.raw_rate for r in results):9.0f} events/s (median)"
        )
        print(
            f"  per CPU-second of the bench process (median): ingest "
            f"{statistics.median(r.ingest_cpu for r in results):.0f} events, raw publisher "
            f"{statistics.median(r.raw_cpu for r in results):.0f} events (less disturbed by "
            "other load than the rates)"
        )
        print(
            f"  start() -> caught_up {statistics.median(r.caught_up for r in results):6.2f} s "
            "(median; caught_up once the event that left nothing pending is applied)"
        )
        print(
            f"for reference: EventPublisher.publish_many      {total / publish_seconds:9.0f} "
            f"events/s; sourcing into {EVENTS_STREAM} done {sourced:.2f} s after the last ack"
        )
    finally:
        for leaf in leaves.values():
            leaf.stop()
        hub.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--objects", type=int, default=200, help="objects to converge")
    parser.add_argument("--concurrency", type=int, default=1, help="objects in flight at once")
    parser.add_argument("--events", type=int, default=20000, help="events for the ingest rate")
    parser.add_argument(
        "--rounds", type=int, default=3, help="ingest rounds (raw publish, then a new controller)"
    )
    parser.add_argument("--skip-convergence", action="store_true")
    parser.add_argument("--skip-ingest", action="store_true")
    args = parser.parse_args()
    print(f"load average at start: {load_average()}")
    with tempfile.TemporaryDirectory(prefix="cim-bench-converge-") as tmp:
        if not args.skip_convergence:
            asyncio.run(bench_convergence(Path(tmp) / "converge", args.objects, args.concurrency))
        if not args.skip_ingest:
            asyncio.run(bench_ingest(Path(tmp) / "ingest", args.events, args.rounds))


if __name__ == "__main__":
    main()

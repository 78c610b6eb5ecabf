"""Status lookups against a big locations bucket, and the controller projection's cost.

Two parts, each with its own baseline printed beside it:

1. **projection** (in-process, no NATS): fills a
   :class:`~cim_place.cluster.controller.projection.Projection`
   with ``--projection-objects`` objects, three replicas each over 20 nodes x 5 volumes, from
   ObjectStored envelopes, and reports the resident memory it holds per object (target: at most
   ~300 bytes), the rate of ``apply_event`` on decoded envelopes (what a rebuild pays after the
   EventReader decoded them) and of decode + apply, beside the rate of the envelope decode alone
   and a bare loop; plus the time of a node-index scan (``cids_on``), a drift check and a policy
   change at that size. A publisher's rate, for comparison, is bench/announce.py's (about 15k/s).
2. **locations store** (a real 1-server hub in a temporary directory): loads ``--objects``
   ObjectStatus records into the locations (the 16 shard buckets ``cim-place-locations-NN``)
   with pipelined publishes to ``$KV.<shard>.<cid>`` (load time, stream bytes, disk and server
   memory), then times ``LocationStore.get`` over ``--samples`` random CIDs (p50/p99; target p99
   <= 10 ms) three times: after the load and ``--settle`` seconds idle (default 130; the
   first touch of each block), again over other CIDs (warm), and after a restart of the hub server
   (every file-store block cold),
   ``summary()`` (target <= 1 s), and the wall time of ``cim-place status CID`` (target <= 0.6 s)
   when that command is installed, beside a ``python -c`` that imports only the modules a lookup
   needs and does one get (the floor). Baselines: a raw ``nc.request``
   round trip to an echo responder, a raw KV get of a tiny key, and ``python -c pass`` /
   ``python -c "import nats"``.

3. **status index** (bench/status_index.py): ``--index-objects`` rows in the controller's
   status index served by its handler on a real hub: one object and pages of 100 for each
   listing filter (targets p99 <= 10 ms and <= 50 ms), beside a scan of ``--scan-objects``
   statuses in the location shards (what ``status --filter`` did before the index).

Quick run: ``.venv/bin/python bench/status.py`` (100k objects in every part).
Issue 6's target size: ``.venv/bin/python bench/status.py --objects 1000000
--projection-objects 1000000 --skip-index`` (about 3 minutes; the bucket takes about 650 MiB of
disk). The index at that size: ``--skip-projection --skip-store --index-objects 1000000
--scan-objects 200000`` (about 4 minutes on a busy machine).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from cim_place.cluster.controller.projection import Projection
from cim_place.cluster.events.types import ObjectStored
from cim_place.cluster.nats import kv
from cim_place.cluster.nats.connection import connected, jetstream
from cim_place.cluster.nats.envelope import Content, Envelope, decode
from cim_place.cluster.state.locations import LocationStore, shard_of
from cim_place.local.topologies import Hub, start_hub
from cim_place.objectstore.cid import RAW, Cid, make_cid, to_str
from cim_place.placement.status import Condition, Location, ObjectStatus, Summary
from cim_place.policies.model import Policy, PolicySet, Replicas

NODES = [f"node-{n:02d}" for n in range(20)]
VOLUMES = [f"vol-{v}" for v in range(5)]
PAGE = os.sysconf("SC_PAGE_SIZE")


def rss(pid: int | str = "self") -> int:
    """Resident bytes of a process (Linux /proc)."""
    with open(f"/proc/{pid}/statm") as statm:
        return int(statm.read().split()[1]) * PAGE


def cid_of(i: int) -> Cid:
    return make_cid(RAW, i.to_bytes(8, "big"))


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def ms(seconds: float) -> str:
    return f"{seconds * 1000:8.3f} ms"


# -- part 1: the projection ----------------------------------------------------------------------


def stored_envelopes(count: int, start: int = 0) -> Iterator[tuple[Envelope, str]]:
    """Three ObjectStored envelopes per object (one per replica node) and the publishing node."""
    rng = random.Random(start)
    sequence = start * 3
    for i in range(start, start + count):
        root = cid_of(i)
        for node in rng.sample(NODES, 3):
            sequence += 1
            event = ObjectStored(
                root=root,
                size=1 << 20,
                blocks=1,
                volume=rng.choice(VOLUMES),
                owner="bench",
                name=f"object-{i}",
                metadata={"source": "bench"},
            )
            content = Content("event", event.TYPE, event.body())
            yield Envelope(f"e{sequence}", f"e{sequence}", None, node, content, {}, sequence), node


def bench_projection(objects: int, rate_events: int) -> None:
    print(f"== projection: {objects} objects x 3 replicas over {len(NODES) * len(VOLUMES)} volumes")
    gc.collect()
    before = rss()
    projection = Projection()
    started = time.perf_counter()
    for envelope, node in stored_envelopes(objects):
        projection.apply_event(envelope, node=node, at=1.0)
    fill = time.perf_counter() - started
    gc.collect()
    held = rss() - before
    print(
        f"memory held (RSS delta)          {held / 2**20:9.1f} MiB  "
        f"{held / objects:6.0f} bytes/object (target <= 300)"
    )
    print(f"fill incl. building envelopes    {fill:9.2f} s   {3 * objects / fill:9.0f} events/s")

    # Rates on a fresh projection, from envelopes built beforehand (as the EventReader hands them).
    sample = list(stored_envelopes(rate_events // 3, start=objects))
    encoded = [(e.encode(), e.sequence, node) for e, node in sample]
    fresh = Projection()
    started = time.perf_counter()
    for envelope, node in sample:
        fresh.apply_event(envelope, node=node, at=1.0)
    apply_s = time.perf_counter() - started
    started = time.perf_counter()
    for data, sequence, _node in encoded:
        decode(data, sequence=sequence)
    decode_s = time.perf_counter() - started
    fresh = Projection()
    started = time.perf_counter()
    for data, sequence, node in encoded:
        fresh.apply_event(decode(data, sequence=sequence), node=node, at=1.0)
    both_s = time.perf_counter() - started
    started = time.perf_counter()
    for _item in sample:
        pass
    loop_s = time.perf_counter() - started
    n = len(sample)
    print(f"apply_event (decoded envelopes)  {n / apply_s:9.0f} events/s")
    print(f"decode + apply_event             {n / both_s:9.0f} events/s")
    print(f"baseline: decode alone           {n / decode_s:9.0f} events/s")
    print(f"baseline: bare loop              {n / max(loop_s, 1e-9):9.0f} events/s")
    print("(one publisher: ~15k events/s, bench/announce.py)")

    started = time.perf_counter()
    on_node = projection.cids_on(NODES[0])
    print(f"cids_on(node) at {objects}: {ms(time.perf_counter() - started)} ({len(on_node)} CIDs)")
    projection.apply_event(
        Envelope(
            "d",
            "d",
            None,
            NODES[0],
            Content(
                "event",
                "InventoryDigest",
                {"volume": VOLUMES[0], "pins": 0, "size": 0, "digest": bytes(32), "taken_at": 1.0},
            ),
        )
    )
    started = time.perf_counter()
    drift = projection.drift(NODES[0], VOLUMES[0])
    print(f"drift(node, volume):         {ms(time.perf_counter() - started)} (drift={drift})")
    policies = PolicySet(policies=(Policy(name="three", replicas=Replicas(3, 3)),))
    started = time.perf_counter()
    dirty = projection.set_policies(policies)
    print(f"set_policies (marks all):    {ms(time.perf_counter() - started)} ({len(dirty)} CIDs)")


# -- part 2: the locations store -----------------------------------------------------------------


def object_status(i: int) -> ObjectStatus:
    rng = random.Random(i)
    return ObjectStatus(
        cid=to_str(cid_of(i)),
        state="placed",
        locations=tuple(
            Location(node, rng.choice(VOLUMES), f"zone-{NODES.index(node) % 10}")
            for node in rng.sample(NODES, 3)
        ),
        desired=3,
        policy="three",
        name=f"object-{i}",
        owner="bench",
        size=1 << 20,
        metadata={"source": "bench"},
        conditions=(Condition("Placed", True, "DesiredMet", "3 of 3 copies pinned", 1.0),),
        updated_at=1.0,
    )


async def load(js: JetStreamContext, objects: int, window: int = 8192) -> float:
    """Write ``objects`` statuses straight to the shards' streams, pipelined; seconds taken."""
    started = time.perf_counter()
    pending = []
    for i in range(objects):
        status = object_status(i)
        subject = f"$KV.{kv.location_shard(shard_of(status.cid))}.{status.cid}"
        pending.append(await js.publish_async(subject, status.encode()))
        if len(pending) >= window:
            await asyncio.gather(*pending)
            pending.clear()
    await asyncio.gather(*pending)
    return time.perf_counter() - started


async def timed_samples(action: object, count: int) -> list[float]:
    samples = []
    for _ in range(count):
        started = time.perf_counter()
        await action()  # type: ignore[operator]
        samples.append(time.perf_counter() - started)
    return samples


def report(label: str, samples: list[float], target: str = "") -> None:
    print(
        f"{label:34s} p50 {ms(percentile(samples, 0.5))}  p99 {ms(percentile(samples, 0.99))}"
        f"  {target}"
    )


def tail(samples: list[float]) -> None:
    slow = sum(1 for s in samples if s > 0.010)
    print(
        f"{'':34s} p90 {ms(percentile(samples, 0.9))}  p95 {ms(percentile(samples, 0.95))}"
        f"  max {ms(max(samples))}  over 10 ms: {slow}/{len(samples)}"
    )


CLI_SNIPPET = """
import asyncio, sys
from cim_place.cluster.nats.connection import connected, jetstream
from cim_place.cluster.state.locations import LocationStore

async def main():
    async with connected(sys.argv[1]) as nc:
        store = await LocationStore(jetstream(nc, "hub")).open(create=False)
        status = await store.get(sys.argv[2])
        assert status is not None
        sys.stdout.write(status.state)

asyncio.run(main())
"""


def wall(args: list[str], runs: int = 5) -> float:
    samples = []
    for _ in range(runs):
        started = time.perf_counter()
        subprocess.run(args, check=True, capture_output=True)
        samples.append(time.perf_counter() - started)
    return statistics.median(samples)


def du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


async def get_pass(
    store: LocationStore, objects: int, samples: int, rng: random.Random
) -> tuple[str, list[float]]:
    """Time ``store.get`` over ``samples`` random CIDs; reports; returns one key that exists."""
    keys = [to_str(cid_of(rng.randrange(objects))) for _ in range(samples)]
    found = 0
    get_samples = []
    for key in keys:
        started = time.perf_counter()
        status = await store.get(key)
        get_samples.append(time.perf_counter() - started)
        found += status is not None
    assert found == samples, f"only {found} of {samples} found"
    return keys[0], get_samples


async def bench_store(hub: Hub, objects: int, samples: int, settle: float) -> None:
    print(
        f"== locations store: {objects} objects in {kv.LOCATION_SHARDS} shard buckets "
        f"{kv.location_shard(0)}.. (1-server hub)"
    )
    server = hub.servers[0]
    rng = random.Random(7)
    async with connected(hub.urls) as nc:
        js = jetstream(nc, "hub")
        store = await LocationStore(js).open()
        server_before = rss(server.pid or "self")
        seconds = await load(js, objects)
        stream_bytes = 0
        for name in kv.LOCATION_SHARD_BUCKETS:
            stream_bytes += (await js.stream_info(f"KV_{name}")).state.bytes
        print(
            f"load (pipelined publishes)       {seconds:9.2f} s  {objects / seconds:9.0f} objects/s"
        )
        print(
            f"streams: {stream_bytes / 2**20:.1f} MiB ({stream_bytes / objects:.0f} bytes/object, "
            f"{stream_bytes / kv.LOCATION_SHARDS / 2**20:.1f} MiB per shard); store dir on disk "
            f"{du(server.spec.store_dir) / 2**20:.1f} MiB; nats-server RSS "
            f"{server_before / 2**20:.0f} -> {rss(server.pid or 'self') / 2**20:.0f} MiB"
        )
        await store.put_summary(Summary(objects=objects, by_state={"placed": objects}))

        await baselines(nc, js, samples)
        if settle:
            # Right after a bulk write of every status the server's first touch of each block is
            # slower for a while, with the server using no CPU meanwhile (measured p99: 15.5 ms
            # at 0 s, 6.7-14.8 ms at 30 s, 6.7 ms at 130 s; 32 shards no better than 16); the
            # default waits that out, --settle 0 shows the transient.
            print(f"idle {settle:.0f} s after the load (--settle)")
            await asyncio.sleep(settle)
        for label in ("first", "second"):
            # The second pass takes other random CIDs, with the server's block cache warmer.
            key, get_samples = await get_pass(store, objects, samples, rng)
            report(f"LocationStore.get, {label} pass", get_samples, "(target p99 <= 10 ms)")
            tail(get_samples)
        summary_samples = await timed_samples(store.summary, 50)
        report("LocationStore.summary()", summary_samples, "(target <= 1 s)")

    # A restarted server has every block cold (the page cache stays warm): the worst case.
    started = time.perf_counter()
    server.restart()
    print(f"hub server restarted in {time.perf_counter() - started:.1f} s")
    async with connected(hub.urls) as nc:
        store = await LocationStore(jetstream(nc, "hub")).open(create=False)
        key, get_samples = await get_pass(store, objects, samples, rng)
        report("LocationStore.get, after restart", get_samples, "(target p99 <= 10 ms)")
        tail(get_samples)

    python = sys.executable
    print(f"baseline: python -c pass          {ms(wall([python, '-c', 'pass']))}")
    print(f"baseline: python -c 'import nats' {ms(wall([python, '-c', 'import nats']))}")
    cli = wall([python, "-c", CLI_SNIPPET, hub.url, key])
    print(f"fresh process: imports + 1 get    {ms(cli)}  (the floor of a status CLI)")
    command = Path(python).with_name("cim-place")
    if command.exists() and _has_status(command):
        wall_s = wall([str(command), "status", key, "--server", hub.url, "--json"])
        print(f"cim-place status CID --json       {ms(wall_s)}  (target CLI wall <= 0.6 s)")
        wall_s = wall([str(command), "status", "--server", hub.url, "--json"])
        print(f"cim-place status (summary) --json {ms(wall_s)}")
    else:
        print("cim-place status is not installed: only the python -c floor was measured")


def _has_status(command: Path) -> bool:
    done = subprocess.run([str(command), "status", "--help"], capture_output=True)
    return done.returncode == 0


async def baselines(nc: Client, js: JetStreamContext, samples: int) -> None:
    async def echo(msg: Msg) -> None:
        await msg.respond(b"ok")

    await nc.subscribe("bench.echo", cb=echo)
    await nc.flush()
    request = await timed_samples(lambda: nc.request("bench.echo", b"", timeout=2.0), samples)
    report("baseline: raw nc.request echo", request)
    tiny = await kv.ensure_bucket(js, "bench-tiny")
    await tiny.put("k", b"1")
    get = await timed_samples(lambda: tiny.get("k"), samples)
    report("baseline: raw KV get, tiny key", get)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--objects", type=int, default=100_000, help="statuses in the bucket")
    parser.add_argument("--samples", type=int, default=2000, help="random gets to time")
    parser.add_argument(
        "--projection-objects", type=int, default=100_000, help="objects in the projection"
    )
    parser.add_argument("--rate-events", type=int, default=150_000, help="events for the rates")
    parser.add_argument(
        "--settle", type=float, default=130.0, help="seconds idle between the load and the gets"
    )
    parser.add_argument("--index-objects", type=int, default=100_000, help="rows in the index")
    parser.add_argument(
        "--scan-objects", type=int, default=None, help="statuses scanned beside the index"
    )
    parser.add_argument("--skip-projection", action="store_true")
    parser.add_argument("--skip-store", action="store_true")
    parser.add_argument("--skip-index", action="store_true")
    args = parser.parse_args()
    if not args.skip_projection:
        bench_projection(args.projection_objects, args.rate_events)
    if not args.skip_store:
        with tempfile.TemporaryDirectory(prefix="cim-bench-status-") as tmp:
            hub = start_hub(Path(tmp) / "hub", size=1)
            try:
                asyncio.run(bench_store(hub, args.objects, args.samples, args.settle))
            finally:
                hub.stop()
    if not args.skip_index:
        from status_index import bench_index  # bench/status_index.py, beside this script

        bench_index(args.index_objects, args.samples, args.scan_objects or args.index_objects)


if __name__ == "__main__":
    main()

"""The controller's status index at scale: one object and pages of 100, beside a scan.

Part 3 of bench/status.py (also runnable alone). Fills a
:class:`~cim_place.cluster.controller.status_index.StatusIndex` with ``--index-objects``
statuses (states: 96 % placed, 2 % progressing, 1.5 % degraded, 0.4 % removed, 0.1 % lost;
3 of 20 nodes each; 3 policies; names ``tenant-NNN/object-I`` over 1000 tenants) and reports the
fill rate and the memory the index holds per object. Then it serves the index with the
controller's own handler (:class:`~cim_place.cluster.controller.status_api.StatusQueries`) on a
real 1-server hub and times, through a NATS client as the CLI asks:

- one object (``{"cid": ...}``) over random CIDs (target p99 <= 10 ms);
- a page of 100 after a random cursor for each filter: none, ``--state degraded`` (1.5 %),
  ``--state lost`` (0.1 %), ``--node``, ``--policy``, ``--name 'tenant-042/*'`` (0.1 %: its first
  page, which runs the glob over every name, is timed apart), and a combination nothing matches
  (a pass over every row) (target p99 <= 50 ms);

beside, in the same run, what the listing cost before the index (unless ``--no-scan``): the same
statuses written to the location shards and ``status --filter lost`` read by a scan of them
(:func:`cim_place.cluster.state.overview.listing`: a page needs the whole scan), and one object
by the KV get that ``status CID`` does. Baseline: a raw request/reply to an echo responder.

``.venv/bin/python bench/status_index.py --index-objects 1000000`` (about 4 minutes with the
scan; ``--no-scan`` about 1).

``--merge-rows N`` times instead the index's largest pause: merging a small run of N/32 rows
into a large run of N synthetic rows, in one piece (how the index merged before: one call held
the event loop that long) and as the index does now, :data:`MERGE_STEP` rows a call, reporting
the longest call (``--merge-rows 10000000``: about a minute, 3 GiB).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import random
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from nats.aio.client import Client
from nats.aio.msg import Msg

from cim_place.cluster.controller.status_api import StatusQueries
from cim_place.cluster.controller.status_columns import WIDE, Columns, Merge
from cim_place.cluster.controller.status_index import (
    MERGE_AT,
    MERGE_STEP,
    RECENT_SHARE,
    StatusIndex,
)
from cim_place.cluster.controller.status_rows import STATUS_API
from cim_place.cluster.nats import kv
from cim_place.cluster.nats.connection import connected, jetstream
from cim_place.cluster.nats.subjects import Subjects
from cim_place.cluster.state.locations import LocationStore, shard_of
from cim_place.cluster.state.overview import listing
from cim_place.local.topologies import start_hub
from cim_place.objectstore.cid import RAW, Cid, make_cid, to_str
from cim_place.placement.status import Location, ObjectStatus

NODES = [f"node-{n:02d}" for n in range(20)]
POLICIES = ["standard", "archive", "scratch"]
PAGE_TARGET = "(target p99 <= 50 ms)"


def cid_of(i: int) -> Cid:
    return make_cid(RAW, i.to_bytes(8, "big"))


def state_of(i: int) -> str:
    slot = (i * 2654435761) % 1000  # spread over the CID order, deterministic
    if slot < 1:
        return "lost"
    if slot < 5:
        return "removed"
    if slot < 20:
        return "degraded"
    if slot < 40:
        return "progressing"
    return "placed"


def statuses(count: int, start: int = 0) -> Iterator[ObjectStatus]:
    rng = random.Random(11 + start)
    for i in range(start, start + count):
        state = state_of(i)
        yield ObjectStatus(
            cid=to_str(cid_of(i)),
            state=state,  # type: ignore[arg-type]
            locations=tuple(
                Location(node, "v0", state="pinned" if state == "placed" else "fetching")
                for node in rng.sample(NODES, 3)
            ),
            desired=3,
            policy=POLICIES[i % 10 % 3] if i % 10 else "archive",
            name=f"tenant-{i % 1000:03d}/object-{i}",
            owner="bench",
            size=1 << 20,
            updated_at=1.0,
        )


def rss() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4096


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def report(label: str, samples: list[float], note: str = "") -> None:
    p50, p99 = percentile(samples, 0.5) * 1000, percentile(samples, 0.99) * 1000
    print(f"{label:44s} p50 {p50:8.3f} ms  p99 {p99:8.3f} ms  {note}")


async def timed(action: Callable[[], Awaitable[object]], count: int) -> list[float]:
    samples = []
    for _ in range(count):
        started = time.perf_counter()
        await action()
        samples.append(time.perf_counter() - started)
    return samples


def fill(count: int) -> StatusIndex:
    gc.collect()
    before = rss()
    index = StatusIndex()
    # A small merge blocks the controller's loop; the large one (the small sorted run into the
    # large one, once per 1/RECENT_SHARE of growth) is made a slice per update.
    longest = merging = 0.0
    merges = 0
    clock = time.perf_counter
    started = clock()
    for status in statuses(count):
        begun = clock()
        index.update(status)
        took = clock() - begun
        longest = max(longest, took)
        if took > 0.001:
            merges, merging = merges + 1, merging + took
    seconds = clock() - started
    gc.collect()  # no flush: pages read both runs and the side table, as in the controller
    held = rss() - before
    print(
        f"index fill (update per status, incl. building them) {seconds:6.1f} s "
        f"{count / seconds:9.0f} statuses/s; held {held / 2**20:.1f} MiB, "
        f"{held / count:.0f} bytes/object"
    )
    print(
        f"updates that merged (over 1 ms): {merges}, {merging:.1f} s of the fill; "
        f"the longest {longest * 1000:.1f} ms (side table every {MERGE_AT} new rows, "
        f"the large run every 1/{RECENT_SHARE} of growth)"
    )
    return index


async def bench_api(nc: Client, index: StatusIndex, count: int, samples: int) -> None:
    rng = random.Random(5)
    subject = Subjects().api(STATUS_API)

    async def ask(request: dict[str, object]) -> dict[str, object]:
        reply = await nc.request(subject, json.dumps(request).encode(), timeout=10.0)
        doc: dict[str, object] = json.loads(reply.data)
        assert "error" not in doc, doc
        return doc

    def cursor() -> str:
        return to_str(cid_of(rng.randrange(count)))

    async def one() -> None:
        doc = await ask({"cid": cursor()})
        assert doc["object"] is not None

    report("index: one object over NATS", await timed(one, samples), "(target p99 <= 10 ms)")
    started = time.perf_counter()
    for _ in range(samples):
        index.get(cursor())
    each = (time.perf_counter() - started) / samples
    print(f"{'  (in process: StatusIndex.get)':44s} {each * 1e6:8.1f} us each")

    pages: list[tuple[str, dict[str, object]]] = [
        ("no filter", {}),
        ("--state degraded (1.5 %)", {"state": "degraded"}),
        ("--state lost (0.1 %)", {"state": "lost"}),
        ("--node node-07", {"node": "node-07"}),
        ("--policy scratch", {"policy": "scratch"}),
        (
            "--state lost --node node-07 --policy scratch",
            {"state": "lost", "node": "node-07", "policy": "scratch"},
        ),
        ("--state expired: none (a pass over every row)", {"state": "expired"}),
        ("--name nobody/*: none (a pass over every row)", {"name": "nobody/*"}),
    ]
    for label, request in pages:

        async def page(request: dict[str, object] = request) -> None:
            await ask({**request, "after": cursor(), "limit": 100})

        report(
            f"index: page of 100, {label}", await timed(page, max(50, samples // 10)), PAGE_TARGET
        )
    glob = {"name": "tenant-042/*", "limit": 100}
    started = time.perf_counter()
    first = await ask(glob)
    took = (time.perf_counter() - started) * 1000
    label = "index: --name tenant-042/*, first page"
    print(f"{label:44s} {took:8.1f} ms (runs the glob over every name)")
    assert len(first["objects"]) == 100  # type: ignore[arg-type]

    async def named() -> None:
        await ask({**glob, "after": cursor()})

    report(
        "index: page of 100, --name (glob kept)",
        await timed(named, max(50, samples // 10)),
        PAGE_TARGET,
    )
    walked, after, started = 0, None, time.perf_counter()
    while True:
        doc = await ask({"state": "degraded", "limit": 1000, **({"after": after} if after else {})})
        walked += len(doc["objects"])  # type: ignore[arg-type]
        after = doc["next"]
        if after is None:
            break
    took = time.perf_counter() - started
    label = "index: every degraded object, pages of 1000"
    print(f"{label:44s} {took:8.2f} s  ({walked} objects)")


async def bench_scan(nc: Client, count: int, samples: int) -> None:
    js = jetstream(nc, "hub")
    store = await LocationStore(js).open()
    started = time.perf_counter()
    pending = []
    for status in statuses(count):
        subject = f"$KV.{kv.location_shard(shard_of(status.cid))}.{status.cid}"
        pending.append(await js.publish_async(subject, status.encode()))
        if len(pending) >= 8192:
            await asyncio.gather(*pending)
            pending.clear()
    await asyncio.gather(*pending)
    took = time.perf_counter() - started
    print(f"scan baseline: {count} statuses written to the shards in {took:.1f} s")
    rng = random.Random(9)

    async def get() -> None:
        assert await store.get(to_str(cid_of(rng.randrange(count)))) is not None

    report(
        "scan baseline: one object by KV get (status CID)",
        await timed(get, samples),
        "(fresh blocks: see part 2 for settled figures)",
    )
    started = time.perf_counter()
    lost = await listing(js, "lost")
    took = time.perf_counter() - started
    label = "scan baseline: --filter lost, a page = a scan"
    print(f"{label:44s} {took:8.2f} s  ({len(lost)} objects)")


async def echo_baseline(nc: Client, samples: int) -> None:
    async def echo(msg: Msg) -> None:
        await msg.respond(b"ok")

    await nc.subscribe("bench.echo", cb=echo)
    report(
        "baseline: raw request/reply echo",
        await timed(lambda: nc.request("bench.echo", b"", timeout=2.0), samples),
    )


async def run(index: StatusIndex, url: str, count: int, samples: int, scan: int) -> None:
    async with connected(url) as server_nc, connected(url) as nc:
        queries = StatusQueries(
            server_nc, Subjects(), index, is_leader=lambda: True, tracked=lambda: count
        )
        await queries.start()
        await echo_baseline(nc, samples)
        await bench_api(nc, index, count, samples)
        if scan:
            await bench_scan(nc, scan, samples)
        await queries.stop()


def bench_index(count: int, samples: int, scan: int) -> None:
    """Part 3 of bench/status.py: ``count`` rows in the index; ``scan`` statuses in the shards
    for the scan baseline (0: none)."""
    print(f"== status index: {count} objects")
    index = fill(count)
    with tempfile.TemporaryDirectory(prefix="cim-bench-index-") as tmp:
        hub = start_hub(Path(tmp) / "hub", size=1)
        try:
            asyncio.run(run(index, hub.url, count, samples, scan))
        finally:
            hub.stop()


def synthetic_run(rows: int, seed: int) -> Columns:
    """``rows`` sorted rows with random CID-like keys (59 bytes, as a CIDv1 in base32)."""
    rng = np.random.default_rng(seed)
    raw = np.empty((rows, 59), dtype=np.uint8)
    raw[:, :7] = np.frombuffer(b"bafkrei", dtype=np.uint8)
    raw[:, 7:] = rng.integers(ord("a"), ord("z") + 1, size=(rows, 52), dtype=np.uint8)
    keys = np.sort(raw.view("S59").ravel())

    def zeros(dtype: type[np.generic]) -> npt.NDArray[Any]:
        return np.zeros(rows, dtype=dtype)

    return Columns(
        keys,
        *(zeros(t) for t in (np.uint8, np.uint16, np.uint8, np.uint8, np.uint8, np.int64)),
        zeros(np.uint32),
        np.zeros((rows, WIDE), dtype=np.uint16),
    )


def merge_pause(rows: int) -> None:
    """The largest merge in one piece (baseline) beside the same merge a slice a call."""
    big, small = synthetic_run(rows, 1), synthetic_run(rows // RECENT_SHARE, 2)
    print(f"== status index merge: {len(small)} rows into {len(big)}")
    started = time.perf_counter()
    whole = big.merged(small)
    held = time.perf_counter() - started
    print(f"{'in one piece (baseline)':44s} one call of {held:7.3f} s")
    merge, steps, longest = Merge(big, small), 0, 0.0
    started = time.perf_counter()
    while True:
        begun = time.perf_counter()
        merged = merge.step(MERGE_STEP)
        longest, steps = max(longest, time.perf_counter() - begun), steps + 1
        if merged is not None:
            break
    took = time.perf_counter() - started
    assert all((a == b).all() for a, b in zip(merged.columns(), whole.columns(), strict=True))
    print(
        f"{'a slice a call (the controller)':44s} {steps} calls, {took:7.3f} s in all, "
        f"the longest {longest * 1000:.1f} ms ({MERGE_STEP} rows of the large run each)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--index-objects", type=int, default=100_000)
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument(
        "--scan-objects", type=int, default=None, help="statuses to scan (default: as indexed)"
    )
    parser.add_argument("--no-scan", action="store_true", help="skip the scan baseline")
    parser.add_argument("--merge-rows", type=int, default=0, help="time the largest merge only")
    args = parser.parse_args()
    if args.merge_rows:
        merge_pause(args.merge_rows)
        return
    scan = 0 if args.no_scan else args.scan_objects or args.index_objects
    bench_index(args.index_objects, args.samples, scan)


if __name__ == "__main__":
    main()

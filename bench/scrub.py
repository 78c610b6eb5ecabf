"""Scrub throughput of a volume beside raw sha256 of the same block files, and the cost of a
throttled background scrub on a concurrent fetch, measured in the same run.

    .venv/bin/python bench/scrub.py [--size BYTES] [--objects N] [--fetch-size BYTES]
                                    [--rate BYTES] [--rounds N] [--dir DIR]

Part 1, throughput. A volume (fsync "none") holds ``--objects`` files of ``--size`` bytes in total
(``testdata.chacha_stream``, profile unixfs-v1-2025). Both measurements read the same block
files once before timing (page cache warm, so the disk's speed is not what is compared):

  (a) raw: every block file of the volume read whole and hashed with hashlib.sha256;
  (b) scrub: ``VolumeScrubber(rate=None).run_pass()``: the pinned DAGs walked, every block read,
      hashed against its CID, dag-pb links followed, the per-root state recorded.

Target: (b) >= 0.8 of (a).

Part 2, a background scrub beside a fetch. A 1-server hub and two leaves; a child process
serves a ``--fetch-size`` object from leaf-a (``bench/transfer.py serve``: BlockServer + block
stream); this process fetches it with ``fetch_dag`` into the scrubbed volume through leaf-b, as
the agent does, ``--rounds`` times each:

  unloaded            no scrub running;
  scrub, yielding     a scrub thread at ``--rate`` (default 50 MiB/s, the agent's default) on the
                      same volume, the fetch marked busy on the volume's ``Foreground`` (what the
                      agent does for fetches, reads and serving);
  scrub, not yielding the same scrub without the foreground mark (the throttle alone).

The median fetch rate of each, and its ratio to unloaded. Target: yielding >= 0.9.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from cim_place.cluster.exchange.fetch import fetch_dag, wait_for_holder
from cim_place.cluster.exchange.fetch_model import Holder
from cim_place.cluster.nats.connection import connect
from cim_place.local.topologies import add_leaf, start_hub
from cim_place.objectstore import dag
from cim_place.objectstore.blockstore import FsBlockStore
from cim_place.objectstore.cid import Cid
from cim_place.objectstore.scrub import DEFAULT_RATE, Foreground, VolumeScrubber
from cim_place.objectstore.store import ObjectStore
from cim_place.objectstore.testdata import chacha_stream
from cim_place.objectstore.unixfs import import_file

MB = 1_000_000
MiB = 1 << 20
TRANSFER = Path(__file__).with_name("transfer.py")


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    text = text.strip().upper().removesuffix("IB").removesuffix("B")
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


def block_files(store: ObjectStore) -> list[Path]:
    return [store.blocks.block_path(cid) for cid in store.blocks.cids()]


def raw_sha256(files: list[Path]) -> tuple[float, int]:
    start = time.perf_counter()
    total = 0
    for path in files:
        data = path.read_bytes()
        hashlib.sha256(data).digest()
        total += len(data)
    return time.perf_counter() - start, total


def throughput(workdir: Path, size: int, objects: int) -> None:
    with ObjectStore(workdir / "volume-1", fsync="none") as store:
        for i in range(objects):
            store.add(chacha_stream(f"scrub-{i}", size // objects))
        files = block_files(store)
        raw_sha256(files)  # warm the page cache
        raws, scrubs = [], []
        for _ in range(3):
            seconds, total = raw_sha256(files)
            raws.append(total / seconds / MB)
            scrubber = VolumeScrubber(store, rate=None)
            start = time.perf_counter()
            report = scrubber.run_pass(resume=False)
            scrubs.append(report.bytes_checked / (time.perf_counter() - start) / MB)
            scrubber.close()
            assert report.damaged == [] and report.bytes_checked == total
        raw, scrub = statistics.median(raws), statistics.median(scrubs)
        print(
            f"volume: {objects} objects, {total} bytes in {len(files)} blocks "
            f"(load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs)"
        )
        print(f"  raw sha256 of the block files: {raw:7.0f} MB/s (median of 3)")
        print(f"  scrub pass, unthrottled:       {scrub:7.0f} MB/s  ratio {scrub / raw:.2f}")


def serve_child(url: str, volume: Path) -> subprocess.Popen[str]:
    process = subprocess.Popen(
        [sys.executable, str(TRANSFER), "serve", url, str(volume), "leaf-a"],
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    assert process.stdout is not None
    if not process.stdout.readline().startswith("ready"):
        process.kill()
        raise RuntimeError("the serving child did not start")
    return process


async def timed_fetch(
    nc: object, root: Cid, store: ObjectStore, size: int, foreground: Foreground | None
) -> float:
    start = time.perf_counter()
    if foreground is None:
        await fetch_dag(nc, root, [Holder("leaf-a")], store.blocks)
    else:
        with foreground.busy():
            await fetch_dag(nc, root, [Holder("leaf-a")], store.blocks)
    return size / (time.perf_counter() - start) / MB


async def beside_fetch(workdir: Path, fetch_size: int, rate: int, rounds: int) -> None:
    source = workdir / "volume-a"
    with FsBlockStore(source, fsync="none") as blocks_a:
        root = import_file(chacha_stream("fetched", fetch_size), blocks_a).root
    hub = start_hub(workdir / "hub", size=1)
    leaves = []
    try:
        leaves = [add_leaf(hub, workdir / n, n) for n in ("leaf-a", "leaf-b")]
        agent_a = serve_child(leaves[0].url, source)
        try:
            nc = await connect(leaves[1].url, name="bench-scrub")
            if not await wait_for_holder(nc, "leaf-a", timeout=30.0):
                raise RuntimeError("leaf-a is not reachable from leaf-b")
            rates: dict[str, list[float]] = {}
            kept: set[Cid] = set()
            # One fetch first, not counted: connections, page cache and the holder's read path
            # warm up, which otherwise favours whichever mode runs second.
            with ObjectStore(workdir / "warm-up", fsync="none") as warm:
                await timed_fetch(nc, root, warm, fetch_size, None)
            for mode in ("unloaded", "scrub, yielding", "scrub, not yielding") * rounds:
                # The scrubbed volume: the pinned objects of part 1, and the fetch lands here.
                with ObjectStore(workdir / "volume-1", fsync="none") as store:
                    foreground = Foreground()
                    stop = threading.Event()
                    scrubber = VolumeScrubber(store, rate=rate, foreground=foreground)
                    thread = None
                    if mode != "unloaded":

                        def loop(
                            s: VolumeScrubber = scrubber, stop: threading.Event = stop
                        ) -> None:
                            while not stop.is_set():
                                s.run_pass(resume=False, stop=stop)

                        thread = threading.Thread(target=loop, daemon=True)
                        thread.start()
                    # Every mode waits the same: the scrub reaches its rate, and the previous
                    # round's deletions settle (without this, "unloaded" ran in their wake).
                    await asyncio.sleep(1.0)
                    fg = foreground if mode == "scrub, yielding" else None
                    rates.setdefault(mode, []).append(
                        await timed_fetch(nc, root, store, fetch_size, fg)
                    )
                    stop.set()
                    if thread is not None:
                        thread.join()
                    scrubber.close()
                    kept = kept or _pinned(store)
                    for cid in list(store.blocks.cids()):  # forget the fetched object
                        if cid not in kept:
                            store.blocks.delete(cid)
            await nc.close()
        finally:
            agent_a.terminate()
            agent_a.wait(30)
    finally:
        for leaf in leaves:
            leaf.stop()
        hub.stop()
    base = statistics.median(rates["unloaded"])
    print(f"fetch of {fetch_size} bytes into the scrubbed volume, scrub rate {rate / MiB:g} MiB/s:")
    for mode, values in rates.items():
        rate_mb = statistics.median(values)
        spread = " ".join(f"{v:.0f}" for v in values)
        print(
            f"  {mode:<20} {rate_mb:7.0f} MB/s (median of {len(values)}: {spread})  "
            f"ratio {rate_mb / base:.2f}"
        )


def _pinned(store: ObjectStore) -> set[Cid]:
    return {cid for root in store.pins.roots() for cid in dag.walk_cids(store.blocks, root)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=parse_size, default=256 * MiB, help="volume bytes")
    parser.add_argument("--objects", type=int, default=8)
    parser.add_argument("--fetch-size", type=parse_size, default=128 * MiB)
    parser.add_argument("--rate", type=parse_size, default=DEFAULT_RATE)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--skip-fetch", action="store_true")
    parser.add_argument("--dir", default=os.environ.get("TMPDIR"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="cim-scrub-") as tmp:
        throughput(Path(tmp), args.size, args.objects)
        if not args.skip_fetch:
            asyncio.run(beside_fetch(Path(tmp), args.fetch_size, args.rate, args.rounds))


if __name__ == "__main__":
    main()

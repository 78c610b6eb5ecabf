"""Upload throughput through a running agent, beside a raw import of the same file, same run.

    .venv/bin/python bench/upload.py [--size BYTES] [--window N] [--fsync none|file] [--rounds N]
                                     [--dir DIR] [--max-payload BYTES]

Topology: a 1-server hub and one leaf server on loopback. The agent is a separate process: an
UploadService over an ObjectStore, connected to the leaf. This process is the client
(``upload``), connected to the same leaf. The file is ``testdata.chacha_stream`` bytes written to
disk first (page cache warm for both runs).

Baseline, same run: ``ObjectStore.add`` of the same file into a fresh store in this process,
without NATS. Reported: MB/s (10^6 bytes), and the agent's peak RSS (constant memory check).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cim_place.cluster.exchange.upload_client import upload, wait_for_uploads
from cim_place.cluster.nats.connection import connected
from cim_place.local.topologies import add_leaf, start_hub
from cim_place.objectstore.store import ObjectStore
from cim_place.objectstore.testdata import chacha_stream

AGENT = r"""
import asyncio, sys, resource
from pathlib import Path
from cim_place.cluster.nats.connection import connected
from cim_place.cluster.exchange.upload_server import UploadService
from cim_place.objectstore.store import ObjectStore

async def main(url, store_dir, window, fsync):
    with ObjectStore(Path(store_dir), fsync=fsync) as store:
        async with connected(url, name="agent") as nc:
            service = UploadService(nc, "leaf-a", store, window=int(window))
            await service.start()
            print("ready", flush=True)
            await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
            await service.stop()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(f"rss {rss}", flush=True)

asyncio.run(main(*sys.argv[1:]))
"""


def mb_s(size: int, seconds: float) -> float:
    return size / seconds / 1e6


async def run_upload(url: str, path: Path, window: int | None) -> float:
    async with connected(url, name="client") as nc:
        assert await wait_for_uploads(nc, "leaf-a", timeout=10)
        started = time.perf_counter()
        with path.open("rb") as stream:
            result = await upload(nc, "leaf-a", stream, size=path.stat().st_size, window=window)
        seconds = time.perf_counter() - started
    print(
        f"  upload  {result.cid_text[:20]}... "
        f"{mb_s(result.size, seconds):7.1f} MB/s ({seconds:.2f} s)"
    )
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=256 << 20)
    parser.add_argument("--window", type=int, default=8)
    parser.add_argument("--fsync", default="none")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--max-payload", type=int, default=None)
    parser.add_argument("--dir", default=None)
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="cim-bench-upload-", dir=args.dir))
    sample = base / "sample.bin"
    source = chacha_stream("bench-upload", args.size)
    with sample.open("wb") as out:
        while piece := source.read(1 << 20):
            out.write(piece)
    hub = start_hub(base / "hub", size=1)
    leaf = add_leaf(hub, base / "leaf-a", "leaf-a", max_payload=args.max_payload)
    try:
        for round_ in range(args.rounds):
            print(
                f"round {round_ + 1}: {args.size} bytes, window {args.window}, fsync {args.fsync}"
            )
            raw_dir = base / f"raw-{round_}"
            with ObjectStore(raw_dir, fsync=args.fsync) as store, sample.open("rb") as stream:
                started = time.perf_counter()
                pin = store.add(stream)
                seconds = time.perf_counter() - started
            print(f"  raw add {mb_s(pin.size, seconds):7.1f} MB/s ({seconds:.2f} s)")
            agent = subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    AGENT,
                    leaf.url,
                    str(base / f"agent-{round_}"),
                    str(args.window),
                    args.fsync,
                ],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            assert agent.stdout is not None and agent.stdin is not None
            assert agent.stdout.readline().strip() == "ready"
            try:
                asyncio.run(run_upload(leaf.url, sample, None))
            finally:
                agent.stdin.write("\n")
                agent.stdin.flush()
                print(f"  agent peak {agent.stdout.readline().strip()} KiB")
                agent.wait(30)
        client_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(f"client+raw process peak rss {client_rss} KiB")
    finally:
        leaf.stop()
        hub.stop()

        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()

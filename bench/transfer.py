"""Replication throughput of the block exchange, beside raw baselines of the same run.

    .venv/bin/python bench/transfer.py [--size BYTES] [--max-payload default|8M|both]
                                       [--profile NAME] [--window N] [--batch N]
                                       [--batch-bytes BYTES] [--dir DIR]

Topology: a 1-server hub and two leaf servers (leaf-a, leaf-b) on loopback. Agent A is a separate
process: a BlockServer over an FsBlockStore that holds the object (imported with
``unixfs.import_file`` from ``testdata.chacha_stream``; the import is timed and reported but is not
part of the transfer). Agent B, this process, runs ``fetch_dag`` into its own FsBlockStore through
leaf-b: every block crosses leaf-a -> hub -> leaf-b, is verified against its CID and written.
Both volumes use fsync "none" (the page cache): the bench measures the exchange, not the disk.

Baselines, same servers, same run:

  (a) nats-py core publish: a separate process publishes the same file bytes in 1 MiB messages
      on leaf-a, this process receives them on leaf-b (payload limit permitting; a 1 MiB payload
      fits the default max_payload exactly);
  (b) hashlib.sha256 of the same bytes in 1 MiB pieces (one core).

Beside each rate, the CPU seconds per GiB that each process used (agent A, agent B, the three
nats-servers; from /proc) and the load average: on a shared machine the rates move with the
load, the CPU costs much less.

Two server configurations (``--max-payload both``, the default): nats-server's default
max_payload (1 MiB: a 1 MiB leaf does not fit one message with its framing, so blocks are split
across messages) and max_payload 8 MiB on the hub and both leaves.
Target: fetch >= 250 MB/s (1 MB = 10^6 bytes) on the 1 GiB object.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from cim_place.cluster.blocks import BlockServer
from cim_place.cluster.connection import connect
from cim_place.cluster.fetch import Holder, fetch_dag, wait_for_holder
from cim_place.cluster.servers import NatsServer, add_leaf, start_hub
from cim_place.objectstore.blockstore import FsBlockStore
from cim_place.objectstore.cid import parse, to_str
from cim_place.objectstore.dag import missing
from cim_place.objectstore.testdata import chacha_stream
from cim_place.objectstore.unixfs import import_file

MB = 1_000_000
MiB = 1 << 20
SEED = "bench-transfer"
RAW_SUBJECT = "bench.raw"
GO_SUBJECT = "bench.go"


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    text = text.strip().upper().removesuffix("IB").removesuffix("B")
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


# -- agent A and the raw publisher: child processes ----------------------------------------------


async def serve(url: str, volume: str, node: str) -> None:
    """Agent A: serve the volume until SIGTERM."""
    nc = await connect(url, name=f"bench-{node}", for_service=True)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    with FsBlockStore(Path(volume), fsync="none") as store:
        server = BlockServer(nc, node, store)
        await server.start()
        print("ready", flush=True)
        await stop.wait()
        await server.stop()
        print(
            f"served {server.stats.blocks_served} blocks, {server.stats.bytes_served} bytes "
            f"in {server.stats.messages_sent} messages, cpu {time.process_time():.2f} s",
            file=sys.stderr,
        )
    await nc.close()


async def publish(url: str, size: int) -> None:
    """The raw baseline's sender: the file bytes in 1 MiB messages, once told to go."""
    stream = chacha_stream(SEED, size)
    messages = []
    while chunk := stream.read(MiB):
        messages.append(chunk)
    nc = await connect(url, name="bench-publisher", for_service=True)
    go = asyncio.Event()

    async def on_go(msg: Any) -> None:
        go.set()
        await msg.respond(b"ok")

    await nc.subscribe(GO_SUBJECT, cb=on_go)
    await nc.flush()
    print("ready", flush=True)
    await go.wait()
    for message in messages:
        await nc.publish(RAW_SUBJECT, message)
    await nc.flush(timeout=60)
    await nc.close()


def cpu_of(pid: int | None) -> float:
    """CPU seconds (user + system, all threads) a process has used so far; 0 when unknown."""
    if pid is None:
        return 0.0
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat[stat.rfind(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def child(args: list[str]) -> subprocess.Popen[str]:
    process = subprocess.Popen(
        [sys.executable, __file__, *args], stdout=subprocess.PIPE, text=True, start_new_session=True
    )
    assert process.stdout is not None
    line = process.stdout.readline()
    if line.strip() != "ready":
        process.kill()
        raise RuntimeError(f"child {args[0]} did not start: {line!r}")
    return process


def stop_child(process: subprocess.Popen[str]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


# -- one configuration ---------------------------------------------------------------------------


async def raw_baseline(
    url_a: str, url_b: str, size: int, servers: list[NatsServer]
) -> dict[str, Any]:
    """Rate, bytes received and CPU seconds of core publish A -> hub -> B in 1 MiB messages."""
    publisher = child(["publish", url_a, str(size)])
    try:
        nc = await connect(url_b, name="bench-raw-receiver")
        received = 0
        done = asyncio.Event()
        last = time.perf_counter()

        async def on_msg(msg: Any) -> None:
            nonlocal received, last
            received += len(msg.data)
            last = time.perf_counter()
            if received >= size:
                done.set()

        await nc.subscribe(RAW_SUBJECT, cb=on_msg, pending_bytes_limit=0, pending_msgs_limit=0)
        await nc.flush()
        # The go request also proves that interest crossed the hub both ways.
        for _ in range(100):
            try:
                await nc.request(GO_SUBJECT, b"", timeout=0.5)
                break
            except Exception:
                await asyncio.sleep(0.1)
        start = time.perf_counter()
        cpu = (time.process_time(), cpu_of(publisher.pid), servers_cpu(servers))
        # On a timeout messages were dropped (slow consumer): report what arrived.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(done.wait(), timeout=max(60.0, size / (20 * MB)))
        elapsed = last - start
        used = (
            time.process_time() - cpu[0],
            cpu_of(publisher.pid) - cpu[1],
            servers_cpu(servers) - cpu[2],
        )
        await nc.close()
    finally:
        stop_child(publisher)
    return {
        "mb_s": received / elapsed / MB if elapsed > 0 else 0.0,
        "complete": received >= size,
        "cpu": used,
    }


def servers_cpu(servers: list[NatsServer]) -> float:
    return sum(cpu_of(server.pid) for server in servers)


def sha256_baseline(size: int) -> float:
    stream = chacha_stream(SEED, size)
    pieces = []
    while chunk := stream.read(MiB):
        pieces.append(chunk)
    start = time.perf_counter()
    for piece in pieces:
        hashlib.sha256(piece).digest()
    return size / (time.perf_counter() - start) / MB


async def run_config(
    workdir: Path,
    size: int,
    max_payload: int | None,
    volume_a: Path,
    root: str,
    options: dict[str, int],
) -> dict[str, Any]:
    label = "default" if max_payload is None else f"{max_payload // MiB}MiB"
    base = workdir / f"servers-{label}"
    hub = start_hub(base / "hub", size=1, max_payload=max_payload)
    leaves = []
    try:
        leaves.append(add_leaf(hub, base / "leaf-a", "leaf-a", max_payload=max_payload))
        leaves.append(add_leaf(hub, base / "leaf-b", "leaf-b", max_payload=max_payload))
        leaf_a, leaf_b = leaves
        agent_a = child(["serve", leaf_a.url, str(volume_a), "leaf-a"])
        try:
            nc = await connect(leaf_b.url, name="bench-agent-b")
            if not await wait_for_holder(nc, "leaf-a", timeout=30.0):
                raise RuntimeError("agent A is not reachable from leaf-b")
            volume_b = workdir / f"volume-b-{label}"
            servers = [*hub.servers, *leaves]
            with FsBlockStore(volume_b, fsync="none") as store_b:
                start = time.perf_counter()
                cpu = (time.process_time(), cpu_of(agent_a.pid), servers_cpu(servers))
                result = await fetch_dag(
                    nc,
                    parse(root),
                    [Holder("leaf-a")],
                    store_b,
                    window=options["window"],
                    batch=options["batch"],
                    batch_bytes=options["batch_bytes"],
                )
                elapsed = time.perf_counter() - start
                used = (
                    cpu_of(agent_a.pid) - cpu[1],
                    time.process_time() - cpu[0],
                    servers_cpu(servers) - cpu[2],
                )
                assert missing(store_b, parse(root)) == []
            await nc.close()
        finally:
            stop_child(agent_a)
        raw = await raw_baseline(leaf_a.url, leaf_b.url, size, servers)
    finally:
        for leaf in leaves:
            leaf.stop()
        hub.stop()
    return {
        "max_payload": label,
        "fetch_mb_s": size / elapsed / MB,
        "fetch_s": elapsed,
        "blocks": result.blocks_fetched,
        "block_bytes": result.bytes_fetched,
        "fetch_cpu": used,
        "raw_mb_s": raw["mb_s"],
        "raw_complete": raw["complete"],
        "raw_cpu": raw["cpu"],
    }


async def bench(args: argparse.Namespace) -> None:
    size = parse_size(args.size)
    configs: list[int | None] = {  # type: ignore[assignment]
        "default": [None],
        "8M": [8 * MiB],
        "both": [None, 8 * MiB],
    }[args.max_payload]
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="cim-transfer-") as tmp:
        workdir = Path(tmp)
        volume_a = workdir / "volume-a"
        with FsBlockStore(volume_a, fsync="none") as store_a:
            start = time.perf_counter()
            imported = import_file(chacha_stream(SEED, size), store_a, args.profile)
            import_s = time.perf_counter() - start
        root = to_str(imported.root)
        print(
            f"object {root}: {size} bytes, {imported.blocks} blocks, profile {args.profile}; "
            f"import into FsBlockStore {size / import_s / MB:.0f} MB/s"
        )
        sha = sha256_baseline(size)
        print(f"sha256 of the same bytes in 1 MiB pieces: {sha:.0f} MB/s")
        options = {"window": args.window, "batch": args.batch, "batch_bytes": args.batch_bytes}
        print(
            f"window {args.window} batches of <= {args.batch} CIDs, "
            f"<= {args.batch_bytes / MiB:g} MiB"
        )
        for max_payload in configs:
            row = await run_config(workdir, size, max_payload, volume_a, root, options)
            complete = "" if row["raw_complete"] else " (INCOMPLETE: messages dropped)"
            print(
                f"max_payload {row['max_payload']:>7}: fetch {row['fetch_mb_s']:6.0f} MB/s "
                f"({row['blocks']} blocks, {row['block_bytes']} bytes in {row['fetch_s']:.2f} s, "
                f"verified); raw core publish {row['raw_mb_s']:6.0f} MB/s{complete}; "
                f"fetch/raw {row['fetch_mb_s'] / max(row['raw_mb_s'], 1e-9):.2f}, "
                f"fetch/sha256 {row['fetch_mb_s'] / sha:.2f}"
            )
            gib = size / (1 << 30)
            a, b, n = (c / gib for c in row["fetch_cpu"])
            ra, rb, rn = (c / gib for c in row["raw_cpu"])
            print(
                f"    CPU s per GiB: fetch: agent A {a:.2f}, agent B {b:.2f}, 3 nats-servers "
                f"{n:.2f}; raw: publisher {ra:.2f}, receiver {rb:.2f}, 3 nats-servers {rn:.2f}; "
                f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"
            )


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "serve":
        asyncio.run(serve(*sys.argv[2:5]))
        return
    if len(sys.argv) > 1 and sys.argv[1] == "publish":
        asyncio.run(publish(sys.argv[2], int(sys.argv[3])))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="1G", help="object size: bytes, or 64M, 1G (default)")
    parser.add_argument("--max-payload", choices=["default", "8M", "both"], default="both")
    parser.add_argument("--profile", default="unixfs-v1-2025")
    parser.add_argument("--window", type=int, default=4)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--batch-bytes", type=parse_size, default=8 * MiB)
    parser.add_argument("--dir", default=os.environ.get("TMPDIR"), help="work directory parent")
    asyncio.run(bench(parser.parse_args()))


if __name__ == "__main__":
    main()

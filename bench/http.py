"""Gateway throughput and latency, beside the block stream and raw TCP of the same run.

    .venv/bin/python bench/http.py [--size BYTES] [--small N] [--rounds N] [--dir DIR]

One object (default 1 GiB, ``--size`` to shrink) is imported into a volume (fsync "none": the
page cache; the bench measures serving, not the disk). Then, in this order:

  raw TCP     raw asyncio TCP over loopback, 1 MiB pieces (bench/transfer.py's baseline);
  stream      ``fetch_dag`` over the agent's bulk block stream: agent A (a separate process,
              bench/transfer.py's ``serve``) on leaf-a, this process on leaf-b of a 1-server hub,
              every block verified and written (the agent-to-agent path);
  gateway     ``GET /ipfs/<cid>`` from a gateway process over the same volume (every block read
              and verified, streamed in the response), read by an aiohttp client here;
  gateway (remote)  the same GET from a gateway process on leaf-b whose volume is empty: the
              DAG is fetched from agent A over the block stream and streamed while it arrives.

Then ``--small`` (default 200) concurrent GETs of distinct small objects (4 KiB) through the
gateway, ``--rounds`` times: p50 and p99 latency, beside the same requests to a handler of the
same process that answers bytes from memory (the HTTP floor of aiohttp here).

Target: gateway >= 0.7 of the block stream.
"""

# ruff: noqa: E402  (sys.path is set before the imports, see below)
from __future__ import annotations

import sys
from pathlib import Path

# This file is named like the standard library's http package, which aiohttp imports: keep its
# folder (sys.path[0] when run as a script) behind the standard library, then find transfer.py.
_HERE = str(Path(__file__).resolve().parent)
sys.path[:] = [p for p in sys.path if p not in ("", _HERE)] + [_HERE]

import argparse
import asyncio
import io
import os
import shutil
import signal
import statistics
import subprocess
import tempfile
import time
from collections.abc import Sequence

import aiohttp
import transfer
from aiohttp import web

from cim_place.cluster.exchange.fetch import fetch_dag, wait_for_holder
from cim_place.cluster.exchange.fetch_model import Holder
from cim_place.cluster.nats.connection import connect
from cim_place.http.domain import DomainContent
from cim_place.http.gateway import Gateway
from cim_place.http.server import HttpServers, Listener
from cim_place.http.sources import LocalContent
from cim_place.local.topologies import add_leaf, start_hub
from cim_place.objectstore.blockstore import FsBlockStore
from cim_place.objectstore.cid import parse, to_str
from cim_place.objectstore.testdata import chacha_stream
from cim_place.objectstore.unixfs import import_file

MB = transfer.MB
MiB = transfer.MiB
SMALL = 4096


# -- the gateway processes -------------------------------------------------------------------------


async def gateway_local(volume: str) -> None:
    """A gateway over ``volume`` and a from-memory handler, until SIGTERM."""
    floor = b"x" * SMALL

    async def memory(_request: web.Request) -> web.Response:
        return web.Response(body=floor, content_type="application/octet-stream")

    with FsBlockStore(Path(volume), fsync="none") as store:
        app = Gateway(LocalContent(store)).app()
        app.router.add_get("/memory", memory)
        await _serve(app)


async def gateway_remote(leaf_url: str, volume: str, holder: str) -> None:
    """A gateway on ``leaf_url`` whose content comes from ``holder`` through the domain."""
    nc = await connect(leaf_url, name="bench-gateway-b")
    with FsBlockStore(Path(volume), fsync="none") as store:

        async def holders(_root: bytes) -> list[Holder]:
            return [Holder(holder)]

        async def fetch(root: bytes, found: Sequence[object], progress: object) -> object:
            sink = content.recent.recording(store)
            return await fetch_dag(nc, root, [Holder(holder)], sink, progress=progress)  # type: ignore[arg-type]

        content = DomainContent(store, repair=[store], find_holders=holders, fetch=fetch)
        await _serve(Gateway(content).app())
    await nc.close()


async def _serve(app: web.Application) -> None:
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    async with HttpServers([Listener("gateway", app, "127.0.0.1:0")]) as servers:
        print(f"ready {servers.urls['gateway']}", flush=True)
        await stop.wait()


def child_said(args: list[str]) -> tuple[subprocess.Popen[str], str]:
    """A child of this file (``local`` or ``remote``) once it said "ready URL", and the URL."""
    return transfer.child_said(args, script=__file__)


# -- measurements ----------------------------------------------------------------------------------


async def get_large(url: str, size: int, pid: int | None) -> dict[str, float]:
    """MB/s of one streamed GET, CPU s of the client (here) and of the gateway process."""
    timeout = aiohttp.ClientTimeout(total=None, sock_read=120)
    async with aiohttp.ClientSession(timeout=timeout) as http:
        start = time.perf_counter()
        cpu = (time.process_time(), transfer.cpu_of(pid))
        received = 0
        async with http.get(url) as resp:
            assert resp.status == 200, resp.status
            async for chunk in resp.content.iter_any():
                received += len(chunk)
        elapsed = time.perf_counter() - start
        used = (time.process_time() - cpu[0], transfer.cpu_of(pid) - cpu[1])
    assert received == size, (received, size)
    return {"mb_s": size / elapsed / MB, "s": elapsed, "client": used[0], "server": used[1]}


async def concurrent_small(urls: list[str], rounds: int) -> tuple[float, float]:
    """p50 and p99 latency (ms) of ``len(urls)`` concurrent GETs, ``rounds`` times."""
    latencies: list[float] = []
    connector = aiohttp.TCPConnector(limit=len(urls))
    async with aiohttp.ClientSession(connector=connector) as http:

        async def one(url: str) -> None:
            start = time.perf_counter()
            async with http.get(url) as resp:
                assert resp.status == 200, (url, resp.status)
                await resp.read()
            latencies.append((time.perf_counter() - start) * 1000)

        await asyncio.gather(*(one(url) for url in urls))  # warm the connections
        latencies.clear()
        for _ in range(rounds):
            await asyncio.gather(*(one(url) for url in urls))
    cuts = statistics.quantiles(latencies, n=100)
    return cuts[49], cuts[98]


async def block_stream(workdir: Path, size: int, volume_a: Path, root: str) -> dict[str, float]:
    hub = start_hub(workdir / "hub", size=1)
    leaves = []
    agent_a = None
    try:
        leaves = [
            add_leaf(hub, workdir / "leaf-a", "leaf-a"),
            add_leaf(hub, workdir / "leaf-b", "leaf-b"),
        ]
        agent_a = transfer.child(["serve", leaves[0].url, str(volume_a), "leaf-a", ""])
        nc = await connect(leaves[1].url, name="bench-agent-b")
        if not await wait_for_holder(nc, "leaf-a", timeout=30.0):
            raise RuntimeError("agent A is not reachable from leaf-b")
        volume_b = workdir / "volume-b"
        with FsBlockStore(volume_b, fsync="none") as store_b:
            start = time.perf_counter()
            cpu = (time.process_time(), transfer.cpu_of(agent_a.pid))
            await fetch_dag(nc, parse(root), [Holder("leaf-a")], store_b)
            elapsed = time.perf_counter() - start
            used = (time.process_time() - cpu[0], transfer.cpu_of(agent_a.pid) - cpu[1])
        shutil.rmtree(volume_b)
        await nc.close()
        stream = {"mb_s": size / elapsed / MB, "s": elapsed, "client": used[0], "server": used[1]}
        volume_r = workdir / "volume-remote"
        gateway, url = child_said(["remote", leaves[1].url, str(volume_r), "leaf-a"])
        try:
            remote = await get_large(f"{url}/ipfs/{root}", size, gateway.pid)
            remote["server"] += transfer.cpu_of(agent_a.pid) - cpu[1] - used[1]
        finally:
            transfer.stop_child(gateway)
        shutil.rmtree(volume_r, ignore_errors=True)
        return {**{f"stream_{k}": v for k, v in stream.items()}, **remote}
    finally:
        if agent_a is not None:
            transfer.stop_child(agent_a)
        for leaf in leaves:
            leaf.stop()
        hub.stop()


def _line(name: str, row: dict[str, float], size: int, stream: float, tcp: float) -> str:
    gib = size / (1 << 30)
    return (
        f"{name:<17} {row['mb_s']:6.0f} MB/s  /stream {row['mb_s'] / stream:.2f}  "
        f"/raw TCP {row['mb_s'] / tcp:.2f}  (CPU s per GiB: server {row['server'] / gib:.2f}, "
        f"client {row['client'] / gib:.2f}; load average {os.getloadavg()[0]:.1f})"
    )


async def bench(args: argparse.Namespace) -> None:
    size = transfer.parse_size(args.size)
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="cim-http-") as tmp:
        workdir = Path(tmp)
        volume = workdir / "volume-a"
        small: list[str] = []
        with FsBlockStore(volume, fsync="none") as store:
            root = to_str(import_file(chacha_stream(transfer.SEED, size), store).root)
            for index in range(args.small):
                data = chacha_stream(f"small-{index}", SMALL).read()
                small.append(to_str(import_file(io.BytesIO(data), store).root))
        print(f"object {root}: {size} bytes; {args.small} small objects of {SMALL} bytes")
        tcp = (await transfer.tcp_baseline(size))["BufferedProtocol"]
        print(f"raw TCP (loopback)  {tcp['mb_s']:6.0f} MB/s")
        remote = await block_stream(workdir, size, volume, root)
        stream = {
            k.removeprefix("stream_"): v for k, v in remote.items() if k.startswith("stream_")
        }
        print(_line("block stream", stream, size, stream["mb_s"], tcp["mb_s"]))
        gateway, url = child_said(["local", str(volume)])
        try:
            local = await get_large(f"{url}/ipfs/{root}", size, gateway.pid)
            print(_line("gateway (local)", local, size, stream["mb_s"], tcp["mb_s"]))
            print(_line("gateway (remote)", remote, size, stream["mb_s"], tcp["mb_s"]))
            p50, p99 = await concurrent_small([f"{url}/ipfs/{cid}" for cid in small], args.rounds)
            f50, f99 = await concurrent_small([f"{url}/memory"] * args.small, args.rounds)
        finally:
            transfer.stop_child(gateway)
        print(
            f"{args.small} concurrent GETs of {SMALL} B, {args.rounds} rounds: gateway p50 "
            f"{p50:.1f} ms, p99 {p99:.1f} ms; from memory (same server) p50 {f50:.1f} ms, "
            f"p99 {f99:.1f} ms"
        )


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "local":
        asyncio.run(gateway_local(sys.argv[2]))
        return
    if len(sys.argv) > 1 and sys.argv[1] == "remote":
        asyncio.run(gateway_remote(*sys.argv[2:5]))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="1G", help="object size: bytes, or 64M, 1G (default)")
    parser.add_argument("--small", type=int, default=200, help="concurrent small GETs")
    parser.add_argument("--rounds", type=int, default=5, help="rounds of small GETs")
    parser.add_argument("--dir", default=os.environ.get("TMPDIR"), help="work directory parent")
    asyncio.run(bench(parser.parse_args()))


if __name__ == "__main__":
    main()

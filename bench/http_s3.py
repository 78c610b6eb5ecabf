"""S3 throughput beside its baselines, and listing a page from the ordered index, in one run.

Topology: a 1-server hub and leaves on loopback; the agent and the S3 app run in this process
(as an agent will mount it); every client is a separate process (boto3, `cim-place add`), so
client and server do not share a GIL.

- PUT: boto3 ``put_object`` of a file through S3 (single request, SigV4 signing the body's
  SHA-256, as boto3 does over plain HTTP) beside ``cim-place add --server LEAF FILE`` of the same
  file (the upload protocol into the same agent). Target: S3 >= 0.8 of add.
- GET: boto3 ``get_object`` streamed to nothing (the bytes the agent holds for the key, every
  block verified on read) beside the agent-to-agent block stream of the same bytes
  (``fetch_dag`` from a holder process on another leaf, bench/transfer.py's ``serve``, every
  block verified and written) and raw loopback TCP. Target: S3 GET >= 0.7 of the block stream.
- LIST: ``--list-keys`` index entries in one bucket (written to the KV as a put writes them),
  then a page of ListObjectsV2 (prefix, delimiter, max-keys 100) from the ordered index beside
  what a listing cost before it: a scan of the whole bucket's KV entries, sorted, then paged.

    .venv/bin/python bench/http_s3.py [--size-mib 256] [--rounds 2] [--list-keys 20000]
"""

# ruff: noqa: E402  (sys.path is set before the imports, see below)
from __future__ import annotations

import sys
from pathlib import Path

# bench/http.py is named like the standard library's http package, which aiohttp imports: keep
# this folder (sys.path[0] when run as a script) behind the standard library.
_HERE = str(Path(__file__).resolve().parent)
sys.path[:] = [p for p in sys.path if p not in ("", _HERE)] + [_HERE]

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import tempfile
import time

import transfer
from aiohttp import web

from cim_place.cluster.agent.config import AgentConfig, VolumeConfig
from cim_place.cluster.agent.service import Agent
from cim_place.cluster.events.store import ensure_event_store
from cim_place.cluster.exchange.fetch import fetch_dag, wait_for_holder
from cim_place.cluster.exchange.fetch_model import Holder
from cim_place.cluster.nats.connection import connect, connected, jetstream
from cim_place.cluster.tasks.queue import ensure_task_stream
from cim_place.http.s3 import S3Node, build_s3_app
from cim_place.http.s3.app import S3_CONTEXT
from cim_place.http.s3.index import ObjectRecord, S3Index
from cim_place.http.s3.keys import KeyStore
from cim_place.http.s3.listing import page
from cim_place.local.topologies import Hub, add_leaf, start_hub
from cim_place.objectstore.blockstore import FsBlockStore
from cim_place.objectstore.unixfs import import_file

BIN = Path(sys.executable).parent
MiB = 1 << 20

CLIENT = """
import sys, time, boto3
from botocore.config import Config
url, access, secret, op, path = sys.argv[1:6]
s3 = boto3.client("s3", endpoint_url=url, aws_access_key_id=access, aws_secret_access_key=secret,
    region_name="us-east-1",
    config=Config(signature_version="s3v4", s3={"addressing_style": "path"}))
if op == "mb":
    s3.create_bucket(Bucket=path); sys.exit()
if op == "list":
    times = []
    for _ in range(20):
        start = time.perf_counter()
        prefix, after = path.split("|")
        got = s3.list_objects_v2(Bucket="bench-list", Prefix=prefix, Delimiter="/", MaxKeys=100,
            StartAfter=after)
        times.append(time.perf_counter() - start)
        assert got["KeyCount"] == 100, got["KeyCount"]
    times.sort(); print(times[0], times[len(times) // 2]); sys.exit()
start = time.perf_counter()
if op == "put":
    with open(path, "rb") as f:
        s3.put_object(Bucket="bench", Key=path.rsplit("/", 1)[1], Body=f)
else:
    body = s3.get_object(Bucket="bench", Key=path)["Body"]
    while body.read(1 << 20):
        pass
print(time.perf_counter() - start)
"""

TCP_CLIENT = """
import socket, sys, time
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
start = time.perf_counter(); buf = bytearray(1 << 20); n = 0
while True:
    got = s.recv_into(buf)
    if not got: break
    n += got
print(time.perf_counter() - start)
"""


def timed(argv: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(argv, check=True, capture_output=True)
    return time.perf_counter() - start


async def client(*args: str) -> float:
    return (await client_output(*args))[-1]


async def client_output(*args: str) -> list[float]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CLIENT, *args, stdout=asyncio.subprocess.PIPE
    )
    out, _ = await proc.communicate()
    if proc.returncode:
        raise RuntimeError(f"S3 client {args[3]} failed")
    return [float(word) for word in out.decode().split()] or [0.0]


async def block_stream(hub: Hub, base: Path, path: Path) -> float:
    """Seconds of ``fetch_dag`` of ``path``'s DAG from a holder process on another leaf."""
    volume = base / "stream-a"
    with FsBlockStore(volume, fsync="none") as store:
        root = import_file(path.open("rb"), store).root
    holder_leaf = add_leaf(hub, base / "leaf-stream-a", "stream-a")
    fetcher_leaf = add_leaf(hub, base / "leaf-stream-b", "stream-b")
    holder = transfer.child(["serve", holder_leaf.url, str(volume), "stream-a", ""])
    try:
        nc = await connect(fetcher_leaf.url, name="bench-fetcher")
        if not await wait_for_holder(nc, "stream-a", timeout=30.0):
            raise RuntimeError("the holder is not reachable")
        with FsBlockStore(base / "stream-b", fsync="none") as sink:
            start = time.perf_counter()
            await fetch_dag(nc, root, [Holder("stream-a")], sink)
            elapsed = time.perf_counter() - start
        await nc.close()
        return elapsed
    finally:
        transfer.stop_child(holder)
        fetcher_leaf.stop()
        holder_leaf.stop()
        shutil.rmtree(volume, ignore_errors=True)
        shutil.rmtree(base / "stream-b", ignore_errors=True)


async def listing(index: S3Index, count: int, creds: tuple[str, str, str]) -> str:
    """A page from the ordered index beside a scan of the bucket, ``count`` keys."""
    await client(*creds, "mb", "bench-list")
    now = time.time()
    keys = [f"logs/{n // 1000:04d}/{n % 1000:04d}.json" for n in range(count)]
    start = time.perf_counter()
    for first in range(0, count, 500):
        await asyncio.gather(
            *(
                index.put("bench-list", ObjectRecord(key, "bafy", "e" * 32, 1, now))
                for key in keys[first : first + 500]
            )
        )
    wrote = time.perf_counter() - start
    start = time.perf_counter()
    await index.ordered("bench-list")
    built = time.perf_counter() - start
    # A page in the middle of the bucket: one folder of 1000, from its middle.
    middle = keys[count // 2]
    prefix = middle.rsplit("/", 1)[0] + "/"
    fastest, median = await client_output(*creds, "list", f"{prefix}|{middle}")
    scans = []
    for _ in range(3):
        start = time.perf_counter()
        records = await index.objects("bench-list")
        by_key = {r.key: r for r in records}
        result = page(list(by_key), prefix=prefix, delimiter="/", after=middle, max_keys=100)
        scans.append(time.perf_counter() - start)
        assert len(result.keys) + len(result.prefixes) == 100
    scan = statistics.median(scans)
    return (
        f"LIST {count} keys (written in {wrote:.1f} s, index built on first listing in "
        f"{built:.2f} s): a page of 100 from the ordered index, boto3 round trip median "
        f"{median * 1000:.1f} ms (fastest {fastest * 1000:.1f} ms); scan of the bucket + sort "
        f"+ page, server side only, median {scan * 1000:.0f} ms (ratio {scan / median:.0f}x)"
    )


async def tcp_get(size: int) -> float:
    chunk = os.urandom(MiB)

    async def send(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for _ in range(size // MiB):
            writer.write(chunk)
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(send, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", TCP_CLIENT, str(port), stdout=asyncio.subprocess.PIPE
    )
    out, _ = await proc.communicate()
    server.close()
    return float(out.decode())


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--list-keys", type=int, default=20000)
    args = parser.parse_args()
    size = args.size_mib * MiB
    with tempfile.TemporaryDirectory(prefix="cim-place-bench-s3-") as tmp:
        base = Path(tmp)
        hub = start_hub(base / "hub", size=1)
        leaf = add_leaf(hub, base / "leaf", "bench")
        try:
            async with connected(hub.url) as nc:
                js = jetstream(nc, "hub")
                await ensure_event_store(js, replicas=1)
                await ensure_task_stream(js, 1)
                key = await KeyStore(js).create(note="bench")
            agent = Agent(
                AgentConfig(
                    node="bench",
                    volumes=(VolumeConfig("v0", base / "v0"),),
                    servers=(leaf.url,),
                    inventory=3600,
                ),
                fsync="none",
            )
            await agent.start()
            assert agent.nc is not None and agent.publisher is not None
            app = build_s3_app(
                S3Node(
                    node="bench",
                    volumes=agent.volumes,
                    volume_for=agent._volume_for,
                    js_hub=jetstream(agent.nc, "hub"),
                    events=agent.publisher,
                    on_pinned=agent._uploaded,
                    on_unpinned=agent._announce_removed,
                )
            )
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            url = f"http://127.0.0.1:{runner.addresses[0][1]}"
            creds = (url, key.access_key, key.secret_key)
            await client(*creds, "mb", "bench")
            print(f"size {args.size_mib} MiB, {args.rounds} rounds, cpus {os.cpu_count()}")
            for r in range(args.rounds):
                files = []
                for kind in ("add", "s3"):
                    path = base / f"{kind}-{r}.bin"
                    path.write_bytes(os.urandom(size))  # distinct bytes: no dedup help
                    files.append(path)
                add_s = await asyncio.to_thread(
                    timed,
                    [
                        str(BIN / "cim-place"),
                        "add",
                        "--server",
                        leaf.url,
                        "--node",
                        "bench",
                        str(files[0]),
                    ],
                )
                put_s = await client(*creds, "put", str(files[1]))
                get_s = await client(*creds, "get", files[1].name)
                stream_s = await block_stream(hub, base / f"stream-{r}", files[1])
                tcp_s = await tcp_get(size)
                mb = size / MiB
                print(
                    f"round {r}: PUT s3 {mb / put_s:.0f} MiB/s, add {mb / add_s:.0f} MiB/s "
                    f"(ratio {add_s / put_s:.2f}); GET s3 {mb / get_s:.0f} MiB/s, "
                    f"block stream {mb / stream_s:.0f} MiB/s (ratio {stream_s / get_s:.2f}, "
                    f"target >= 0.7), raw TCP {mb / tcp_s:.0f} MiB/s "
                    f"(ratio {tcp_s / get_s:.2f}); load average {os.getloadavg()[0]:.1f}",
                    flush=True,
                )
                for path in files:
                    path.unlink()
            if args.list_keys:
                print(await listing(app[S3_CONTEXT].index, args.list_keys, creds), flush=True)
            await runner.cleanup()
            await agent.stop(grace=1)
        finally:
            leaf.stop()
            hub.stop()


if __name__ == "__main__":
    asyncio.run(main())

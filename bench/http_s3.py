"""S3 PUT and GET throughput beside their baselines, in the same run.

Topology: a 1-server hub and one leaf on loopback; the agent and the S3 app run in this process
(as an agent will mount it); every client is a separate process (boto3, `cim-place add`), so
client and server do not share a GIL.

- PUT: boto3 ``put_object`` of a file through S3 (single request, SigV4 signing the body's
  SHA-256, as boto3 does over plain HTTP) beside ``cim-place add --server LEAF FILE`` of the same
  file (the upload protocol into the same agent). Target: S3 >= 0.8 of add.
- GET: boto3 ``get_object`` streamed to nothing beside raw loopback TCP (a socket sending the same
  bytes, read by a separate process).

    .venv/bin/python bench/http_s3.py [--size-mib 256] [--rounds 2]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from aiohttp import web

from cim_place.cluster.agent.config import AgentConfig, VolumeConfig
from cim_place.cluster.agent.service import Agent
from cim_place.cluster.events.store import ensure_event_store
from cim_place.cluster.nats.connection import connected, jetstream
from cim_place.cluster.tasks.queue import ensure_task_stream
from cim_place.http.s3 import S3Node, build_s3_app
from cim_place.http.s3.keys import KeyStore
from cim_place.local.servers import add_leaf, start_hub

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
    s3.create_bucket(Bucket="bench"); sys.exit()
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
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CLIENT, *args, stdout=asyncio.subprocess.PIPE
    )
    out, _ = await proc.communicate()
    if proc.returncode:
        raise RuntimeError(f"S3 client {args[3]} failed")
    return float(out.decode().strip() or 0)


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
            await client(*creds, "mb", "-")
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
                tcp_s = await tcp_get(size)
                mb = size / MiB
                print(
                    f"round {r}: PUT s3 {mb / put_s:.0f} MiB/s, add {mb / add_s:.0f} MiB/s "
                    f"(ratio {add_s / put_s:.2f}); GET s3 {mb / get_s:.0f} MiB/s, "
                    f"raw TCP {mb / tcp_s:.0f} MiB/s (ratio {tcp_s / get_s:.2f})"
                )
            await runner.cleanup()
            await agent.stop(grace=1)
        finally:
            leaf.stop()
            hub.stop()


if __name__ == "__main__":
    asyncio.run(main())

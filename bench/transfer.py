"""Replication throughput of the block exchange, beside raw baselines of the same run.

    .venv/bin/python bench/transfer.py [--size BYTES] [--max-payload default|8M|both]
                                       [--paths stream,stream-tls,nats] [--profile NAME]
                                       [--window N]
                                       [--batch N] [--batch-bytes BYTES] [--dir DIR]

Topology: a 1-server hub and two leaf servers (leaf-a, leaf-b) on loopback. Agent A is a separate
process: a BlockServer over an FsBlockStore that holds the object (imported with
``unixfs.import_file`` from ``testdata.chacha_stream``; the import is timed and reported but is not
part of the transfer), with a BlockStreamServer (the bulk block stream, on loopback) beside it.
Agent B, this process, runs ``fetch_dag`` into its own FsBlockStore through leaf-b, every block
verified against its CID and written, once per path:

  stream  the default: a stream grant over NATS (leaf-b -> hub -> leaf-a), then the blocks over
          agent A's block stream (one TCP connection);
  stream-tls  the same over TLS (a throwaway CA and certificate for 127.0.0.1; agent A serves
          it as a second node, ``leaf-a-tls``, from the same volume); not run by default;
  nats    ``fetch_dag(stream=False)``: every block crosses leaf-a -> hub -> leaf-b.

Both volumes use fsync "none" (the page cache): the bench measures the exchange, not the disk.

Baselines, same machine, same run:

  (a) nats-py core publish: a separate process publishes the same file bytes in 1 MiB messages
      on leaf-a, this process receives them on leaf-b (payload limit permitting; a 1 MiB payload
      fits the default max_payload exactly);
  (b) raw asyncio TCP over loopback: a separate process writes the same bytes in 1 MiB pieces
      to a socket (``writer.drain`` after each), this process reads them, once with
      ``StreamReader.readexactly`` and once with a ``BufferedProtocol`` that receives into a
      buffer (as the block stream's fetcher does);
  (c) hashlib.sha256 of the same bytes in 1 MiB pieces (one core).

Beside each rate, the CPU seconds per GiB that each process used (agent A, agent B, the three
nats-servers; from /proc) and the load average: on a shared machine the rates move with the
load, the CPU costs much less.

Two server configurations (``--max-payload both``, the default): nats-server's default
max_payload (1 MiB: a 1 MiB leaf does not fit one message with its framing, so blocks are split
across messages) and max_payload 8 MiB on the hub and both leaves.
Target: fetch >= 250 MB/s (1 MB = 10^6 bytes) on the 1 GiB object (the stream path).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from cim_place.cluster.exchange.blocks import BlockServer
from cim_place.cluster.exchange.fetch import fetch_dag, wait_for_holder
from cim_place.cluster.exchange.fetch_model import Holder
from cim_place.cluster.exchange.stream import BlockStreamServer
from cim_place.cluster.exchange.stream_wire import client_tls, server_tls
from cim_place.cluster.nats.connection import connect
from cim_place.local.servers import NatsServer
from cim_place.local.topologies import add_leaf, start_hub
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


async def serve(url: str, volume: str, node: str, tls_dir: str = "") -> None:
    """Agent A: serve the volume until SIGTERM (with ``tls_dir``, also as ``<node>-tls`` with a
    TLS block stream)."""
    nc = await connect(url, name=f"bench-{node}", for_service=True)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    with FsBlockStore(Path(volume), fsync="none") as store:
        server = BlockServer(nc, node, store)
        stream = BlockStreamServer(store, serve_stats=server.stats)
        services: list[Any] = [stream, server]
        if tls_dir:
            tls = server_tls(f"{tls_dir}/server.pem", f"{tls_dir}/server-key.pem")
            tls_server = BlockServer(nc, f"{node}-tls", store)
            tls_stream = BlockStreamServer(store, serve_stats=tls_server.stats, tls=tls)
            tls_server.stream = tls_stream
            services += [tls_stream, tls_server]
        server.stream = stream
        for service in services:
            await service.start()
        print("ready", flush=True)
        await stop.wait()
        for service in reversed(services):
            await service.stop()
        print(
            f"served {server.stats.blocks_served} blocks, {server.stats.bytes_served} bytes "
            f"({server.stats.messages_sent} NATS messages, {stream.stats.connections} stream "
            f"connections), cpu {time.process_time():.2f} s",
            file=sys.stderr,
        )
    await nc.close()


def write_certs(directory: Path) -> Path:
    """A throwaway CA (ca.pem) and a certificate for 127.0.0.1 (server.pem, server-key.pem)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    day = datetime.timedelta(days=1)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bench CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - day)
        .not_valid_after(now + day)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "agent-a")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - day)
        .not_valid_after(now + day)
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    (directory / "ca.pem").write_bytes(ca.public_bytes(pem))
    (directory / "server.pem").write_bytes(cert.public_bytes(pem))
    (directory / "server-key.pem").write_bytes(
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return directory


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


async def tcp_send(size: int) -> None:
    """The raw TCP baseline's sender: listens, then writes the file bytes in 1 MiB pieces to
    each of two connections in turn."""
    stream = chacha_stream(SEED, size)
    pieces = []
    while chunk := stream.read(MiB):
        pieces.append(chunk)
    done = asyncio.Event()

    async def on_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readexactly(2)  # "go"
        for piece in pieces:
            writer.write(piece)
            await writer.drain()
        writer.close()
        await writer.wait_closed()
        served.append(1)
        if len(served) == 2:
            done.set()

    served: list[int] = []
    server = await asyncio.start_server(on_connection, "127.0.0.1", 0)
    print(f"ready {server.sockets[0].getsockname()[1]}", flush=True)
    await done.wait()
    server.close()


class _Sink(asyncio.BufferedProtocol):
    """Receives into one reused 1 MiB buffer; ``done`` once ``size`` bytes arrived."""

    def __init__(self, size: int, done: asyncio.Future[float]) -> None:
        self.buffer = memoryview(bytearray(MiB))
        self.left = size
        self.done = done

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.buffer

    def buffer_updated(self, nbytes: int) -> None:
        self.left -= nbytes
        if self.left <= 0 and not self.done.done():
            self.done.set_result(time.perf_counter())

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_exception(exc or EOFError("sender closed early"))


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
    process, _ = child_said(args)
    return process


def child_said(args: list[str], script: str = __file__) -> tuple[subprocess.Popen[str], str]:
    """A child process (``script``, this file by default) once it printed "ready [detail]", and
    the detail."""
    process = subprocess.Popen(
        [sys.executable, script, *args], stdout=subprocess.PIPE, text=True, start_new_session=True
    )
    assert process.stdout is not None
    line = process.stdout.readline()
    if not line.startswith("ready"):
        process.kill()
        raise RuntimeError(f"child {args[0]} did not start: {line!r}")
    return process, line.removeprefix("ready").strip()


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


async def tcp_baseline(size: int) -> dict[str, dict[str, Any]]:
    """Rate and CPU seconds (receiver, sender) of raw asyncio TCP over loopback, 1 MiB pieces,
    per receiving style."""
    sender, port = child_said(["tcpsend", str(size)])
    rows: dict[str, dict[str, Any]] = {}
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", int(port), limit=16 * MiB)
        start = time.perf_counter()
        cpu = (time.process_time(), cpu_of(sender.pid))
        writer.write(b"go")
        received = 0
        while received < size:
            received += len(await reader.readexactly(min(MiB, size - received)))
        elapsed = time.perf_counter() - start
        used = (time.process_time() - cpu[0], cpu_of(sender.pid) - cpu[1])
        writer.close()
        rows["readexactly"] = {"mb_s": size / elapsed / MB, "cpu": used}

        loop = asyncio.get_running_loop()
        done: asyncio.Future[float] = loop.create_future()
        transport, _ = await loop.create_connection(
            lambda: _Sink(size, done), "127.0.0.1", int(port)
        )
        start = time.perf_counter()
        cpu = (time.process_time(), cpu_of(sender.pid))
        transport.write(b"go")
        end = await done
        used = (time.process_time() - cpu[0], cpu_of(sender.pid) - cpu[1])
        transport.close()
        rows["BufferedProtocol"] = {"mb_s": size / (end - start) / MB, "cpu": used}
    finally:
        stop_child(sender)
    return rows


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
    paths: list[str],
) -> dict[str, Any]:
    label = "default" if max_payload is None else f"{max_payload // MiB}MiB"
    base = workdir / f"servers-{label}"
    hub = start_hub(base / "hub", size=1, max_payload=max_payload)
    leaves = []
    try:
        leaves.append(add_leaf(hub, base / "leaf-a", "leaf-a", max_payload=max_payload))
        leaves.append(add_leaf(hub, base / "leaf-b", "leaf-b", max_payload=max_payload))
        leaf_a, leaf_b = leaves
        tls_dir = write_certs(workdir / "tls") if "stream-tls" in paths else None
        agent_a = child(["serve", leaf_a.url, str(volume_a), "leaf-a", str(tls_dir or "")])
        try:
            nc = await connect(leaf_b.url, name="bench-agent-b")
            for node in ("leaf-a", "leaf-a-tls") if tls_dir else ("leaf-a",):
                if not await wait_for_holder(nc, node, timeout=30.0):
                    raise RuntimeError(f"agent A ({node}) is not reachable from leaf-b")
            servers = [*hub.servers, *leaves]
            fetches = {}
            for path in paths:
                volume_b = workdir / f"volume-b-{label}-{path}"
                with FsBlockStore(volume_b, fsync="none") as store_b:
                    start = time.perf_counter()
                    cpu = (time.process_time(), cpu_of(agent_a.pid), servers_cpu(servers))
                    node = "leaf-a-tls" if path == "stream-tls" else "leaf-a"
                    result = await fetch_dag(
                        nc,
                        parse(root),
                        [Holder(node)],
                        store_b,
                        window=options["window"],
                        batch=options["batch"],
                        batch_bytes=options["batch_bytes"],
                        stream=path != "nats",
                        stream_tls=client_tls(str(tls_dir / "ca.pem")) if tls_dir else None,
                    )
                    elapsed = time.perf_counter() - start
                    used = (
                        cpu_of(agent_a.pid) - cpu[1],
                        time.process_time() - cpu[0],
                        servers_cpu(servers) - cpu[2],
                    )
                    assert missing(store_b, parse(root)) == []
                stats = result.holders[node]
                if path != "nats":
                    assert stats.stream_blocks == result.blocks_fetched, stats.fallback
                fetches[path] = {
                    "mb_s": size / elapsed / MB,
                    "s": elapsed,
                    "blocks": result.blocks_fetched,
                    "bytes": result.bytes_fetched,
                    "cpu": used,
                }
                shutil.rmtree(volume_b)
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
        "fetches": fetches,
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
        gib = size / (1 << 30)
        tcps = await tcp_baseline(size)
        for style, tcp in tcps.items():
            tr, ts = (c / gib for c in tcp["cpu"])
            print(
                f"raw asyncio TCP over loopback, 1 MiB pieces, {style}: {tcp['mb_s']:.0f} MB/s "
                f"(CPU s per GiB: sender {ts:.2f}, receiver {tr:.2f}; "
                f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs)"
            )
        tcp = tcps["BufferedProtocol"]
        paths = [p.strip() for p in args.paths.split(",") if p.strip()]
        for max_payload in configs:
            row = await run_config(workdir, size, max_payload, volume_a, root, options, paths)
            complete = "" if row["raw_complete"] else " (INCOMPLETE: messages dropped)"
            ra, rb, rn = (c / gib for c in row["raw_cpu"])
            print(
                f"max_payload {row['max_payload']:>7}: raw core publish {row['raw_mb_s']:6.0f} "
                f"MB/s{complete} (CPU s per GiB: publisher {ra:.2f}, receiver {rb:.2f}, "
                f"3 nats-servers {rn:.2f})"
            )
            for path, fetch in row["fetches"].items():
                a, b, n = (c / gib for c in fetch["cpu"])
                print(
                    f"    fetch over {path:>6}: {fetch['mb_s']:6.0f} MB/s ({fetch['blocks']} "
                    f"blocks, {fetch['bytes']} bytes in {fetch['s']:.2f} s, verified); "
                    f"/raw publish {fetch['mb_s'] / max(row['raw_mb_s'], 1e-9):.2f}, "
                    f"/raw TCP {fetch['mb_s'] / tcp['mb_s']:.2f}, /sha256 {fetch['mb_s'] / sha:.2f}"
                )
                print(
                    f"        CPU s per GiB: agent A {a:.2f}, agent B {b:.2f}, 3 nats-servers "
                    f"{n:.2f}; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"
                )


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "serve":
        asyncio.run(serve(*sys.argv[2:6]))
        return
    if len(sys.argv) > 1 and sys.argv[1] == "publish":
        asyncio.run(publish(sys.argv[2], int(sys.argv[3])))
        return
    if len(sys.argv) > 1 and sys.argv[1] == "tcpsend":
        asyncio.run(tcp_send(int(sys.argv[2])))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="1G", help="object size: bytes, or 64M, 1G (default)")
    parser.add_argument("--max-payload", choices=["default", "8M", "both"], default="both")
    parser.add_argument(
        "--paths",
        default="stream,nats",
        help="fetch paths to measure, in order (stream, stream-tls, nats)",
    )
    parser.add_argument("--profile", default="unixfs-v1-2025")
    parser.add_argument("--window", type=int, default=4)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--batch-bytes", type=parse_size, default=8 * MiB)
    parser.add_argument("--dir", default=os.environ.get("TMPDIR"), help="work directory parent")
    asyncio.run(bench(parser.parse_args()))


if __name__ == "__main__":
    main()

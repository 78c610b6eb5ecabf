"""Import and export throughput of the UnixFS importer, against plain sha256 over the same bytes.

    .venv/bin/python bench/import.py [--size BYTES] [--profile NAME ...] [--dir DIR]

The input (kubo's deterministic ChaCha20 test data) is written to a temporary file first and
read back once so that it sits in the page cache; generating it is not timed. For each profile:

  (a) sha256: the file read in the profile's chunk size, each chunk hashed with hashlib; also
      the hashing alone over one in-memory chunk, the ceiling of any importer;
  (b) CID-only import (sink None), MB/s and ratio to (a);
  (c) import into a sink that takes every block and drops it (the block bytes are built);
  (d) export: read_file through a verifying in-memory source, MB/s and ratio to (a);
  (e) peak RSS (ru_maxrss) of a fresh process that imports the file once, interpreter included.

Targets: import >= 85 % of (a), export >= 80 % of (a), RSS < 100 MB.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from cim_place.errors import BlockNotFoundError
from cim_place.objectstore.cid import Cid, to_str, verify
from cim_place.objectstore.testdata import chacha_stream
from cim_place.objectstore.unixfs import PROFILES, ImportResult, Profile, import_file, read_file

MB = 1_000_000
T = TypeVar("T")


class NullSink:
    """Takes every block, keeps none: the cost of building blocks without storing them."""

    def __init__(self) -> None:
        self.blocks = 0
        self.bytes = 0

    def put(self, cid: Cid, data: bytes) -> bool:
        self.blocks += 1
        self.bytes += len(data)
        return True


class MemorySource:
    """Blocks in a dict, verified on every get like a real BlockSource."""

    def __init__(self) -> None:
        self.blocks: dict[Cid, bytes] = {}

    def put(self, cid: Cid, data: bytes) -> bool:
        self.blocks[cid] = data
        return True

    def has(self, cid: Cid) -> bool:
        return cid in self.blocks

    def get(self, cid: Cid) -> bytes:
        try:
            data = self.blocks[cid]
        except KeyError:
            raise BlockNotFoundError(to_str(cid)) from None
        verify(cid, data)
        return data


def rss_mb() -> float:
    # ru_maxrss is in KiB on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / MB


def timed(fn: Callable[[], T]) -> tuple[float, float, T]:
    """(wall seconds, CPU seconds of this process, result). CPU time is the steadier figure
    when other processes compete for the cores; wall time is what a user waits."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    return time.perf_counter() - wall, time.process_time() - cpu, result


def sha256_file(path: Path, chunk_size: int) -> int:
    buffer = bytearray(chunk_size)
    view = memoryview(buffer)
    total = 0
    with open(path, "rb") as f:
        while n := f.readinto(buffer):
            hashlib.sha256(view[:n]).digest()
            total += n
    return total


def sha256_memory(size: int, chunk_size: int) -> int:
    chunk = bytes(chunk_size)
    for _ in range(size // chunk_size):
        hashlib.sha256(chunk).digest()
    return size // chunk_size * chunk_size


def write_input(path: Path, size: int) -> None:
    stream = chacha_stream("cim-place-bench", size)
    buffer = bytearray(1 << 20)
    with open(path, "wb") as out:
        while n := stream.readinto(buffer):
            out.write(memoryview(buffer)[:n])
    sha256_file(path, 1 << 20)  # warm the page cache


def bench_profile(path: Path, size: int, profile: Profile, runs: int, rss: list[float]) -> None:
    """Runs the measurements round-robin and keeps each one's best, so that load from other
    processes during one round does not skew a single ratio."""
    print(f"\n== {profile.name} (chunk {profile.chunk_size}, {profile.max_links} links)")
    source = MemorySource()
    with open(path, "rb") as f:
        root = import_file(f, source, profile).root

    def cid_only() -> ImportResult:
        with open(path, "rb") as f:
            return import_file(f, None, profile)

    def null_sink() -> ImportResult:
        with open(path, "rb") as f:
            return import_file(f, NullSink(), profile)

    def export() -> int:
        total = 0
        for piece in read_file(source, root):
            total += len(piece)
        assert total == size
        return total

    measured: dict[str, Callable[[], object]] = {
        "hash": lambda: sha256_file(path, profile.chunk_size),
        "hash_mem": lambda: sha256_memory(size, profile.chunk_size),
        "cid": cid_only,
        "sink": null_sink,
        "export": export,
    }
    wall = dict.fromkeys(measured, float("inf"))
    cpu = dict.fromkeys(measured, float("inf"))
    for _ in range(runs):
        for key, fn in measured.items():
            w, c, _ = timed(fn)
            wall[key], cpu[key] = min(wall[key], w), min(cpu[key], c)
    source.blocks.clear()
    hashed = sha256_memory(size, profile.chunk_size)
    rate = {k: (size if k != "hash_mem" else hashed) / s / MB for k, s in wall.items()}
    cpu_rate = {k: (size if k != "hash_mem" else hashed) / s / MB for k, s in cpu.items()}
    ref, cpu_ref = rate["hash"], cpu_rate["hash"]
    print(f"{'':40} {'wall':>8}  {'ratio':>6}   {'per CPU s':>9}  {'ratio':>6}")

    def line(label: str, key: str) -> None:
        print(
            f"{label:40} {rate[key]:8.0f}  {rate[key] / ref:6.1%}   "
            f"{cpu_rate[key]:9.0f}  {cpu_rate[key] / cpu_ref:6.1%}   MB/s"
        )

    line("(a) sha256 of the file, read in chunks", "hash")
    line("    sha256 alone, in-memory chunks", "hash_mem")
    line("(b) import, CID only (sink None)", "cid")
    line("(c) import into a null-write sink", "sink")
    line("(d) export, verified (read_file)", "export")
    print(f"{'(e) peak RSS of a CID-only import':40} {rss[0]:8.1f} MB")
    print(f"{'    peak RSS of a null-sink import':40} {rss[1]:8.1f} MB")
    print(f"    root {to_str(root)}")


def child_rss(path: Path, profile: Profile, sink: bool) -> float:
    """Peak RSS of a fresh process that imports the file once (the interpreter included)."""
    argv = [sys.executable, __file__, "--rss-of", str(path), "--profile", profile.name]
    out = subprocess.run(argv + (["--sink"] if sink else []), check=True, capture_output=True)
    return float(out.stdout)


def rss_of(path: Path, profile: str, sink: bool) -> None:
    with open(path, "rb") as f:
        import_file(f, NullSink() if sink else None, profile)
    print(rss_mb())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--size", type=int, default=1 << 30, help="input bytes (default 1 GiB)")
    parser.add_argument("--profile", action="append", choices=sorted(PROFILES))
    parser.add_argument("--runs", type=int, default=5, help="rounds of measurements (best kept)")
    parser.add_argument("--dir", type=Path, default=None, help="where to write the input file")
    parser.add_argument("--rss-of", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--sink", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rss_of:
        rss_of(args.rss_of, args.profile[0], args.sink)
        return
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, input {args.size} bytes")
    print(f"load average at start: {os.getloadavg()}")
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        path = Path(tmp) / "input.bin"
        write_input(path, args.size)
        names = args.profile or sorted(PROFILES, reverse=True)
        # Children are started while this process is still small: Linux carries the parent's
        # peak RSS over into a child's ru_maxrss.
        rss = {n: [child_rss(path, PROFILES[n], sink) for sink in (False, True)] for n in names}
        for name in names:
            bench_profile(path, args.size, PROFILES[name], args.runs, rss[name])
    print(f"\nload average at end: {os.getloadavg()}")


if __name__ == "__main__":
    main()

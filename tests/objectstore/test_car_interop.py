"""CAR interop with the IPFS tools: the npm ``ipfs-car`` reads what cim-place writes, and the
other way round.

Needs ``node`` and ``npm``. ``ipfs-car`` is installed once into ``tests/.npm-cache`` (ignored by
git) and reused by later runs; without node/npm, or when the install fails (offline), the tests
are skipped with the reason.
"""

from __future__ import annotations

import io
import shutil
import subprocess
from pathlib import Path

import pytest

from cim_place.objectstore import dag
from cim_place.objectstore.cid import to_str
from cim_place.objectstore.store import ObjectStore
from cim_place.objectstore.testdata import chacha_stream

pytestmark = pytest.mark.npm

IPFS_CAR = "ipfs-car@3.1.0"
CACHE = Path(__file__).parent / ".npm-cache"
MiB = 1024 * 1024


@pytest.fixture(scope="module")
def ipfs_car() -> list[str]:
    """The command that runs ipfs-car, installing it into the cache on first use."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.skip("node and npm are not on PATH: the ipfs-car interop tests need both")
    binary = CACHE / "node_modules" / ".bin" / "ipfs-car"
    if not binary.exists():
        CACHE.mkdir(exist_ok=True)
        try:
            install = subprocess.run(
                [npm, "install", "--prefix", str(CACHE), "--no-audit", "--no-fund", IPFS_CAR],
                capture_output=True,
                text=True,
                timeout=600,
            )
        except subprocess.TimeoutExpired:
            pytest.skip(f"`npm install {IPFS_CAR}` timed out (offline?)")
        if install.returncode != 0 or not binary.exists():
            lines = (install.stderr or install.stdout).strip().splitlines()
            last = [line for line in lines if line.strip() not in ("", "npm error")][:2]
            pytest.skip(f"`npm install {IPFS_CAR}` failed (offline?): {' / '.join(last)}")
    return [node, str(binary)]


def run(command: list[str], *args: str, cwd: Path) -> str:
    done = subprocess.run([*command, *args], capture_output=True, text=True, timeout=300, cwd=cwd)
    assert done.returncode == 0, f"ipfs-car {' '.join(args)} failed:\n{done.stderr}"
    return done.stdout


# Multi-chunk files: 3 leaves of 1 MiB and 5 leaves of 256 KiB, each with a partial last one.
CASES = [("unixfs-v1-2025", 2 * MiB + 12_345), ("unixfs-v0-2015", 4 * 256 * 1024 + 777)]


@pytest.mark.parametrize(("profile", "size"), CASES)
def test_ipfs_car_reads_our_car(
    ipfs_car: list[str], tmp_path: Path, profile: str, size: int
) -> None:
    data = chacha_stream(f"interop-{profile}", size).read()
    with ObjectStore(tmp_path / "store") as store:
        pin = store.add(io.BytesIO(data), profile=profile)
        ours = [to_str(cid) for cid in dag.walk_cids(store.blocks, pin.root)]
        car = tmp_path / "out.car"
        with car.open("wb") as out:
            store.export_car(pin.root, out)
    assert len(ours) > 2

    listed = run(ipfs_car, "blocks", str(car), "--verify", cwd=tmp_path).split()
    assert listed == ours
    assert run(ipfs_car, "roots", str(car), cwd=tmp_path).split() == [to_str(pin.root)]
    unpacked = tmp_path / "unpacked.bin"
    run(ipfs_car, "unpack", str(car), "--output", str(unpacked), cwd=tmp_path)
    assert unpacked.read_bytes() == data


def test_we_read_a_car_ipfs_car_packed(ipfs_car: list[str], tmp_path: Path) -> None:
    data = chacha_stream("interop-pack", 2 * MiB + 1).read()
    source = tmp_path / "input.bin"
    source.write_bytes(data)
    car = tmp_path / "packed.car"
    run(ipfs_car, "pack", str(source), "--no-wrap", "--output", str(car), cwd=tmp_path)
    with ObjectStore(tmp_path / "store") as store, car.open("rb") as stream:
        [pin] = store.import_car(stream)
        assert pin.size == len(data)
        assert b"".join(store.cat(pin.root)) == data
        # ipfs-car's defaults are the unixfs-v1-2025 profile: the same root CID.
        assert store.add(io.BytesIO(data)).root == pin.root

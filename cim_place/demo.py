"""`make demo`: a whole cim-place domain on this machine, through the real `cim-place` commands.

Starts a domain (a hub, four leaves with agents in three zones, a controller) with `cim-place up`,
adds a generated file on one leaf, watches the controller place it on three leaves in three
zones, reads it back from the domain (every block verified), shows the nodes, and stops the
domain. Each command is printed before it runs, so the demo doubles as a tour of the CLI.
"""

from __future__ import annotations

import hashlib
import json
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cim_place.objectstore.testdata import chacha_stream

SAMPLE_BYTES = 24 * 1024 * 1024 + 12345  # several chunks, and a partial last one
PLACE_TIMEOUT = 120.0


def run(*args: str, cwd: Path, capture: bool = True, echo: bool = True) -> bytes:
    """Run one cim-place command as an operator would, echoing it first."""
    if echo:
        print(f"$ cim-place {shlex.join(args)}", flush=True)
    done = subprocess.run(
        [sys.executable, "-m", "cim_place.cli", *args],
        cwd=cwd,
        check=False,
        stdout=subprocess.PIPE if capture else None,
    )
    if done.returncode != 0:
        raise SystemExit(f"demo failed: `cim-place {shlex.join(args)}` exited {done.returncode}")
    return done.stdout or b""


def wait_placed(work: Path) -> dict[str, object]:
    """Poll `status sample --json` until the controller reports it placed."""
    print("$ cim-place status sample --json   (polled until placed)", flush=True)
    deadline = time.monotonic() + PLACE_TIMEOUT
    last: dict[str, object] = {}
    while time.monotonic() < deadline:
        done = subprocess.run(
            [sys.executable, "-m", "cim_place.cli", "status", "sample", "--json"],
            cwd=work,
            check=False,
            capture_output=True,
        )
        if done.returncode == 0:
            last = json.loads(done.stdout)
            if last.get("state") == "placed":
                return last
        time.sleep(0.5)
    raise SystemExit(f"demo failed: the sample was not placed within {PLACE_TIMEOUT:.0f} s: {last}")


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="cim-place-demo-") as tmp:
        work = Path(tmp)
        print(f"working in {work}\n")
        run("up", "--leaves", "4", "--zones", "3", "--detach", cwd=work, capture=False)
        try:
            tour(work)
        finally:
            print()
            run("down", cwd=work, capture=False)
        print("\ndemo done: content-addressed, placed by policy, verified on every read.")


def tour(work: Path) -> None:
    sample = work / "sample.bin"
    with sample.open("wb") as out:
        stream = chacha_stream("cim-place demo", SAMPLE_BYTES)
        while chunk := stream.read(1 << 20):
            out.write(chunk)
    expected = hashlib.sha256(sample.read_bytes()).hexdigest()
    print(f"\ngenerated {sample.name}: {SAMPLE_BYTES} bytes, sha256 {expected[:16]}...")

    cid = run("cid", sample.name, cwd=work).decode().strip()
    print(cid)
    # --name is also the domain-wide name that status and get take below.
    added = run("add", sample.name, "--node", "leaf-1", "--name", "sample", cwd=work)
    print(added.decode().strip())

    status = wait_placed(work)
    locations = status.get("locations", [])
    assert isinstance(locations, list)
    pinned = [loc for loc in locations if isinstance(loc, dict) and loc.get("state") == "pinned"]
    zones = sorted({str(loc.get("zone")) for loc in pinned})
    nodes = sorted(str(loc.get("node")) for loc in pinned)
    print(f"placed: {len(pinned)} copies on {', '.join(nodes)} in zones {', '.join(zones)}")
    run("status", "sample", cwd=work, capture=False)

    copy = work / "copy.bin"
    run("get", "sample", "-o", copy.name, cwd=work)
    same = hashlib.sha256(copy.read_bytes()).hexdigest() == expected
    print(f"read back from the domain: {copy.stat().st_size} bytes, identical: {same}")
    if not same:
        raise SystemExit("demo failed: the copy read back differs")

    run("nodes", cwd=work, capture=False)
    run("status", cwd=work, capture=False)


if __name__ == "__main__":
    main()

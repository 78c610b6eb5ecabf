"""`make demo`: the local object store, end to end, through the real `cim-place` commands.

Generates a sample file, adds it to a fresh store, prints its CID, reads it back (whole and a byte
range), exports a CAR, imports that CAR into a second store, and checks every byte on the way. Each
command is printed before it runs, so the demo doubles as a tour of the CLI.
"""

from __future__ import annotations

import hashlib
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

from cim_place.objectstore.testdata import chacha_stream

SAMPLE_BYTES = 24 * 1024 * 1024 + 12345  # several chunks, and a partial last one


def run(*args: str, cwd: Path, capture: bool = True) -> bytes:
    """Run one cim-place command as an operator would, echoing it first."""
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


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="cim-place-demo-") as tmp:
        work = Path(tmp)
        sample = work / "sample.bin"
        with sample.open("wb") as out:
            stream = chacha_stream("cim-place demo", SAMPLE_BYTES)
            while chunk := stream.read(1 << 20):
                out.write(chunk)
        expected = hashlib.sha256(sample.read_bytes()).hexdigest()
        print(f"generated {sample.name}: {SAMPLE_BYTES} bytes, sha256 {expected[:16]}...\n")

        print(f"working in {work}")
        store, second = "store", "store-b"
        cid = run("cid", sample.name, cwd=work).decode().strip()
        print(cid)
        added = (
            run("add", sample.name, "--name", "sample", "--store", store, cwd=work).decode().strip()
        )
        print(added)
        if added != cid:
            raise SystemExit(f"demo failed: add printed {added}, cid printed {cid}")
        run("pins", "ls", "--store", store, cwd=work, capture=False)

        back = run("cat", "sample", "--store", store, cwd=work)
        same = hashlib.sha256(back).hexdigest() == expected
        print(f"read back {len(back)} bytes, identical: {same}")
        part = run("cat", cid, "--offset", "1048570", "--length", "16", "--store", store, cwd=work)
        print(f"bytes 1048570..1048586 (across a chunk boundary): {part.hex()}")

        car = "sample.car"
        run("export", cid, "-o", car, "--store", store, cwd=work, capture=False)
        run("import", car, "--name", "sample", "--store", second, cwd=work, capture=False)
        copy = run("cat", cid, "--store", second, cwd=work)
        if hashlib.sha256(copy).hexdigest() != expected:
            raise SystemExit("demo failed: the imported copy differs")
        print("the CAR imported into a second store reads back identical\n")

        v0 = run("cid", sample.name, "--profile", "unixfs-v0-2015", cwd=work).decode().strip()
        print(f"the same file under the legacy profile unixfs-v0-2015: {v0}")
        print("\ndemo done: content-addressed, verified on every read, portable as CAR.")


if __name__ == "__main__":
    main()

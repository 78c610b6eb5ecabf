"""Cold start of the command line: `cim-place cid SMALLFILE` against `python -c pass`.

    .venv/bin/python bench/cli.py [--runs N]

Both are run N times each, interleaved (so a busy moment of the machine hits both), as fresh
processes of the same interpreter; the figure is the median wall time of each and the
difference. Also timed, for reference: `cim-place status --help` (the whole Typer path with one
command group) and `python -c "import typer"`. Target: `cid` at most 120 ms above `python -c pass`.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGET_MS = 120.0


def wall_ms(argv: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return (time.perf_counter() - start) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=21)
    args = parser.parse_args()
    script = Path(sys.executable).with_name("cim-place")
    if not script.exists():
        sys.exit(f"{script} is missing: run `make check` (pip install -e .) first")
    with tempfile.TemporaryDirectory() as tmp:
        small = Path(tmp) / "small.txt"
        small.write_bytes(b"hello, cim-place\n")
        commands = {
            "python -c pass": [sys.executable, "-c", "pass"],
            "cim-place cid SMALLFILE": [str(script), "cid", str(small)],
            "python -c 'import typer'": [sys.executable, "-c", "import typer"],
            "cim-place status --help": [str(script), "status", "--help"],
        }
        times: dict[str, list[float]] = {label: [] for label in commands}
        for argv in commands.values():
            wall_ms(argv)  # warm the page cache; not counted
        for _ in range(args.runs):
            for label, argv in commands.items():
                times[label].append(wall_ms(argv))
    medians = {label: statistics.median(values) for label, values in times.items()}
    for label, value in medians.items():
        print(f"{label:28s} median {value:7.1f} ms  (min {min(times[label]):.1f}, n={args.runs})")
    above = medians["cim-place cid SMALLFILE"] - medians["python -c pass"]
    verdict = "ok" if above <= TARGET_MS else "ABOVE TARGET"
    print(f"cid above python -c pass: {above:.1f} ms (target <= {TARGET_MS:.0f} ms): {verdict}")


if __name__ == "__main__":
    main()

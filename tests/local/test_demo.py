"""`make demo` (cim_place.demo) runs to the end: a whole local domain started with `cim-place up`,
a 24 MiB file placed on three leaves in three zones, read back verified, the domain stopped.

`make demo` is `.venv/bin/python -m cim_place.demo` once the virtual env exists; this runs that
module as a person would (the README test lists `make demo` as covered here)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.nats

HANG_GUARD = 600.0


def test_the_demo_runs_to_the_end(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CIM_PLACE_")}
    env["TMPDIR"] = str(tmp_path)  # the demo works in a temporary directory: this test's
    done = subprocess.run(
        [sys.executable, "-m", "cim_place.demo"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=HANG_GUARD,
        check=False,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert "placed: 3 copies on" in output, output
    assert "identical: True" in output, output
    assert "demo done" in output, output
    assert "Traceback" not in output, output
    assert not list(tmp_path.glob("cim-place-demo-*")), "the demo left its directory behind"

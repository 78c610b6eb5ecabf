"""`cim-place cid` runs without Typer (cli/fast.py) and answers exactly as the Typer command."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cim_place.cli import app as app_module
from cim_place.cli.fast import try_run

CONSOLE = "from cim_place.cli.app import main; main()"


def console(*args: str, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-c", CONSOLE, *args], input=stdin, capture_output=True)


@pytest.mark.parametrize(
    "extra", [[], ["--profile", "unixfs-v0-2015"], ["-p", "unixfs-v0-2015"], ["-p", "nope"]]
)
def test_the_fast_path_answers_as_the_typer_command(tmp_path: Path, extra: list[str]) -> None:
    small = tmp_path / "small.txt"
    small.write_bytes(b"hello, cim-place\n")
    fast = console("cid", str(small), *extra)
    slow = CliRunner().invoke(app_module.app, ["cid", str(small), *extra])
    assert fast.returncode == slow.exit_code
    assert fast.stdout.decode() == slow.stdout
    assert fast.stderr.decode() == slow.stderr
    assert "Traceback" not in fast.stderr.decode()


def test_a_missing_file_is_one_line_and_exit_1(tmp_path: Path) -> None:
    done = console("cid", str(tmp_path / "absent"))
    assert done.returncode == 1
    assert done.stderr.decode().count("\n") == 1
    assert done.stderr.decode().startswith("error: cannot read")


def test_standard_input_and_no_typer_import() -> None:
    probe = (
        "import sys; sys.argv = ['cim-place', 'cid', '-']\n"
        "from cim_place.cli.app import main\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "print('TYPER', 'typer' in sys.modules, 'rich' in sys.modules)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], input=b"abc", capture_output=True, check=True
    )
    assert b"TYPER False False" in done.stdout


def test_anything_unusual_goes_to_typer() -> None:
    for argv in (["cid"], ["cid", "--help"], ["cid", "a", "b"], ["cid", "a", "--json"], ["add"]):
        assert try_run(argv) is None
    assert console("cid").returncode == 2  # Typer's usage error: missing argument
    assert b"Usage" in console("cid", "--help").stdout

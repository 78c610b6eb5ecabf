"""The local object-store commands, as an operator runs them, including every kind of bad input."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cim_place.cli.app import app
from cim_place.objectstore import cid as cids
from cim_place.objectstore.dag import walk_cids
from cim_place.objectstore.store import ObjectStore
from cim_place.objectstore.testdata import chacha_stream

runner = CliRunner()


@pytest.fixture
def sample(tmp_path: Path) -> Path:
    path = tmp_path / "sample.bin"
    path.write_bytes(chacha_stream("cli-sample", 3 * 1024 * 1024 + 17).read())
    return path


@pytest.fixture
def store(tmp_path: Path) -> Path:
    return tmp_path / "store"


def cli(*args: str) -> tuple[int, str, str]:
    result = runner.invoke(app, list(args))
    return result.exit_code, result.stdout, result.stderr


def test_add_cat_export_import_pins_gc(sample: Path, store: Path, tmp_path: Path) -> None:
    code, out, _ = cli("cid", str(sample))
    assert code == 0
    cid = out.strip()
    code, out, _ = cli("add", str(sample), "--name", "s", "--store", str(store), "--meta", "k=v")
    assert (code, out.strip()) == (0, cid)

    by_name = runner.invoke(app, ["cat", "s", "--store", str(store)])
    assert by_name.stdout_bytes == sample.read_bytes()
    by_cid = runner.invoke(app, ["cat", cid, "--store", str(store)])
    assert by_cid.stdout_bytes == sample.read_bytes()
    window = ["--offset", "1048570", "--length", "100"]
    ranged = runner.invoke(app, ["cat", cid, *window, "--store", str(store)])
    assert ranged.stdout_bytes == sample.read_bytes()[1048570:1048670]

    code, out, _ = cli("pins", "ls", "--json", "--store", str(store))
    [pin] = json.loads(out)
    assert pin["cid"] == cid and pin["name"] == "s" and pin["metadata"] == {"k": "v"}
    assert pin["size"] == sample.stat().st_size

    car = tmp_path / "s.car"
    assert cli("export", "s", "-o", str(car), "--store", str(store))[0] == 0
    other = tmp_path / "other"
    code, out, _ = cli("import", str(car), "--store", str(other))
    assert (code, out.strip()) == (0, cid)
    assert (
        runner.invoke(app, ["cat", cid, "--store", str(other)]).stdout_bytes == sample.read_bytes()
    )

    assert cli("pins", "rm", "s", "--store", str(store))[0] == 0
    code, out, _ = cli("gc", "--json", "--store", str(store))
    assert code == 0
    assert json.loads(out)["blocks_removed"] == 5  # 3 full chunks, 1 partial, the root
    assert cli("pins", "ls", "--json", "--store", str(store))[1].strip() == "[]"


def test_cid_reads_standard_input(sample: Path) -> None:
    piped = runner.invoke(app, ["cid", "-"], input=sample.read_bytes())
    assert piped.exit_code == 0
    assert piped.stdout.strip() == cli("cid", str(sample))[1].strip()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["cid", "/nonexistent/file"], "cannot read /nonexistent/file"),
        (["add", "/nonexistent/file"], "cannot read /nonexistent/file"),
        (["cid", "{sample}", "--profile", "unixfs-v9"], "unixfs-v9"),
        (["cat", "not-a-cid"], "not-a-cid"),
        (["cat", "Qmnope"], "Qmnope"),
        (["export", "bafynotreal", "-o", "{tmp}/x.car"], "bafynotreal"),
        (["import", "{tmp}/missing.car"], "missing.car"),
        (["pins", "rm", "nothing-by-that-name"], "nothing-by-that-name"),
        (["add", "{sample}", "--meta", "novalue"], "KEY=VALUE"),
    ],
)
def test_bad_input_is_one_line_and_exit_1(
    args: list[str], message: str, sample: Path, store: Path, tmp_path: Path
) -> None:
    cli("add", str(sample), "--store", str(store))  # so that commands reading a store find one
    filled = [a.format(sample=sample, tmp=tmp_path) for a in args]
    store_args = [] if args[0] == "cid" else ["--store", str(store)]
    code, out, err = cli(*filled, *store_args)
    assert code == 1
    assert out == ""
    assert err.startswith("error: ")
    assert err.count("\n") == 1
    assert message in err


def test_reading_a_store_that_does_not_exist_says_so(tmp_path: Path) -> None:
    code, _, err = cli("cat", "anything", "--store", str(tmp_path / "nowhere"))
    assert code == 1
    assert "no object store" in err and "cim-place add" in err


def test_corrupt_block_on_disk_is_named_and_never_returned(sample: Path, store: Path) -> None:
    cid = cli("add", str(sample), "--store", str(store))[1].strip()
    with ObjectStore(store) as objects:
        blocks = list(walk_cids(objects.blocks, cids.parse(cid)))  # root, then the chunks
        victim = objects.blocks.block_path(blocks[2])
    data = bytearray(victim.read_bytes())
    data[100] ^= 0xFF
    os.chmod(victim, 0o644)
    victim.write_bytes(bytes(data))
    result = runner.invoke(app, ["cat", cid, "--store", str(store)])
    assert result.exit_code == 1
    assert cids.to_str(blocks[2]) in result.stderr
    assert "corrupt" in result.stderr
    # Bytes before the corrupt block may have been written; the corrupt block's bytes never are.
    assert bytes(data) not in result.stdout_bytes


def test_truncated_car_imports_nothing(sample: Path, store: Path, tmp_path: Path) -> None:
    cli("add", str(sample), "--store", str(store))
    car = tmp_path / "s.car"
    cid = cli("cid", str(sample))[1].strip()
    assert cli("export", cid, "-o", str(car), "--store", str(store))[0] == 0
    car.write_bytes(car.read_bytes()[: car.stat().st_size // 2])
    other = tmp_path / "other"
    code, _, err = cli("import", str(car), "--store", str(other))
    assert code == 1 and "truncated" in err.lower()
    with ObjectStore(other) as objects:
        assert objects.pins.list() == []
        assert list(objects.blocks.cids()) == []


def test_disk_full_during_add_leaves_no_pin(
    sample: Path, store: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_write = os.write
    calls = {"n": 0}

    def write(fd: int, data: bytes) -> int:
        calls["n"] += 1
        if calls["n"] > 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", write)
    code, _, err = cli("add", str(sample), "--name", "s", "--store", str(store))
    monkeypatch.undo()
    assert code == 1
    assert "space" in err.lower() or "full" in err.lower()
    with ObjectStore(store) as objects:
        assert objects.pins.list() == []
        for cid in objects.blocks.cids():
            objects.blocks.get(cid)  # every block still addressable is whole


def test_console_script_is_installed(sample: Path, store: Path) -> None:
    script = Path(sys.executable).with_name("cim-place")
    command = [str(script)] if script.exists() else [shutil.which("cim-place") or "cim-place"]
    done = subprocess.run(
        [*command, "add", str(sample), "--store", str(store)], capture_output=True, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.decode().strip() == cli("cid", str(sample))[1].strip()
    usage = subprocess.run([*command, "add"], capture_output=True, check=False)
    assert usage.returncode == 2

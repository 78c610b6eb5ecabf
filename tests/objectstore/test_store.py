"""ObjectStore: add, cat, pins, CAR in and out, and garbage collection."""

from __future__ import annotations

import io
import multiprocessing
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cim_place.errors import (
    BlockNotFoundError,
    CarError,
    CorruptBlockError,
    PinNotFoundError,
    StoreError,
    StoreFullError,
)
from cim_place.objectstore import dag
from cim_place.objectstore.cid import RAW, codec_of, to_str
from cim_place.objectstore.store import GcResult, ObjectStore
from cim_place.objectstore.testdata import chacha_stream

MiB = 1024 * 1024


def content(seed: str, size: int) -> bytes:
    return chacha_stream(seed, size).read()


@pytest.fixture
def store(tmp_path: Path) -> Iterator[ObjectStore]:
    with ObjectStore(tmp_path / "store") as opened:
        yield opened


def test_layout(tmp_path: Path) -> None:
    with ObjectStore(tmp_path / "new" / "store") as opened:
        opened.add(io.BytesIO(b"x"))
    assert (tmp_path / "new" / "store" / "blocks").is_dir()
    assert (tmp_path / "new" / "store" / "pins.sqlite").is_file()


@pytest.mark.parametrize("profile", ["unixfs-v1-2025", "unixfs-v0-2015"])
def test_add_cat_stat(store: ObjectStore, profile: str) -> None:
    data = content("add", 2 * MiB + 3)
    pin = store.add(
        io.BytesIO(data), name="doc", profile=profile, owner="ops", metadata={"type": "report"}
    )
    assert pin.size == len(data)
    assert pin.blocks == store.blocks.block_count()
    assert pin.name == "doc" and pin.owner == "ops" and pin.metadata == {"type": "report"}
    assert store.stat(pin.root) == pin
    assert b"".join(store.cat(pin.root)) == data
    assert b"".join(store.cat(pin.root, offset=MiB - 5, length=10)) == data[MiB - 5 : MiB + 5]
    assert (codec_of(pin.root) == RAW) is False


def test_add_reports_progress(store: ObjectStore) -> None:
    seen: list[int] = []
    store.add(io.BytesIO(content("p", 3 * MiB)), progress=seen.append)
    assert sum(seen) == 3 * MiB


def test_resolve(store: ObjectStore) -> None:
    pin = store.add(io.BytesIO(b"resolve me"), name="note")
    assert store.resolve("note") == pin.root
    assert store.resolve(to_str(pin.root)) == pin.root
    with pytest.raises(PinNotFoundError, match="pins ls"):
        store.resolve("no-such-name")


def test_unpin(store: ObjectStore) -> None:
    pin = store.add(io.BytesIO(b"short lived"), name="tmp")
    assert store.unpin("tmp") == pin
    assert store.stat(pin.root) is None
    with pytest.raises(PinNotFoundError, match="not pinned"):
        store.unpin(to_str(pin.root))
    with pytest.raises(PinNotFoundError):
        store.unpin("tmp")


class FailingStream:
    """Yields ``good`` bytes, then fails like a disconnected source."""

    def __init__(self, good: bytes) -> None:
        self._good = io.BytesIO(good)

    def read(self, size: int = -1, /) -> bytes:
        chunk = self._good.read(size)
        if not chunk:
            raise OSError("connection reset while reading")
        return chunk


def test_failed_add_leaves_no_pin(store: ObjectStore) -> None:
    with pytest.raises(OSError, match="connection reset"):
        store.add(FailingStream(content("f", 2 * MiB + 1)), name="half")  # type: ignore[arg-type]
    assert store.pins.list() == []
    assert store.pins.by_name("half") is None
    written = store.blocks.block_count()
    assert written == 2  # the two whole leaves read before the failure
    assert store.gc().blocks_removed == written
    assert store.blocks.block_count() == 0


def test_add_into_a_full_volume_leaves_no_pin(tmp_path: Path) -> None:
    with ObjectStore(tmp_path / "small", capacity=3 * MiB) as small:
        with pytest.raises(StoreFullError, match="small"):
            small.add(io.BytesIO(content("big", 5 * MiB)), name="big")
        assert small.pins.list() == []
        assert small.blocks.used_bytes() <= 3 * MiB
        small.gc()
        assert small.blocks.block_count() == 0


def test_corrupt_block_is_found_by_cat_and_never_returned(store: ObjectStore) -> None:
    data = content("c", 3 * MiB)
    pin = store.add(io.BytesIO(data))
    leaves = [cid for cid in dag.walk_cids(store.blocks, pin.root) if cid != pin.root]
    damaged = leaves[1]
    path = store.blocks.block_path(damaged)
    raw = bytearray(path.read_bytes())
    raw[100] ^= 0xFF
    path.write_bytes(bytes(raw))
    returned = bytearray()
    with pytest.raises(CorruptBlockError, match=to_str(damaged)):
        for chunk in store.cat(pin.root):
            returned += chunk
    assert bytes(returned) == data[:MiB]  # only the verified first leaf came out
    assert bytes(raw) not in bytes(returned)


def test_export_import_between_stores(tmp_path: Path) -> None:
    data = content("x", 2 * MiB + 100)
    with ObjectStore(tmp_path / "a") as first, ObjectStore(tmp_path / "b") as second:
        pin = first.add(io.BytesIO(data), name="orig")
        car = io.BytesIO()
        written = first.export_car(pin.root, car)
        assert written == len(car.getvalue())
        car.seek(0)
        [imported] = second.import_car(car, name="copy", owner="bob")
        assert imported.root == pin.root
        assert imported.size == len(data)
        assert imported.blocks == pin.blocks
        assert imported.name == "copy" and imported.owner == "bob"
        assert second.resolve("copy") == pin.root
        assert b"".join(second.cat(pin.root)) == data


def test_importing_a_pinned_root_keeps_its_name(store: ObjectStore) -> None:
    """Re-importing one's own export must not unname the pin (README: export, then import)."""
    pin = store.add(io.BytesIO(content("k", MiB + 7)), name="report", owner="alice")
    car = io.BytesIO()
    store.export_car(pin.root, car)
    car.seek(0)
    [kept] = store.import_car(car)
    assert (kept.name, kept.owner) == ("report", "alice")
    assert store.resolve("report") == pin.root
    car.seek(0)
    [renamed] = store.import_car(car, name="report-2")
    assert renamed.name == "report-2" and renamed.owner == ""


def _car_of(tmp_path: Path, data: bytes) -> bytes:
    with ObjectStore(tmp_path / "source") as source:
        pin = source.add(io.BytesIO(data))
        out = io.BytesIO()
        source.export_car(pin.root, out)
    return out.getvalue()


def test_truncated_or_damaged_car_imports_nothing(store: ObjectStore, tmp_path: Path) -> None:
    store.add(io.BytesIO(b"already here"), name="keep")
    before = (store.blocks.block_count(), store.blocks.used_bytes(), store.pins.list())
    car = _car_of(tmp_path, content("t", 3 * MiB))
    flipped = bytearray(car)
    flipped[len(car) - 1000] ^= 0x40
    for bad in (car[: len(car) - 1], car[: len(car) // 2], bytes(flipped)):
        with pytest.raises(CarError):
            store.import_car(io.BytesIO(bad))
        after = (store.blocks.block_count(), store.blocks.used_bytes(), store.pins.list())
        assert after == before


def test_a_name_needs_one_root(store: ObjectStore, tmp_path: Path) -> None:
    with ObjectStore(tmp_path / "two") as two:
        a = two.add(io.BytesIO(b"a"))
        b = two.add(io.BytesIO(b"b"))
        from cim_place.objectstore.car import write_car

        out = io.BytesIO()
        write_car(two.blocks, [a.root, b.root], out)
    with pytest.raises(CarError, match="one root"):
        store.import_car(io.BytesIO(out.getvalue()), name="both")
    assert store.blocks.block_count() == 0
    pins = store.import_car(io.BytesIO(out.getvalue()))
    assert [p.root for p in pins] == [a.root, b.root]


def test_gc_keeps_pinned_dags_and_shared_blocks(store: ObjectStore) -> None:
    shared = content("shared", 2 * MiB)  # two whole 1 MiB leaves both files contain
    first = store.add(io.BytesIO(shared + b"first tail"), name="first")
    second = store.add(io.BytesIO(shared + b"second tail"), name="second")
    loose = store.add(io.BytesIO(content("loose", MiB + 1)))
    store.unpin(to_str(loose.root))
    first_cids = set(dag.walk_cids(store.blocks, first.root))
    second_cids = set(dag.walk_cids(store.blocks, second.root))
    assert len(first_cids & second_cids) == 2

    before = store.blocks.used_bytes()
    result = store.gc()
    assert result.blocks_removed == loose.blocks
    assert result.bytes_freed == before - store.blocks.used_bytes()
    assert set(store.blocks.cids()) == first_cids | second_cids

    store.unpin("first")
    result = store.gc()
    assert result.blocks_removed == len(first_cids - second_cids)
    assert set(store.blocks.cids()) == second_cids
    assert b"".join(store.cat(second.root)) == shared + b"second tail"
    assert store.gc() == GcResult(0, 0)


def test_gc_stops_when_a_pinned_dag_is_damaged(store: ObjectStore) -> None:
    pin = store.add(io.BytesIO(content("d", 3 * MiB)), profile="unixfs-v0-2015")
    garbage = store.add(io.BytesIO(b"garbage"))
    store.unpin(to_str(garbage.root))
    root_path = store.blocks.block_path(pin.root)
    root_path.write_bytes(b"not the root any more")
    count = store.blocks.block_count()
    with pytest.raises(StoreError, match="nothing deleted"):
        store.gc()
    assert store.blocks.block_count() == count


class GatedStream:
    """Gives ``first`` bytes, then waits for ``gate`` before giving the rest."""

    def __init__(self, data: bytes, first: int, reached: threading.Event, gate: threading.Event):
        self._data = io.BytesIO(data)
        self._first = first
        self._reached = reached
        self._gate = gate

    def read(self, size: int = -1, /) -> bytes:
        if self._data.tell() >= self._first and not self._gate.is_set():
            self._reached.set()
            self._gate.wait()
        return self._data.read(size)


def _gc_in_process(path: str, results: Any) -> None:
    with ObjectStore(Path(path)) as other:
        results.put(other.gc().blocks_removed)


def _wait_for_blocked_flock(lock_file: Path) -> None:
    """Wait until some process waits for a flock on ``lock_file`` (seen in /proc/locks)."""
    inode = f":{lock_file.stat().st_ino} "
    for _ in range(6000):
        with open("/proc/locks") as locks:
            if any("->" in line and inode in line for line in locks):
                return
        time.sleep(0.01)
    raise AssertionError(f"no process ever waited for the lock {lock_file}")


@pytest.mark.skipif(not Path("/proc/locks").exists(), reason="needs Linux /proc/locks")
def test_gc_in_another_process_waits_for_an_add(tmp_path: Path) -> None:
    data = content("slow", 4 * MiB)
    reached, gate = threading.Event(), threading.Event()
    pins = []
    with ObjectStore(tmp_path / "store") as writer:
        garbage = writer.add(io.BytesIO(b"garbage"))
        writer.unpin(to_str(garbage.root))
        adding = threading.Thread(
            target=lambda: pins.append(writer.add(GatedStream(data, 2 * MiB, reached, gate)))  # type: ignore[arg-type]
        )
        adding.start()
        assert reached.wait(60)
        assert writer.blocks.block_count() >= 3  # the garbage + unpinned blocks of the add

        ctx = multiprocessing.get_context("spawn")
        results = ctx.Queue()
        collector = ctx.Process(target=_gc_in_process, args=(str(tmp_path / "store"), results))
        collector.start()
        # The collector blocks on gc.lock while the add holds it shared.
        _wait_for_blocked_flock(tmp_path / "store" / "gc.lock")
        assert collector.is_alive()
        gate.set()
        adding.join(60)
        collector.join(60)
        assert collector.exitcode == 0
        assert results.get(timeout=10) == 1  # only the garbage: the add was pinned first
        [pin] = pins
        assert b"".join(writer.cat(pin.root)) == data


def test_verify_finds_and_removes_corrupt_blocks(store: ObjectStore) -> None:
    pin = store.add(io.BytesIO(content("v", 2 * MiB + 1)))
    leaf = next(cid for cid in dag.walk_cids(store.blocks, pin.root) if cid != pin.root)
    store.blocks.block_path(leaf).write_bytes(b"rot")
    assert store.verify() == [leaf]
    assert store.blocks.has(leaf)
    assert store.verify(remove_corrupt=True) == [leaf]
    assert not store.blocks.has(leaf)
    assert store.blocks.used_bytes() == sum(
        store.blocks.block_size(cid) or 0 for cid in store.blocks.cids()
    )
    with pytest.raises(BlockNotFoundError):
        b"".join(store.cat(pin.root))

"""SqlitePinIndex: the PinIndex contract, names, persistence, several processes."""

from __future__ import annotations

import multiprocessing
from collections.abc import Iterator
from pathlib import Path

import pytest

from cim_place.interfaces import Pin
from cim_place.objectstore.cid import RAW, make_cid
from cim_place.objectstore.pins import SqlitePinIndex


def cid(n: int) -> bytes:
    return make_cid(RAW, str(n).encode())


@pytest.fixture
def pins(tmp_path: Path) -> Iterator[SqlitePinIndex]:
    with SqlitePinIndex(tmp_path / "pins.sqlite") as index:
        yield index


def test_add_get_remove(pins: SqlitePinIndex) -> None:
    pin = Pin(
        cid(1), size=10, blocks=2, name="a", owner="alice", metadata={"k": "v"}, pinned_at=5.0
    )
    pins.add(pin)
    assert pins.get(cid(1)) == pin
    assert pins.by_name("a") == pin
    assert pins.list() == [pin]
    assert len(pins) == 1
    assert pins.remove(cid(1)) is True
    assert pins.remove(cid(1)) is False
    assert pins.get(cid(1)) is None
    assert pins.by_name("a") is None
    assert pins.list() == []


def test_pinning_again_replaces_the_record(pins: SqlitePinIndex) -> None:
    pins.add(Pin(cid(1), size=1, blocks=1, name="old", pinned_at=1.0))
    pins.add(Pin(cid(1), size=1, blocks=1, name="new", owner="bob", pinned_at=2.0))
    assert len(pins) == 1
    assert pins.by_name("old") is None
    pin = pins.get(cid(1))
    assert pin is not None and pin.name == "new" and pin.owner == "bob"


def test_unnamed_pins_do_not_collide(pins: SqlitePinIndex) -> None:
    for n in range(3):
        pins.add(Pin(cid(n), size=n, blocks=1, pinned_at=float(n)))
    assert [p.root for p in pins.list()] == [cid(0), cid(1), cid(2)]
    assert set(pins.roots()) == {cid(0), cid(1), cid(2)}


def test_a_name_moves_to_the_newest_root(pins: SqlitePinIndex) -> None:
    pins.add(Pin(cid(1), size=1, blocks=1, name="report", pinned_at=1.0))
    pins.add(Pin(cid(2), size=2, blocks=1, name="report", pinned_at=2.0))
    named = pins.by_name("report")
    assert named is not None and named.root == cid(2)
    old = pins.get(cid(1))
    assert old is not None and old.name is None  # still pinned, without the name


def test_persists_across_opens(tmp_path: Path) -> None:
    pin = Pin(cid(7), size=70, blocks=3, name="seven", metadata={"a": "1"}, pinned_at=7.5)
    with SqlitePinIndex(tmp_path / "p.sqlite") as index:
        index.add(pin)
    with SqlitePinIndex(tmp_path / "p.sqlite") as index:
        assert index.get(cid(7)) == pin
        mode = index._db.execute("PRAGMA journal_mode").fetchone()[0]
        assert mode == "wal"


def _add_many(path: str, start: int) -> None:
    with SqlitePinIndex(Path(path)) as index:
        for n in range(start, start + 50):
            index.add(Pin(cid(n), size=n, blocks=1, name=f"n{n}", pinned_at=float(n)))


def test_several_processes_write_at_once(tmp_path: Path) -> None:
    path = tmp_path / "pins.sqlite"
    SqlitePinIndex(path).close()
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_add_many, args=(str(path), k * 50)) for k in range(3)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=120)
        assert proc.exitcode == 0
    with SqlitePinIndex(path) as index:
        assert len(index) == 150
        found = index.by_name("n149")
        assert found is not None and found.root == cid(149)

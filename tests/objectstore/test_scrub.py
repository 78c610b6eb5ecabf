"""Scrub of a volume: finds corrupt and missing blocks, resumes a pass, yields, throttles; and
the leftovers of failed writes are swept without a gc."""

from __future__ import annotations

import io
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cim_place.objectstore import dag, leftovers
from cim_place.objectstore.cid import RAW, codec_of
from cim_place.objectstore.scrub import Foreground, Throttle, VolumeScrubber
from cim_place.objectstore.store import ObjectStore
from cim_place.objectstore.testdata import chacha_stream

MiB = 1024 * 1024


@pytest.fixture
def store(tmp_path: Path) -> Iterator[ObjectStore]:
    with ObjectStore(tmp_path / "vol", fsync="none") as opened:
        yield opened


def add(store: ObjectStore, seed: str, size: int) -> bytes:
    return store.add(io.BytesIO(chacha_stream(seed, size).read())).root


def leaves(store: ObjectStore, root: bytes) -> list[bytes]:
    return [cid for cid in dag.walk_cids(store.blocks, root) if codec_of(cid) == RAW]


def test_a_clean_volume_scrubs_clean_and_counts_every_block(store: ObjectStore) -> None:
    roots = [add(store, "a", 3 * MiB), add(store, "b", 100)]
    scrubber = VolumeScrubber(store, rate=None)
    report = scrubber.run_pass()
    assert report.complete and report.damaged == []
    expected = sum(sum(1 for _ in dag.walk_cids(store.blocks, r)) for r in roots)
    assert report.blocks_checked == expected
    assert report.bytes_checked == store.blocks.used_bytes()
    assert all(scrubber.state.verified_at(r) is not None for r in roots)
    assert scrubber.last_full_pass() is not None and not scrubber.due(3600)


def test_corrupt_and_missing_blocks_are_found_and_recorded(store: ObjectStore) -> None:
    root = add(store, "c", 2 * MiB)
    bad, gone = leaves(store, root)[:2]
    originals = {cid: store.blocks.get(cid) for cid in (bad, gone)}
    path = store.blocks.block_path(bad)
    data = bytearray(path.read_bytes())
    data[10] ^= 0xFF
    path.write_bytes(bytes(data))
    os.unlink(store.blocks.block_path(gone))
    scrubber = VolumeScrubber(store, rate=None)
    report = scrubber.run_pass()
    found = {(d.block, d.problem) for d in report.damaged}
    assert found == {(bad, "corrupt"), (gone, "missing")}
    assert dict(scrubber.state.damage_of(root)) == {bad: "corrupt", gone: "missing"}
    assert {(b, p) for _, b, p in scrubber.scrub([root])} == found
    # A repaired replica (blocks back) scrubs clean and its damage is cleared.
    store.blocks.delete(bad)
    for cid, block in originals.items():
        store.blocks.put(cid, block)
    assert scrubber.run_pass().damaged == []
    assert scrubber.state.damaged() == {}


def test_an_interrupted_pass_resumes_after_the_last_root(store: ObjectStore) -> None:
    roots = sorted(add(store, f"r{i}", 1000) for i in range(5))
    scrubber = VolumeScrubber(store, rate=None)
    stop = threading.Event()
    checked: list[bytes] = []
    original = scrubber.check_root

    def check_then_stop(root: bytes) -> tuple[int, int, list[object]]:
        checked.append(root)
        if len(checked) == 2:
            stop.set()
        return original(root)  # type: ignore[return-value]

    scrubber.check_root = check_then_stop  # type: ignore[method-assign,assignment]
    first = scrubber.run_pass(stop=stop)
    assert not first.complete and first.roots_checked == 2
    scrubber.close()
    again = VolumeScrubber(store, rate=None)  # a restart
    rest = again.run_pass()
    assert rest.complete and rest.roots_checked == 5
    assert rest.blocks_checked == 5
    assert checked == roots[:2]


def test_throttle_keeps_the_rate() -> None:
    now = [0.0]

    def sleep(seconds: float) -> None:
        now[0] += seconds

    throttle = Throttle(1000.0, clock=lambda: now[0], sleep=sleep)
    for _ in range(50):
        throttle.take(100)
    # 5000 bytes at 1000 B/s with one second of burst: at least 4 s of (simulated) time.
    assert now[0] >= 4.0


def test_scrub_waits_while_foreground_work_runs(store: ObjectStore) -> None:
    add(store, "f", 3000)
    foreground = Foreground()
    scrubber = VolumeScrubber(store, rate=None, foreground=foreground, max_pause=30.0)
    done = threading.Event()
    with foreground.busy():
        worker = threading.Thread(target=lambda: (scrubber.run_pass(), done.set()))
        worker.start()
        assert not done.wait(0.3)  # paused while busy
    assert done.wait(10)
    worker.join()


def test_leftovers_of_a_failed_add_are_swept_and_pinned_blocks_stay(store: ObjectStore) -> None:
    kept = add(store, "keep", 2 * MiB)
    before = store.blocks.block_count()

    class Failing(io.RawIOBase):
        def __init__(self) -> None:
            head = chacha_stream("keep", 2 * MiB).read()[:MiB]
            self.source = io.BytesIO(head + os.urandom(2 * MiB))
            self.served = 0

        def readable(self) -> bool:
            return True

        def readinto(self, buffer: bytearray) -> int:  # type: ignore[override]
            if self.served > 2 * MiB + 300_000:
                raise OSError("disk read error")
            n = self.source.readinto(buffer)
            self.served += n
            return n

    with pytest.raises(OSError):
        store.add(Failing())  # type: ignore[arg-type]
    assert store.blocks.block_count() > before
    assert leftovers.sweep(store).journals == 0  # too young: a retry may reuse them
    result = leftovers.sweep(store, older_than=-1)
    assert result.journals == 1 and result.blocks_removed >= 1
    assert store.blocks.block_count() == before  # shared blocks of the pinned file stayed
    assert sum(1 for _ in dag.walk(store.blocks, kept)) > 0


def test_a_successful_write_leaves_no_journal(store: ObjectStore) -> None:
    add(store, "ok", 5000)
    assert list(leftovers.journal_dir(store).glob("*.cids")) == []
    assert leftovers.sweep(store, older_than=-1).journals == 0
    assert time.time() > 0

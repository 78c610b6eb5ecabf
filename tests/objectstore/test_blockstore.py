"""FsBlockStore: the BlockStore contract, atomicity, concurrency, corruption, accounting."""

from __future__ import annotations

import errno
import multiprocessing
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from cim_place.errors import BlockNotFoundError, CorruptBlockError, StoreError, StoreFullError
from cim_place.objectstore import blockstore
from cim_place.objectstore.blockstore import FsBlockStore, block_name, cid_of_name
from cim_place.objectstore.cid import DAG_PB, RAW, make_cid, to_str


def block(payload: bytes, codec: int = RAW, version: int = 1) -> tuple[bytes, bytes]:
    return make_cid(codec, payload, version), payload


@pytest.fixture
def store(tmp_path: Path) -> Iterator[FsBlockStore]:
    with FsBlockStore(tmp_path / "vol") as opened:
        yield opened


def test_put_get_has_delete(store: FsBlockStore) -> None:
    cid, data = block(b"hello")
    assert not store.has(cid)
    assert store.put(cid, data) is True
    assert store.has(cid)
    assert store.get(cid) == data
    assert store.put(cid, data) is False
    assert store.block_size(cid) == 5
    assert store.used_bytes() == 5
    assert store.block_count() == 1
    assert store.delete(cid) is True
    assert store.delete(cid) is False
    assert not store.has(cid)
    assert store.block_size(cid) is None
    assert store.used_bytes() == 0
    with pytest.raises(BlockNotFoundError, match=to_str(cid)):
        store.get(cid)


def test_cidv0_and_cidv1_are_distinct_keys(store: FsBlockStore) -> None:
    data = b"\x0a\x02\x08\x01"  # any bytes: the key is the CID
    v0, v1 = make_cid(DAG_PB, data, 0), make_cid(DAG_PB, data, 1)
    assert store.put(v0, data)
    assert store.put(v1, data)
    assert sorted(store.cids()) == sorted([v0, v1])
    assert store.get(v0) == store.get(v1) == data


def test_layout_is_sharded_by_next_to_last_characters(store: FsBlockStore) -> None:
    cid, data = block(b"layout")
    store.put(cid, data)
    name = block_name(cid)
    assert cid_of_name(name) == cid
    path = store.root / name[-3:-1] / f"{name}.data"
    assert path.read_bytes() == data
    assert store.block_path(cid) == path


def test_shards_spread(store: FsBlockStore) -> None:
    shards = {block_name(block(str(i).encode())[0])[-3:-1] for i in range(2000)}
    assert len(shards) > 700  # 1024 possible; a fixed prefix would give one


def test_cids_lists_every_block(store: FsBlockStore) -> None:
    blocks = dict(block(f"b{i}".encode()) for i in range(50))
    for cid, data in blocks.items():
        store.put(cid, data)
    assert set(store.cids()) == set(blocks)
    assert store.used_bytes() == sum(map(len, blocks.values()))


def test_accounting_persists_and_recounts(tmp_path: Path) -> None:
    with FsBlockStore(tmp_path / "vol") as first:
        for i in range(10):
            first.put(*block(b"x" * i + b"!"))
        used = first.used_bytes()
    assert used == sum(i + 1 for i in range(10))
    with FsBlockStore(tmp_path / "vol") as again:
        assert again.used_bytes() == used
        assert again.block_count() == 10
        # Drift (say, from a crash between a write and the counter update) is fixed by verify.
        again._write_usage(1, 1)
        assert again.verify() == []
        assert again.used_bytes() == used
        assert again.block_count() == 10


def test_missing_usage_file_is_rebuilt_by_a_scan(tmp_path: Path) -> None:
    with FsBlockStore(tmp_path / "vol") as first:
        first.put(*block(b"abc"))
    (tmp_path / "vol" / "blocks" / ".usage").unlink()
    with FsBlockStore(tmp_path / "vol") as again:
        assert again.used_bytes() == 3


def test_corrupt_block_raises_and_is_kept(store: FsBlockStore) -> None:
    cid, data = block(b"precious bytes")
    store.put(cid, data)
    path = store.block_path(cid)
    path.write_bytes(b"precious bytez")
    with pytest.raises(CorruptBlockError) as info:
        store.get(cid)
    assert to_str(cid) in str(info.value)
    assert str(path) in str(info.value)
    assert path.exists()  # reads never delete
    assert store.verify() == [cid]
    assert path.exists()
    assert store.verify(remove_corrupt=True) == [cid]
    assert not store.has(cid)
    assert store.used_bytes() == 0


def test_capacity_limit_raises_store_full(tmp_path: Path) -> None:
    with FsBlockStore(tmp_path / "vol", capacity=10) as store:
        assert store.put(*block(b"123456"))
        big_cid, big = block(b"abcdefgh")
        with pytest.raises(StoreFullError, match="vol") as info:
            store.put(big_cid, big)
        assert "capacity" in str(info.value)
        assert not store.has(big_cid)
        assert store.used_bytes() == 6
        assert store.free_bytes() == 4
        assert _temp_files(store) == []
        # A block that is already present is not refused by a full volume.
        assert store.put(*block(b"123456")) is False


def _temp_files(store: FsBlockStore) -> list[Path]:
    return [p for p in (store.root / ".tmp").rglob("*") if p.is_file() and p.suffix != ".lock"]


def test_enospc_from_write_leaves_nothing(
    store: FsBlockStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    def full(fd: int, data: object) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    cid, data = block(b"does not fit")
    monkeypatch.setattr(blockstore.os, "write", full)
    with pytest.raises(StoreFullError) as info:
        store.put(cid, data)
    monkeypatch.undo()
    assert str(store.path) in str(info.value)
    assert not store.has(cid)
    assert store.used_bytes() == 0
    assert _temp_files(store) == []
    assert store.put(cid, data)  # and the store still works


def test_enospc_part_way_through_a_write(
    store: FsBlockStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_write = os.write
    calls = 0

    def half_then_full(fd: int, data: memoryview) -> int:
        nonlocal calls
        calls += 1
        if calls == 1:
            return real_write(fd, data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    cid, data = block(b"x" * 4096)
    monkeypatch.setattr(blockstore.os, "write", half_then_full)
    with pytest.raises(StoreFullError):
        store.put(cid, data)
    monkeypatch.undo()
    assert not store.has(cid)
    assert _temp_files(store) == []


def test_other_write_errors_are_store_errors(
    store: FsBlockStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(fd: int, data: object) -> int:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(blockstore.os, "write", broken)
    with pytest.raises(StoreError, match="Input/output error"):
        store.put(*block(b"io"))


def test_concurrent_threads_writing_the_same_block(store: FsBlockStore) -> None:
    cid, data = block(os.urandom(64 * 1024))
    with ThreadPoolExecutor(8) as pool:
        added = list(pool.map(lambda _: store.put(cid, data), range(32)))
    assert added.count(True) == 1
    assert store.get(cid) == data
    assert store.used_bytes() == len(data)
    assert store.block_count() == 1


def _worker(path: str, payload: bytes, barrier: Any, results: Any) -> None:
    """One process: open the volume, wait for the others, then store the same block."""
    with FsBlockStore(Path(path)) as store:
        barrier.wait()
        results.put(store.put(*block(payload)))


def test_concurrent_processes_writing_the_same_block(tmp_path: Path) -> None:
    payload = os.urandom(256 * 1024)
    ctx = multiprocessing.get_context("spawn")
    workers = 4
    barrier = ctx.Barrier(workers)
    results = ctx.Queue()
    procs = [
        ctx.Process(target=_worker, args=(str(tmp_path / "vol"), payload, barrier, results))
        for _ in range(workers)
    ]
    for proc in procs:
        proc.start()
    outcomes = [results.get(timeout=120) for _ in procs]
    for proc in procs:
        proc.join(timeout=120)
        assert proc.exitcode == 0
    assert outcomes.count(True) == 1
    with FsBlockStore(tmp_path / "vol") as store:
        cid, data = block(payload)
        assert store.get(cid) == data
        assert store.used_bytes() == len(payload)
        assert store.block_count() == 1
        assert _temp_files(store) == []


def test_leftover_temp_files_are_ignored_and_cleaned(tmp_path: Path) -> None:
    with FsBlockStore(tmp_path / "vol") as store:
        cid, data = block(b"whole")
        store.put(cid, data)
    # What a crashed writer leaves: its directory with a half-written file, a lock nobody holds.
    dead = tmp_path / "vol" / "blocks" / ".tmp" / "deadbeef"
    dead.mkdir()
    (dead / "1-half").write_bytes(b"who")
    (dead.parent / "deadbeef.lock").touch()
    orphan = dead.parent / "orphan"  # a directory whose clean-up was interrupted
    orphan.mkdir()
    with FsBlockStore(tmp_path / "vol") as alive:
        assert set(alive.cids()) == {cid}
        with FsBlockStore(tmp_path / "vol") as other:  # must not touch a live writer's files
            assert alive._tmp.exists()
            assert other.get(cid) == data
        assert not dead.exists()
        assert not (dead.parent / "deadbeef.lock").exists()
        assert not orphan.exists()
        assert alive.put(*block(b"still writable"))


def test_staging_is_invisible_until_commit(store: FsBlockStore) -> None:
    cid, data = block(b"staged")
    with store.staging() as staging:
        assert staging.put(cid, data)
        assert staging.has(cid) and staging.get(cid) == data
        assert not store.has(cid)
        assert store.used_bytes() == 0
    assert not store.has(cid)  # aborted by leaving the block
    with store.staging() as staging:
        staging.put(cid, data)
        assert staging.commit() == [cid]
    assert store.get(cid) == data
    assert store.used_bytes() == len(data)
    assert _temp_files(store) == []


def test_staging_commit_rolls_back_when_the_volume_fills(tmp_path: Path) -> None:
    with FsBlockStore(tmp_path / "vol", capacity=20) as store:
        blocks = [block(bytes([i]) * 8) for i in range(3)]  # 24 bytes > 20
        with store.staging() as staging:
            for cid, data in blocks:
                staging.put(cid, data)
            with pytest.raises(StoreFullError):
                staging.commit()
        assert list(store.cids()) == []
        assert store.used_bytes() == 0


def test_free_bytes_is_bounded_by_the_disk(tmp_path: Path) -> None:
    with FsBlockStore(tmp_path / "vol") as store:
        st = os.statvfs(tmp_path)
        assert 0 < store.free_bytes() <= st.f_blocks * st.f_frsize


def test_fsync_policies(tmp_path: Path) -> None:
    for policy in ("none", "file", "full"):
        with FsBlockStore(tmp_path / policy, fsync=policy) as store:  # type: ignore[arg-type]
            cid, data = block(policy.encode())
            assert store.put(cid, data)
            assert store.get(cid) == data
            assert store.delete(cid)
    with pytest.raises(StoreError, match="fsync"):
        FsBlockStore(tmp_path / "x", fsync="always")  # type: ignore[arg-type]

"""CAR v1: writing, reading, and all-or-nothing import."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import dag_cbor
import pytest
from memstore import MemoryBlockStore
from multiformats import CID

from cim_place.errors import CarError
from cim_place.objectstore import dag
from cim_place.objectstore.blockstore import FsBlockStore
from cim_place.objectstore.car import encode_header, import_car, read_car, write_car
from cim_place.objectstore.cid import RAW, make_cid, varint
from cim_place.objectstore.testdata import chacha_stream
from cim_place.objectstore.unixfs import import_file, read_file

PROFILES = ["unixfs-v1-2025", "unixfs-v0-2015"]


def dag_of(size: int, profile: str, seed: str = "car") -> tuple[MemoryBlockStore, bytes, bytes]:
    """(blocks, root, file bytes) of a generated file."""
    content = chacha_stream(seed, size).read()
    blocks = MemoryBlockStore()
    root = import_file(io.BytesIO(content), blocks, profile).root
    return blocks, root, content


def car_bytes(blocks: MemoryBlockStore, roots: list[bytes]) -> bytes:
    out = io.BytesIO()
    written = write_car(blocks, roots, out)
    assert written == len(out.getvalue())
    return out.getvalue()


@pytest.fixture
def store(tmp_path: Path) -> Iterator[FsBlockStore]:
    with FsBlockStore(tmp_path / "vol") as opened:
        yield opened


def test_header_is_the_dag_cbor_of_the_spec() -> None:
    root = make_cid(RAW, b"x")
    header = encode_header([root])
    length, body = header[0], header[1:]
    assert length == len(body)
    assert dag_cbor.decode(body) == {"roots": [CID.decode(root)], "version": 1}
    # Map keys in DAG-CBOR canonical order: "roots" (5) before "version" (7).
    assert body.index(b"roots") < body.index(b"version")


@pytest.mark.parametrize("profile", PROFILES)
def test_round_trip(profile: str) -> None:
    blocks, root, content = dag_of(3 * 1024 * 1024 + 17, profile)
    data = car_bytes(blocks, [root])
    roots, sections = read_car(io.BytesIO(data))
    assert roots == [root]
    read = list(sections)
    assert read == list(dag.walk(blocks, root))  # walk order, each block once
    assert read[0][0] == root
    copy = MemoryBlockStore()
    for cid, block in read:
        copy.put(cid, block)
    assert b"".join(read_file(copy, root)) == content


def test_several_roots_share_blocks_once() -> None:
    blocks, first, _ = dag_of(300_000, "unixfs-v0-2015", "a")
    _, second, _ = dag_of(300_000, "unixfs-v0-2015", "a")  # same content: same DAG
    assert first == second
    other = MemoryBlockStore()
    third = import_file(io.BytesIO(b"another"), other, "unixfs-v0-2015").root
    for cid, block in other.blocks.items():
        blocks.put(cid, block)
    roots, sections = read_car(io.BytesIO(car_bytes(blocks, [first, third])))
    cids = [cid for cid, _ in sections]
    assert roots == [first, third]
    assert len(cids) == len(set(cids)) == len(blocks.blocks)


@pytest.mark.parametrize("profile", PROFILES)
def test_import_into_a_store(store: FsBlockStore, profile: str) -> None:
    blocks, root, content = dag_of(2 * 1024 * 1024 + 1, profile)
    result = import_car(io.BytesIO(car_bytes(blocks, [root])), store)
    assert result.roots == [root]
    assert result.blocks_read == result.blocks_added == len(blocks.blocks)
    assert result.dag_blocks == {root: len(blocks.blocks)}
    assert b"".join(read_file(store, root)) == content
    # Again: nothing new.
    again = import_car(io.BytesIO(car_bytes(blocks, [root])), store)
    assert again.blocks_added == 0
    assert store.block_count() == len(blocks.blocks)


def test_truncated_car_imports_nothing(store: FsBlockStore) -> None:
    blocks, root, _ = dag_of(600_000, "unixfs-v0-2015")
    data = car_bytes(blocks, [root])
    header_len = len(encode_header([root]))
    for cut in (1, header_len - 3, header_len + 1, header_len + 40, len(data) // 2, len(data) - 1):
        with pytest.raises(CarError, match=r"truncated at byte \d+"):
            import_car(io.BytesIO(data[:cut]), store)
        assert store.block_count() == 0
        assert list(store.cids()) == []


@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_one_flipped_byte_imports_nothing(store: FsBlockStore, where: str) -> None:
    blocks, root, _ = dag_of(3 * 1024 * 1024, "unixfs-v1-2025")
    data = bytearray(car_bytes(blocks, [root]))
    position = {"first": len(encode_header([root])) + 60, "middle": len(data) // 2}
    index = position.get(where, len(data) - 1)
    data[index] ^= 0x01
    with pytest.raises(CarError, match="at byte") as info:
        import_car(io.BytesIO(bytes(data)), store)
    assert "does not match" in str(info.value) or "garbage" in str(info.value)
    assert store.block_count() == 0
    assert list(store.cids()) == []


def test_missing_block_imports_nothing(store: FsBlockStore) -> None:
    blocks, root, _ = dag_of(3 * 1024 * 1024, "unixfs-v1-2025")
    out = io.BytesIO()
    out.write(encode_header([root]))
    for i, (cid, block) in enumerate(dag.walk(blocks, root)):
        if i == 2:
            continue  # leave one leaf out
        out.write(varint(len(cid) + len(block)) + cid + block)
    with pytest.raises(CarError, match="1 block\\(s\\) missing"):
        import_car(io.BytesIO(out.getvalue()), store)
    assert store.block_count() == 0


def test_missing_block_already_in_the_store_is_fine(store: FsBlockStore) -> None:
    blocks, root, content = dag_of(3 * 1024 * 1024, "unixfs-v1-2025")
    walked = list(dag.walk(blocks, root))
    store.put(*walked[2])
    out = io.BytesIO()
    out.write(encode_header([root]))
    for cid, block in walked[:2] + walked[3:]:
        out.write(varint(len(cid) + len(block)) + cid + block)
    result = import_car(io.BytesIO(out.getvalue()), store)
    assert result.blocks_added == len(walked) - 1
    assert b"".join(read_file(store, root)) == content


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "empty"),
        (b"\xff" * 12, "not a varint"),
        (varint(5) + b"hello", "not DAG-CBOR"),
        (varint(1 << 40), "garbage at byte 0"),
        (encode_header([make_cid(RAW, b"r")]) + varint(1 << 30), "garbage at byte"),
        (
            encode_header([make_cid(RAW, b"r")]) + varint(3) + b"\x07\x00\x00",
            "not start with a CID",
        ),
    ],
)
def test_garbage_is_a_clear_car_error(store: FsBlockStore, data: bytes, message: str) -> None:
    with pytest.raises(CarError, match=message):
        import_car(io.BytesIO(data), store)
    assert store.block_count() == 0


def test_not_version_1() -> None:
    body = dag_cbor.encode({"roots": [], "version": 2})
    with pytest.raises(CarError, match="CAR v1"):
        read_car(io.BytesIO(varint(len(body)) + body))


def test_no_roots_is_refused(store: FsBlockStore) -> None:
    with pytest.raises(CarError, match="no root"):
        import_car(io.BytesIO(encode_header([])), store)


def test_check_roots_runs_before_any_block(store: FsBlockStore) -> None:
    blocks, root, _ = dag_of(10_000, "unixfs-v1-2025")

    def refuse(roots: list[bytes]) -> None:
        raise CarError(f"refused {len(roots)}")

    with pytest.raises(CarError, match="refused 1"):
        import_car(io.BytesIO(car_bytes(blocks, [root])), store, check_roots=refuse)
    assert store.block_count() == 0

"""The UnixFS importer and exporter and DAG walking, on small profiles that make deep trees.

The layout is compared with a transcription of kubo's top-down balanced builder, so the
bottom-up importer is checked on every shape (full, partial, one link over a full level),
not only on the sizes the recorded vectors happen to cover.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from memstore import MemoryBlockStore

from cim_place.errors import BlockNotFoundError, CorruptBlockError, StoreError
from cim_place.objectstore import dagpb
from cim_place.objectstore.cid import DAG_PB, RAW, Cid, make_cid, to_str
from cim_place.objectstore.dag import missing, walk, walk_cids
from cim_place.objectstore.testdata import chacha_stream
from cim_place.objectstore.unixfs import (
    DEFAULT_PROFILE,
    PROFILES,
    ImportResult,
    Profile,
    file_size,
    get_profile,
    import_file,
    read_file,
)

SMALL = [
    Profile("tiny-v1", 1, True, 4, 3),
    Profile("tiny-v0", 0, False, 4, 3),
    Profile("tiny-v1-pb", 1, False, 5, 2),
    Profile("tiny-v0-raw", 0, True, 3, 4),
]


def _data(size: int, seed: str = "unixfs-test") -> bytes:
    return chacha_stream(seed, size).read()


def _import(data: bytes, profile: Profile | str) -> tuple[ImportResult, MemoryBlockStore]:
    store = MemoryBlockStore()
    return import_file(io.BytesIO(data), store, profile), store


def _read(store: MemoryBlockStore, root: Cid, offset: int = 0, length: int | None = None) -> bytes:
    return b"".join(read_file(store, root, offset, length))


# --- a transcription of kubo's balanced builder (boxo/ipld/unixfs/importer/balanced) --------


def _kubo_balanced(data: bytes, profile: Profile) -> Cid:
    chunks = [data[i : i + profile.chunk_size] for i in range(0, len(data), profile.chunk_size)]
    chunks.reverse()

    def leaf() -> tuple[Cid, int, int]:
        chunk = chunks.pop() if chunks else b""
        if profile.raw_leaves:
            return make_cid(RAW, chunk), len(chunk), len(chunk)
        fs = dagpb.UnixFSData(dagpb.UNIXFS_FILE, chunk or None, len(chunk))
        block = dagpb.encode_node(dagpb.PBNode(data=dagpb.encode_unixfs(fs)))
        return make_cid(DAG_PB, block, profile.cid_version), len(block), len(chunk)

    def fill(children: list[tuple[Cid, int, int]], depth: int) -> tuple[Cid, int, int]:
        while len(children) < profile.max_links and chunks:
            children.append(leaf() if depth == 1 else fill([], depth - 1))
        sizes = tuple(c[2] for c in children)
        fs = dagpb.UnixFSData(dagpb.UNIXFS_FILE, filesize=sum(sizes), blocksizes=sizes)
        links = tuple(dagpb.PBLink(c[0], "", c[1]) for c in children)
        block = dagpb.encode_node(dagpb.PBNode(links, dagpb.encode_unixfs(fs)))
        cid = make_cid(DAG_PB, block, profile.cid_version)
        return cid, len(block) + sum(c[1] for c in children), sum(sizes)

    root = leaf()
    depth = 1
    while chunks:
        root = fill([root], depth)
        depth += 1
    return root[0]


@pytest.mark.parametrize("profile", SMALL, ids=lambda p: p.name)
def test_layout_matches_kubo_balanced_builder(profile: Profile) -> None:
    data = _data(profile.chunk_size * (profile.max_links**3 + 2))
    for size in range(len(data) + 1):
        result, _ = _import(data[:size], profile)
        assert result.root == _kubo_balanced(data[:size], profile), size


@pytest.mark.parametrize("profile", SMALL, ids=lambda p: p.name)
def test_round_trip_and_accounting(profile: Profile) -> None:
    for size in (0, 1, profile.chunk_size, profile.chunk_size + 1, 97, 250):
        data = _data(size)
        result, store = _import(data, profile)
        assert result.size == size
        assert _read(store, result.root) == data
        assert file_size(store, result.root) == size
        blocks = list(walk(store, result.root))
        assert result.blocks == len(blocks) == len(store.blocks)
        assert result.dag_size == sum(len(block) for _, block in blocks)
        assert list(walk_cids(store, result.root)) == [cid for cid, _ in blocks]
        assert missing(store, result.root) == []


@settings(max_examples=200, deadline=None)
@given(
    size=st.integers(0, 200),
    offset=st.integers(0, 220),
    length=st.none() | st.integers(0, 220),
    profile=st.sampled_from(SMALL),
)
def test_byte_ranges(size: int, offset: int, length: int | None, profile: Profile) -> None:
    data = _data(size)
    result, store = _import(data, profile)
    end = None if length is None else offset + length
    assert _read(store, result.root, offset, length) == data[offset:end]


def test_range_reads_only_the_overlapping_subtrees() -> None:
    profile = SMALL[0]  # 4-byte chunks, 3 links: 300 bytes is 75 leaves, depth 4
    result, store = _import(_data(300), profile)
    store.gets = 0
    assert _read(store, result.root, 148, 4) == _data(300)[148:152]
    assert store.gets == 5  # root, three internal nodes, one leaf


def test_absent_leaves_outside_the_range_are_not_needed() -> None:
    data = _data(64)
    result, store = _import(data, SMALL[0])
    first_leaf = make_cid(RAW, data[:4])
    del store.blocks[first_leaf]
    assert _read(store, result.root, 4) == data[4:]
    with pytest.raises(BlockNotFoundError):
        _read(store, result.root)
    assert missing(store, result.root) == [first_leaf]


def test_offset_past_the_end_yields_nothing() -> None:
    result, store = _import(_data(100), SMALL[1])
    assert _read(store, result.root, 100) == b""
    assert _read(store, result.root, 10_000, 5) == b""


def test_negative_range_is_refused() -> None:
    result, store = _import(_data(10), SMALL[0])
    with pytest.raises(StoreError, match="offset"):
        read_file(store, result.root, -1)
    with pytest.raises(StoreError, match="length"):
        read_file(store, result.root, 0, -1)


def test_corrupt_block_is_never_returned() -> None:
    data = _data(40)
    result, store = _import(data, SMALL[1])
    leaf = next(cid for cid, block in walk(store, result.root) if data[8:12] in block)
    store.blocks[leaf] = store.blocks[leaf].replace(data[8:12], b"XXXX")
    with pytest.raises(CorruptBlockError, match=to_str(leaf)):
        _read(store, result.root)


def test_block_that_is_not_unixfs_names_the_cid() -> None:
    store = MemoryBlockStore()
    block = dagpb.encode_node(dagpb.PBNode(data=b"\xff\xff"))
    cid = make_cid(DAG_PB, block)
    store.put(cid, block)
    with pytest.raises(StoreError, match=to_str(cid)):
        _read(store, cid)
    store.put(cid := make_cid(DAG_PB, b"\x0a"), b"\x0a")
    with pytest.raises(StoreError, match=to_str(cid)):
        _read(store, cid)


def test_directory_is_not_a_file() -> None:
    store = MemoryBlockStore()
    block = dagpb.encode_node(
        dagpb.PBNode(data=dagpb.encode_unixfs(dagpb.UnixFSData(dagpb.UNIXFS_DIRECTORY)))
    )
    cid = make_cid(DAG_PB, block, 0)
    store.put(cid, block)
    with pytest.raises(StoreError, match="directory"):
        _read(store, cid)


def test_blocksizes_that_lie_are_refused() -> None:
    store = MemoryBlockStore()
    leaf = make_cid(RAW, b"abcd")
    store.put(leaf, b"abcd")
    fs = dagpb.UnixFSData(dagpb.UNIXFS_FILE, filesize=5, blocksizes=(5,))
    block = dagpb.encode_node(dagpb.PBNode((dagpb.PBLink(leaf, "", 4),), dagpb.encode_unixfs(fs)))
    root = make_cid(DAG_PB, block)
    store.put(root, block)
    with pytest.raises(StoreError, match="malformed"):
        _read(store, root)


class _Trickle(io.RawIOBase):
    """A stream that returns at most ``step`` bytes per read, like a slow pipe."""

    def __init__(self, data: bytes, step: int = 3) -> None:
        self._data = io.BytesIO(data)
        self._step = step

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        piece = self._data.read(min(self._step, len(buffer)))
        memoryview(buffer)[: len(piece)] = piece
        return len(piece)


class _ReadOnly:
    def __init__(self, data: bytes) -> None:
        self._data = io.BytesIO(data)

    def read(self, size: int = -1, /) -> bytes:
        return self._data.read(min(size, 5))


def test_short_reads_do_not_change_the_cid() -> None:
    data = _data(3 * 1024 * 1024 + 17)
    expected = import_file(io.BytesIO(data), None).root
    assert import_file(_ReadOnly(data[:1000]), None, SMALL[0]).root == (
        import_file(io.BytesIO(data[:1000]), None, SMALL[0]).root
    )
    assert import_file(_Trickle(data[:1000]), None, SMALL[1]).root == (
        import_file(io.BytesIO(data[:1000]), None, SMALL[1]).root
    )
    assert import_file(io.BufferedReader(_Trickle(data, 4099)), None).root == expected
    for sample, profile in ((data[:1000], SMALL[0]), (data[:1000], SMALL[1]), (data, "")):
        # With a sink, raw leaves are read into fresh bytes: the other way of joining reads.
        stored, store = _import(sample, profile or DEFAULT_PROFILE)
        trickled = MemoryBlockStore()
        stream = _Trickle(sample, 3 if profile else 4099)
        assert import_file(stream, trickled, profile or DEFAULT_PROFILE) == stored
        assert trickled.blocks == store.blocks


def test_sink_none_computes_the_same_root_and_progress_counts_bytes() -> None:
    data = _data(5 * 1024 * 1024 + 3)
    seen: list[int] = []
    for name in PROFILES:
        stored, _ = _import(data, name)
        seen.clear()
        counted = import_file(io.BytesIO(data), None, name, progress=seen.append)
        assert counted == stored
        assert sum(seen) == len(data)


def test_repeated_content_is_stored_once() -> None:
    data = bytes(4 * 30 + 2)  # 30 identical leaves and one short one
    result, store = _import(data, SMALL[0])
    assert result.blocks == len(store.blocks) == len(list(walk(store, result.root)))
    assert result.dag_size > store.used_bytes()  # Tsize counts every link
    assert _read(store, result.root) == data


def test_empty_file_v1_is_the_empty_raw_block() -> None:
    result, store = _import(b"", DEFAULT_PROFILE)
    # ipfs add --cid-version 1 --raw-leaves of an empty file gives the empty raw block.
    assert to_str(result.root) == "bafkreihdwdcefgh4dqkjv67uzcmw7ojee6xedzdetojuzjevtenxquvyku"
    assert (result.size, result.blocks, result.dag_size) == (0, 1, 0)
    assert _read(store, result.root) == b""
    assert file_size(store, result.root) == 0


def test_profiles() -> None:
    assert DEFAULT_PROFILE == "unixfs-v1-2025"
    v1, v0 = get_profile("unixfs-v1-2025"), get_profile("unixfs-v0-2015")
    assert (v1.cid_version, v1.raw_leaves, v1.chunk_size, v1.max_links) == (1, True, 1 << 20, 1024)
    assert (v0.cid_version, v0.raw_leaves, v0.chunk_size, v0.max_links) == (0, False, 262144, 174)
    with pytest.raises(StoreError, match="unixfs-v0-2015, unixfs-v1-2025"):
        get_profile("unixfs-v2")
    with pytest.raises(StoreError, match="max_links"):
        Profile("bad", 1, True, 1024, 1)


def test_walk_is_depth_first_root_first_without_repeats() -> None:
    store = MemoryBlockStore()
    leaves = [make_cid(RAW, bytes([i])) for i in range(3)]
    for i, leaf in enumerate(leaves):
        store.put(leaf, bytes([i]))

    def node(*children: Cid) -> Cid:
        links = tuple(dagpb.PBLink(child, "", 1) for child in children)
        block = dagpb.encode_node(dagpb.PBNode(links, b"\x08\x02"))
        cid = make_cid(DAG_PB, block)
        store.put(cid, block)
        return cid

    left = node(leaves[0], leaves[1])
    right = node(leaves[1], leaves[2])
    root = node(left, right, leaves[0])
    order = [root, left, leaves[0], leaves[1], right, leaves[2]]
    assert [cid for cid, _ in walk(store, root)] == order
    assert list(walk_cids(store, root)) == order
    del store.blocks[leaves[2]]
    assert list(walk_cids(store, root)) == order  # raw blocks are named, not read
    store.put(leaves[2], bytes([2]))
    del store.blocks[right]
    del store.blocks[leaves[0]]
    assert missing(store, root) == [leaves[0], right]


def test_walk_refuses_unknown_codecs() -> None:
    store = MemoryBlockStore()
    cid = make_cid(0x71, b"\xa0")
    store.put(cid, b"\xa0")
    with pytest.raises(StoreError, match=to_str(cid)):
        list(walk(store, cid))


def _chunks(data: bytes, size: int) -> Iterator[bytes]:
    return (data[i : i + size] for i in range(0, len(data), size))


def test_export_of_a_kubo_sized_file_streams_its_leaves() -> None:
    data = _data(3 * 262144 + 5)
    for name in PROFILES:
        result, store = _import(data, name)
        pieces = list(read_file(store, result.root))
        assert b"".join(pieces) == data
        assert hashlib.sha256(b"".join(pieces)).digest() == hashlib.sha256(data).digest()
        chunk = get_profile(name).chunk_size
        assert [len(p) for p in pieces] == [len(c) for c in _chunks(data, chunk)]


def _put_pb(store: MemoryBlockStore, links: tuple[dagpb.PBLink, ...], unixfs: bytes) -> Cid:
    block = dagpb.encode_node(dagpb.PBNode(links, unixfs))
    cid = make_cid(DAG_PB, block, 0)
    store.put(cid, block)
    return cid


@pytest.mark.parametrize(
    ("unixfs", "expected"),
    [
        (b"\x08\x02\x12\x03abc\x18\x03", b"abc"),  # as importers write a leaf
        (b"\x08\x02\x12\x03abc", b"abc"),  # no filesize
        (b"\x08\x00\x12\x03abc", b"abc"),  # UnixFS Raw
        (b"\x08\x02\x12\x03abc\x18\x03\x38\xa4\x03", b"abc"),  # with a mode: general decoder
        (b"\x08\x02\x18\x00", b""),  # empty file, no Data
    ],
)
def test_leaf_shapes(unixfs: bytes, expected: bytes) -> None:
    store = MemoryBlockStore()
    cid = _put_pb(store, (), unixfs)
    assert _read(store, cid) == expected
    assert file_size(store, cid) == len(expected)


def test_leaf_whose_filesize_lies_is_refused() -> None:
    store = MemoryBlockStore()
    cid = _put_pb(store, (), b"\x08\x02\x12\x03abc\x18\x04")
    with pytest.raises(StoreError, match="malformed"):
        _read(store, cid)


def test_packed_blocksizes_are_read() -> None:
    store = MemoryBlockStore()
    leaves = [make_cid(RAW, b"abc"), make_cid(RAW, b"de")]
    store.put(leaves[0], b"abc")
    store.put(leaves[1], b"de")
    links = tuple(dagpb.PBLink(leaf, "", 3) for leaf in leaves)
    root = _put_pb(store, links, b"\x08\x02\x18\x05\x22\x02\x03\x02")
    assert _read(store, root) == b"abcde"
    assert _read(store, root, 2, 2) == b"cd"


def test_generated_data_is_the_same_however_it_is_read() -> None:
    whole = chacha_stream("s", 3_000_001).read()
    assert len(whole) == 3_000_001
    stream = chacha_stream("s", 3_000_001)
    pieces = []
    while piece := stream.read(777_777):
        pieces.append(piece)
    assert b"".join(pieces) == whole
    stream = chacha_stream("s", 3_000_001)
    buffer = bytearray(2_500_000)
    assert stream.readinto(buffer) == len(buffer)
    assert bytes(buffer) == whole[: len(buffer)]
    assert stream.remaining == 500_001
    assert stream.read() == whole[len(buffer) :]
    assert chacha_stream("s", 0).read() == b""

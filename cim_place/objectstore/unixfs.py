"""UnixFS files: the import profiles, the importer (bytes -> DAG) and the exporter (DAG -> bytes).

Root CIDs are byte-identical to what kubo computes for the same bytes and profile, checked
against kubo's recorded vectors (``tests/test_vectors.py``). The layout is kubo's *balanced*
layout: fixed-size chunks become leaves, all at the same depth, and internal nodes (dag-pb
UnixFS ``File`` with ``filesize`` and ``blocksizes``) are filled left to right with at most
``max_links`` links. The importer builds it bottom-up with one list of pending links per level,
so it streams with one reused chunk buffer and at most ``depth x max_links`` pending links. The
one thing that grows with the file is the set of CIDs seen, needed to count distinct blocks and
to store a repeated block once: about 100 bytes per chunk (10 MB for a 100 GB file under the
default profile, 40 MB under unixfs-v0-2015).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

from cim_place.errors import StoreError
from cim_place.interfaces import BlockSink, BlockSource
from cim_place.objectstore import dagpb
from cim_place.objectstore.cid import (
    DAG_PB,
    RAW,
    Cid,
    cid_of_digest,
    codec_of,
    make_cid,
    read_varint,
    to_str,
    varint,
)


@dataclass(frozen=True, slots=True)
class Profile:
    """How a file is cut into a DAG. Two profiles give two different CIDs for the same bytes."""

    name: str
    cid_version: int
    raw_leaves: bool
    """Leaves are raw blocks (codec 0x55, always CIDv1) instead of dag-pb UnixFS File nodes."""
    chunk_size: int
    max_links: int

    def __post_init__(self) -> None:
        if self.cid_version not in (0, 1):
            raise StoreError(f"profile {self.name!r}: cid_version must be 0 or 1")
        if self.chunk_size < 1:
            raise StoreError(f"profile {self.name!r}: chunk_size must be at least 1 byte")
        if self.max_links < 2:
            raise StoreError(f"profile {self.name!r}: max_links must be at least 2")


PROFILES: dict[str, Profile] = {
    # IPIP-499 "unixfs-v1-2025": what current IPFS implementations agree on.
    "unixfs-v1-2025": Profile("unixfs-v1-2025", 1, True, 1 << 20, 1024),
    # kubo's historic default, still what `ipfs add` without flags gives (Qm... CIDs).
    "unixfs-v0-2015": Profile("unixfs-v0-2015", 0, False, 256 << 10, 174),
}
DEFAULT_PROFILE: str = "unixfs-v1-2025"


def get_profile(name: str) -> Profile:
    """The profile called ``name``; raises StoreError listing the known ones."""
    try:
        return PROFILES[name]
    except KeyError:
        known = ", ".join(sorted(PROFILES))
        raise StoreError(f"unknown UnixFS profile {name!r}; known profiles: {known}") from None


@dataclass(frozen=True, slots=True)
class ImportResult:
    root: Cid
    size: int
    """File bytes."""
    blocks: int
    """Distinct blocks in the DAG (leaves and internal nodes)."""
    dag_size: int
    """Total bytes of all blocks, counted once per link (the cumulative Tsize of the root)."""


class Readable(Protocol):
    """What the importer needs of a file object (``readinto`` is used when present)."""

    def read(self, size: int = -1, /) -> bytes: ...


# A pending link of the layout: (cid, tsize = serialized subtree bytes, file bytes below it).
_Link = tuple[Cid, int, int]


class _Layout:
    """The balanced layout, built bottom-up: ``levels[i]`` holds the links waiting for a parent
    at height i + 1. A level is turned into a parent as soon as it is full, which gives the
    same tree as kubo's top-down fill (every subtree is complete before the next starts)."""

    def __init__(self, profile: Profile, sink: BlockSink | None) -> None:
        self.profile = profile
        self.sink = sink
        self.levels: list[list[_Link]] = [[]]
        self.seen: set[Cid] = set()
        """Every CID emitted, to count distinct blocks and skip storing a repeated one."""

    def emit(self, cid: Cid, block: bytes | None) -> None:
        if cid in self.seen:
            return
        self.seen.add(cid)
        if self.sink is not None and block is not None:
            self.sink.put(cid, block)

    def add(self, link: _Link, level: int = 0) -> None:
        pending = self.levels[level]
        pending.append(link)
        if len(pending) >= self.profile.max_links:
            self.levels[level] = []
            if level + 1 == len(self.levels):
                self.levels.append([])
            self.add(self._parent(pending), level + 1)

    def _parent(self, children: list[_Link]) -> _Link:
        filesize = sum(child[2] for child in children)
        data = dagpb.encode_unixfs(
            dagpb.UnixFSData(
                dagpb.UNIXFS_FILE,
                filesize=filesize,
                blocksizes=tuple(child[2] for child in children),
            )
        )
        # kubo writes the empty link name explicitly (Name ""), and the vectors depend on it.
        links = tuple(dagpb.PBLink(child[0], "", child[1]) for child in children)
        block = dagpb.encode_node(dagpb.PBNode(links, data))
        cid = make_cid(DAG_PB, block, self.profile.cid_version)
        self.emit(cid, block)
        return cid, len(block) + sum(child[1] for child in children), filesize

    def finish(self) -> _Link:
        """Fold the partial levels upwards; the one link left at the top is the root."""
        level = 0
        while True:
            pending = self.levels[level]
            if level + 1 == len(self.levels):
                if len(pending) == 1:
                    return pending[0]
                self.levels.append([])
            if pending:
                self.levels[level] = []
                self.levels[level + 1].append(self._parent(pending))
            level += 1


class _LeafCoder:
    """Hashes (and, for a sink, serialises) one chunk as a leaf block of a profile."""

    def __init__(self, profile: Profile) -> None:
        self.raw = profile.raw_leaves
        self.version = profile.cid_version
        self.full_size = profile.chunk_size
        self.full_framing = self._framing(profile.chunk_size)

    def _framing(self, size: int) -> tuple[bytes, bytes]:
        """The bytes around a chunk in a dag-pb leaf: PBNode{Data: UnixFS{File, Data, filesize}}."""
        inner = b"\x08\x02\x12" + varint(size)
        tail = b"\x18" + varint(size)
        head = b"\x0a" + varint(len(inner) + size + len(tail)) + inner
        return head, tail

    def leaf(self, chunk: bytes | memoryview, keep: bool) -> tuple[Cid, int, bytes | None]:
        """(cid, serialized size, block bytes if ``keep``) of the leaf holding ``chunk``."""
        if self.raw:
            # Raw blocks only exist as CIDv1, even under a CIDv0 root (as kubo does).
            cid = make_cid(RAW, chunk)
            if not keep:
                return cid, len(chunk), None
            return cid, len(chunk), chunk if isinstance(chunk, bytes) else bytes(chunk)
        size = len(chunk)
        head, tail = self.full_framing if size == self.full_size else self._framing(size)
        hasher = hashlib.sha256(head)
        hasher.update(chunk)
        hasher.update(tail)
        cid = cid_of_digest(DAG_PB, hasher.digest(), self.version)
        block = b"".join((head, chunk, tail)) if keep else None
        return cid, len(head) + len(chunk) + len(tail), block

    def empty(self) -> tuple[Cid, int, bytes]:
        """The block of an empty file: an empty raw block, or a File node with filesize 0."""
        if self.raw:
            return make_cid(RAW, b""), 0, b""
        block = dagpb.encode_node(
            dagpb.PBNode(data=dagpb.encode_unixfs(dagpb.UnixFSData(dagpb.UNIXFS_FILE, filesize=0)))
        )
        return make_cid(DAG_PB, block, self.version), len(block), block


def _chunks(stream: Readable, size: int, fresh: bool) -> Iterator[bytes | memoryview]:
    """The stream cut in ``size``-byte chunks, the last one shorter (never empty).

    Short reads (pipes, sockets) are joined, or the CIDs would depend on how the bytes arrived.
    With ``fresh`` each chunk is a new bytes object read straight into (a raw leaf that is stored
    needs its own bytes, and this saves a copy); otherwise chunks are views of one reused buffer,
    valid until the next chunk is taken.
    """
    readinto = getattr(stream, "readinto", None)
    if fresh or readinto is None:
        while True:
            chunk = stream.read(size)
            if 0 < len(chunk) < size:
                parts = [chunk]
                filled = len(chunk)
                while filled < size and (more := stream.read(size - filled)):
                    parts.append(more)
                    filled += len(more)
                chunk = b"".join(parts)
            if chunk:
                yield chunk
            if len(chunk) < size:
                return
    buffer = bytearray(size)
    view = memoryview(buffer)
    while True:
        filled = 0
        while filled < size and (n := readinto(view[filled:])):
            filled += n
        if filled:
            yield view[:filled]
        if filled < size:
            return


def import_file(
    stream: Readable,
    sink: BlockSink | None,
    profile: Profile | str = DEFAULT_PROFILE,
    *,
    progress: Callable[[int], None] | None = None,
) -> ImportResult:
    """Chunk ``stream`` into a UnixFS DAG, put every block into ``sink`` (None: only compute
    the root CID) and return the root.

    Reads the stream to its end, one chunk at a time: with ``readinto`` into a reused buffer
    when the stream has it, or straight into fresh bytes when raw leaves go to a sink (they are
    stored as read). Short reads are joined, so the CID never depends on how bytes arrived. Each
    block is hashed once and put once, children before parents, so a sink that fails part-way
    holds no block that links to a missing one. ``progress(n)`` gets the bytes of each chunk.
    """
    if isinstance(profile, str):
        profile = get_profile(profile)
    layout = _Layout(profile, sink)
    coder = _LeafCoder(profile)
    keep = sink is not None
    size = 0
    for chunk in _chunks(stream, profile.chunk_size, keep and profile.raw_leaves):
        cid, tsize, block = coder.leaf(chunk, keep)
        layout.emit(cid, block)
        layout.add((cid, tsize, len(chunk)))
        size += len(chunk)
        if progress is not None:
            progress(len(chunk))
    if size == 0:
        cid, tsize, block = coder.empty()
        layout.emit(cid, block)
        return ImportResult(cid, 0, 1, tsize)
    root, dag_size, _ = layout.finish()
    return ImportResult(root, size, len(layout.seen), dag_size)


# --- export -------------------------------------------------------------------------------


def _leaf_data(block: bytes) -> bytes | None:
    """The file bytes of a dag-pb leaf as importers write it (``PBNode{Data: UnixFS{Type File
    or Raw, Data, filesize?}}``, no links), copied once; None for any other shape, which the
    general decoder then handles. Leaves are nearly every block of a v0 file, and the general
    decoder copies their data twice."""
    try:
        if block[0] != 0x0A:
            return None
        length, pos = read_varint(block, 1)
        end = len(block)
        if pos + length != end or block[pos] != 0x08 or block[pos + 1] not in (0, 2):
            return None
        if block[pos + 2] != 0x12:
            return None
        size, start = read_varint(block, pos + 3)
        stop = start + size
        if stop > end:
            return None
        if stop < end:
            if block[stop] != 0x18:
                return None
            filesize, after = read_varint(block, stop + 1)
            if filesize != size or after != end:
                return None
        return block[start:stop]
    except (IndexError, ValueError):
        return None


def _file_node(cid: Cid, block: bytes) -> tuple[bytes, tuple[Cid, ...], tuple[int, ...]]:
    """(inline data, child CIDs, child file sizes) of a UnixFS file block; StoreError otherwise."""
    codec = codec_of(cid)
    if codec == RAW:
        return block, (), ()
    if codec != DAG_PB:
        raise StoreError(
            f"block {to_str(cid)} has codec 0x{codec:x}: not a UnixFS file (expected dag-pb or raw)"
        )
    leaf = _leaf_data(block)
    if leaf is not None:
        return leaf, (), ()
    try:
        node = dagpb.decode_node(block)
        if node.data is None:
            raise ValueError("dag-pb node without UnixFS data")
        fs = dagpb.decode_unixfs(node.data)
    except ValueError as exc:
        raise StoreError(f"block {to_str(cid)} is not a UnixFS node ({exc})") from None
    if fs.type not in (dagpb.UNIXFS_FILE, dagpb.UNIXFS_RAW):
        kind = {dagpb.UNIXFS_DIRECTORY: "a directory", dagpb.UNIXFS_HAMT_SHARD: "a directory"}
        what = kind.get(fs.type, f"UnixFS type {fs.type}")
        raise StoreError(f"{to_str(cid)} is {what}, not a file; give the CID of a file")
    if len(fs.blocksizes) != len(node.links):
        raise StoreError(
            f"block {to_str(cid)} is a malformed UnixFS file: {len(node.links)} links but "
            f"{len(fs.blocksizes)} blocksizes"
        )
    data = fs.data or b""
    if fs.filesize is not None and fs.filesize != len(data) + sum(fs.blocksizes):
        raise StoreError(
            f"block {to_str(cid)} is a malformed UnixFS file: filesize {fs.filesize} is not "
            f"the sum of its data and blocksizes"
        )
    return data, tuple(link.hash for link in node.links), fs.blocksizes


def file_size(source: BlockSource, root: Cid) -> int:
    """The file bytes below ``root``, from the root block alone."""
    data, _, sizes = _file_node(root, source.get(root))
    return len(data) + sum(sizes)


def read_file(
    source: BlockSource, root: Cid, offset: int = 0, length: int | None = None
) -> Iterator[bytes]:
    """The file bytes of ``root`` (all, or ``[offset, offset + length)``), streamed.

    Only the subtrees that overlap the range are read; every block comes through
    ``source.get``, which verifies it. An offset past the end yields nothing.
    """
    if offset < 0 or (length is not None and length < 0):
        raise StoreError(f"invalid byte range offset={offset} length={length}: both must be >= 0")
    end = None if length is None else offset + length
    return _read_range(source, root, offset, end, None)


def _read_range(
    source: BlockSource, cid: Cid, start: int, end: int | None, expected: int | None
) -> Iterator[bytes]:
    """Yield bytes [start, end) of the subtree ``cid`` (offsets relative to the subtree)."""
    if end is not None and start >= end:
        return
    block = source.get(cid)
    data, children, sizes = _file_node(cid, block)
    total = len(data) + sum(sizes)
    if expected is not None and total != expected:
        raise StoreError(
            f"block {to_str(cid)} holds {total} file bytes but its parent says {expected}: "
            "the DAG is malformed"
        )
    if data and start < len(data):
        stop = len(data) if end is None else min(end, len(data))
        yield data if (start == 0 and stop == len(data)) else data[start:stop]
    pos = len(data)
    for child, size in zip(children, sizes, strict=True):
        if end is not None and pos >= end:
            break
        if pos + size > start:
            child_end = None if end is None or end >= pos + size else end - pos
            yield from _read_range(source, child, max(start - pos, 0), child_end, size)
        pos += size

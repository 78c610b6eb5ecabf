"""What the gateway reads from a DAG: path resolution, file bytes, CAR streams (synchronous).

Everything here reads blocks through a ``BlockSource`` whose ``get`` verifies (a local volume,
or the domain source that waits for verified blocks to arrive), so no unverified byte can reach
a response. These functions block on disk and network: the gateway runs them in worker
threads and passes what they yield to the event loop.

UnixFS directories are walked (a plain dag-pb ``Directory``); HAMT-sharded directories are not
supported: a path through one is refused with :class:`Unsupported`.
"""

from __future__ import annotations

import mimetypes
from collections.abc import Iterator
from dataclasses import dataclass
from urllib.parse import quote

from cim_place.errors import CimPlaceError
from cim_place.interfaces import BlockSource
from cim_place.objectstore import dagpb
from cim_place.objectstore.car import encode_header
from cim_place.objectstore.cid import DAG_PB, RAW, Cid, codec_of, to_str, varint
from cim_place.objectstore.unixfs import read_file

SNIFF_BYTES = 512
KIND_FILE = "file"
KIND_DIRECTORY = "directory"
KIND_OTHER = "other"


class NoSuchPath(CimPlaceError):
    """A path segment names no entry of its directory (answered with 404)."""


class Unsupported(CimPlaceError):
    """Content the gateway cannot present in the asked form (answered with 501 or 400)."""


@dataclass(frozen=True, slots=True)
class Entry:
    """The content a path ends at."""

    cid: Cid
    kind: str
    """``file``, ``directory`` or ``other`` (a block of a codec the gateway only serves raw)."""
    size: int
    """File bytes for a file; 0 otherwise."""
    name: str
    """The last path segment ("" for a bare CID), for the content type."""
    path_blocks: tuple[Cid, ...]
    """The blocks read to resolve the path, before the terminal one (CAR responses send them)."""
    block: bytes = b""
    """The terminal block (read and verified to resolve the path)."""
    inline: bytes | None = None
    """The whole file when it is that one block (no second read for a small file)."""


@dataclass(frozen=True, slots=True)
class _Node:
    kind: str
    size: int
    links: tuple[dagpb.PBLink, ...]
    data: bytes
    blocksizes: tuple[int, ...]


def _node(cid: Cid, block: bytes) -> _Node:
    codec = codec_of(cid)
    if codec == RAW:
        return _Node(KIND_FILE, len(block), (), block, ())
    if codec != DAG_PB:
        return _Node(KIND_OTHER, 0, (), b"", ())
    try:
        node = dagpb.decode_node(block)
        fs = dagpb.decode_unixfs(node.data) if node.data is not None else None
    except ValueError:
        return _Node(KIND_OTHER, 0, (), b"", ())
    if fs is None:
        return _Node(KIND_OTHER, 0, node.links, b"", ())
    if fs.type in (dagpb.UNIXFS_FILE, dagpb.UNIXFS_RAW):
        data = fs.data or b""
        return _Node(KIND_FILE, len(data) + sum(fs.blocksizes), node.links, data, fs.blocksizes)
    if fs.type == dagpb.UNIXFS_DIRECTORY:
        return _Node(KIND_DIRECTORY, 0, node.links, b"", ())
    if fs.type == dagpb.UNIXFS_HAMT_SHARD:
        raise Unsupported(
            f"{to_str(cid)} is a HAMT-sharded directory, which this gateway does not read; "
            "ask for it with ?format=raw or ?format=car&dag-scope=block"
        )
    return _Node(KIND_OTHER, 0, node.links, b"", ())


def resolve(source: BlockSource, root: Cid, segments: tuple[str, ...]) -> Entry:
    """Follow ``segments`` from ``root`` through UnixFS directories to the terminal entry."""
    cid = root
    path_blocks: list[Cid] = []
    walked: list[str] = []
    for segment in segments:
        node = _node(cid, source.get(cid))
        if node.kind != KIND_DIRECTORY:
            where = "/".join(walked) or to_str(root)
            raise NoSuchPath(f"{where} is not a directory, so it has no entry {segment!r}")
        match = [link.hash for link in node.links if link.name == segment]
        if not match:
            raise NoSuchPath(f"no entry {segment!r} in {'/'.join(walked) or to_str(root)}")
        path_blocks.append(cid)
        walked.append(segment)
        cid = match[0]
    block = source.get(cid)
    terminal = _node(cid, block)
    inline = terminal.data if terminal.kind == KIND_FILE and not terminal.links else None
    return Entry(
        cid, terminal.kind, terminal.size, _last(segments), tuple(path_blocks), block, inline
    )


def _last(segments: tuple[str, ...]) -> str:
    return segments[-1] if segments else ""


def file_chunks(source: BlockSource, cid: Cid, first: int, last: int) -> Iterator[bytes]:
    """Bytes [first, last] (inclusive) of the file ``cid``, a block's worth at a time."""
    if last < first:
        return iter(())
    return read_file(source, cid, first, last - first + 1)


def directory_listing(source: BlockSource, entry: Entry, path: str) -> bytes:
    """A small HTML listing of a directory (the path gateway's answer without index.html)."""
    node = _node(entry.cid, source.get(entry.cid))
    rows = []
    for link in node.links:
        name = _html(link.name or to_str(link.hash))
        href = _html(path.rstrip("/") + "/" + (link.name or ""))
        rows.append(f'<li><a href="{href}">{name}</a> {link.tsize or 0} bytes</li>')
    body = (
        f"<!DOCTYPE html><html><head><meta charset=utf-8><title>{_html(path)}</title></head>"
        f"<body><h1>{_html(path)}</h1><ul>{''.join(rows)}</ul></body></html>"
    )
    return body.encode()


def _html(text: str) -> str:
    return (
        text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")
    )


def index_of(source: BlockSource, entry: Entry) -> Cid | None:
    """The ``index.html`` entry of a directory, if it has one."""
    node = _node(entry.cid, source.get(entry.cid))
    for link in node.links:
        if link.name == "index.html":
            return link.hash
    return None


# -- content type --------------------------------------------------------------------------------

_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"GIF87a", "image/gif"),
    (b"GIF89a", "image/gif"),
    (b"%PDF-", "application/pdf"),
    (b"PK\x03\x04", "application/zip"),
    (b"\x1f\x8b", "application/gzip"),
    (b"\x00asm", "application/wasm"),
    (b"OggS", "audio/ogg"),
    (b"ID3", "audio/mpeg"),
)


def type_by_name(name: str) -> str | None:
    """The content type a file name's extension says, if it says one."""
    if not name or "." not in name:
        return None
    guessed, _ = mimetypes.guess_type(name, strict=False)
    if guessed is None:
        return None
    return f"{guessed}; charset=utf-8" if guessed.startswith("text/") else guessed


def disposition(filename: str, *, attachment: bool) -> str:
    """A ``Content-Disposition`` naming ``filename`` (ASCII fallback and RFC 5987 UTF-8)."""
    plain = "".join(c if 0x20 <= ord(c) < 0x7F and c not in '"\\' else "_" for c in filename)
    kind = "attachment" if attachment else "inline"
    return f"{kind}; filename=\"{plain}\"; filename*=UTF-8''{quote(filename, safe='')}"


def content_type(name: str, head: bytes) -> str:
    """From the file name's extension, else sniffed from the first bytes."""
    by_name = type_by_name(name)
    if by_name is not None:
        return by_name
    for magic, kind in _MAGIC:
        if head.startswith(magic):
            return kind
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image/webp"
    if head[4:8] == b"ftyp":
        return "video/mp4"
    lowered = head.lstrip()[:64].lower()
    if lowered.startswith((b"<!doctype html", b"<html")):
        return "text/html; charset=utf-8"
    if lowered.startswith(b"<svg") or (lowered.startswith(b"<?xml") and b"<svg" in head):
        return "image/svg+xml"
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as exc:
        # A multi-byte character cut at the sniffed length is still text.
        if exc.start < len(head) - 3 or exc.reason != "unexpected end of data":
            return "application/octet-stream"
    if any(byte < 0x09 or 0x0D < byte < 0x20 for byte in head if byte != 0x1B):
        return "application/octet-stream"
    return "text/plain; charset=utf-8"


# -- CAR -----------------------------------------------------------------------------------------


def _section(cid: Cid, block: bytes) -> bytes:
    return varint(len(cid) + len(block)) + cid


def car_chunks(
    source: BlockSource,
    root: Cid,
    entry: Entry,
    scope: str,
    byte_range: tuple[int, int] | None,
) -> Iterator[bytes]:
    """A CAR v1 (header root: ``root``, the path's CID) holding the path's blocks, then the
    terminal entry's blocks by ``scope`` (``all``: its whole DAG; ``entity``: a file's DAG,
    only the part covering ``byte_range`` if given, or a directory's own block; ``block``: the
    terminal block). Depth first, each block once (``order=dfs; dups=n``)."""
    yield encode_header([root])
    seen: set[Cid] = set()
    for cid in entry.path_blocks:
        seen.add(cid)
        block = source.get(cid)
        yield _section(cid, block)
        yield block
    for cid, block in _scoped(source, entry, scope, byte_range):
        if cid in seen:
            continue
        seen.add(cid)
        yield _section(cid, block)
        yield block


def _scoped(
    source: BlockSource, entry: Entry, scope: str, byte_range: tuple[int, int] | None
) -> Iterator[tuple[Cid, bytes]]:
    if scope == "block" or (scope == "entity" and entry.kind != KIND_FILE):
        yield entry.cid, source.get(entry.cid)
        return
    if scope == "entity" and byte_range is not None:
        yield from _file_range_blocks(source, entry.cid, 0, byte_range[0], byte_range[1])
        return
    yield from _walk_all(source, entry.cid)


def _walk_all(source: BlockSource, root: Cid) -> Iterator[tuple[Cid, bytes]]:
    """Depth first, every block once; links of blocks other than dag-pb are not followed."""
    seen: set[Cid] = set()
    stack = [root]
    while stack:
        cid = stack.pop()
        if cid in seen:
            continue
        seen.add(cid)
        block = source.get(cid)
        yield cid, block
        if codec_of(cid) == DAG_PB:
            try:
                links = dagpb.decode_node(block).links
            except ValueError:
                continue
            stack.extend(reversed([link.hash for link in links]))


def _file_range_blocks(
    source: BlockSource, cid: Cid, offset: int, first: int, last: int
) -> Iterator[tuple[Cid, bytes]]:
    """The blocks of a file subtree (starting at file offset ``offset``) needed to read bytes
    [first, last]: each node on the way, and only the children that overlap the range."""
    block = source.get(cid)
    yield cid, block
    node = _node(cid, block)
    if node.kind != KIND_FILE or not node.links:
        return
    position = offset + len(node.data)
    for link, size in zip(node.links, node.blocksizes, strict=False):
        if position > last:
            return
        if position + size > first:
            yield from _file_range_blocks(source, link.hash, position, first, last)
        position += size

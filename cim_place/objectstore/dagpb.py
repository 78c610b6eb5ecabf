"""dag-pb nodes and the UnixFS ``Data`` message, encoded by hand.

The encoding follows the dag-pb spec byte for byte (links before data, fields in canonical order),
so that CIDs match what IPFS computes. Only what cim-place needs is implemented: files (Type File
and Raw) and enough of directories to walk a DAG someone else made.

    PBLink  { 1: Hash bytes, 2: Name string, 3: Tsize uint64 }
    PBNode  { 2: Links repeated PBLink, 1: Data bytes }       # links are written first
    UnixFS  { 1: Type enum, 2: Data bytes, 3: filesize uint64, 4: blocksizes repeated uint64 }
"""

from __future__ import annotations

from dataclasses import dataclass, field

from cim_place.objectstore.cid import DAG_PB, RAW, Cid, read_varint, varint

UNIXFS_RAW = 0
UNIXFS_DIRECTORY = 1
UNIXFS_FILE = 2
UNIXFS_METADATA = 3
UNIXFS_SYMLINK = 4
UNIXFS_HAMT_SHARD = 5


@dataclass(frozen=True, slots=True)
class PBLink:
    hash: Cid
    name: str | None = ""
    """None leaves the field out; "" writes an empty name, as the IPFS file importers do."""
    tsize: int | None = None


@dataclass(frozen=True, slots=True)
class PBNode:
    links: tuple[PBLink, ...] = ()
    data: bytes | None = None


@dataclass(frozen=True, slots=True)
class UnixFSData:
    type: int
    data: bytes | None = None
    filesize: int | None = None
    blocksizes: tuple[int, ...] = field(default=())


def _bytes_field(number: int, value: bytes) -> bytes:
    return varint(number << 3 | 2) + varint(len(value)) + value


def _varint_field(number: int, value: int) -> bytes:
    return varint(number << 3) + varint(value)


def encode_link(link: PBLink) -> bytes:
    out = _bytes_field(1, link.hash)
    if link.name is not None:
        out += _bytes_field(2, link.name.encode("utf-8"))
    if link.tsize is not None:
        out += _varint_field(3, link.tsize)
    return out


def encode_node(node: PBNode) -> bytes:
    parts = [_bytes_field(2, encode_link(link)) for link in node.links]
    if node.data is not None:
        parts.append(_bytes_field(1, node.data))
    return b"".join(parts)


def encode_unixfs(msg: UnixFSData) -> bytes:
    out = _varint_field(1, msg.type)
    if msg.data is not None:
        out += _bytes_field(2, msg.data)
    if msg.filesize is not None:
        out += _varint_field(3, msg.filesize)
    for size in msg.blocksizes:
        out += _varint_field(4, size)
    return out


def _fields(buf: bytes | memoryview) -> list[tuple[int, int, int | bytes]]:
    """(field number, wire type, value) of every field; raises ValueError on malformed input."""
    out: list[tuple[int, int, int | bytes]] = []
    pos = 0
    end = len(buf)
    while pos < end:
        key, pos = read_varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = read_varint(buf, pos)
            out.append((number, wire, value))
        elif wire == 2:
            length, pos = read_varint(buf, pos)
            if pos + length > end:
                raise ValueError("truncated length-delimited field")
            out.append((number, wire, bytes(buf[pos : pos + length])))
            pos += length
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
    return out


def decode_node(buf: bytes | memoryview) -> PBNode:
    """Decode a dag-pb block; raises ValueError when it is not one."""
    links: list[PBLink] = []
    data: bytes | None = None
    for number, wire, value in _fields(buf):
        if number == 2 and wire == 2 and isinstance(value, bytes):
            links.append(_decode_link(value))
        elif number == 1 and wire == 2 and isinstance(value, bytes):
            data = value
        else:
            raise ValueError(f"unexpected field {number} in dag-pb node")
    return PBNode(tuple(links), data)


def _decode_link(buf: bytes) -> PBLink:
    hash_: bytes | None = None
    name: str | None = None
    tsize: int | None = None
    for number, _wire, value in _fields(buf):
        if number == 1 and isinstance(value, bytes):
            hash_ = value
        elif number == 2 and isinstance(value, bytes):
            name = value.decode("utf-8")
        elif number == 3 and isinstance(value, int):
            tsize = value
        else:
            raise ValueError(f"unexpected field {number} in dag-pb link")
    if hash_ is None:
        raise ValueError("dag-pb link without a hash")
    return PBLink(hash_, name, tsize)


def decode_unixfs(buf: bytes) -> UnixFSData:
    type_: int | None = None
    data: bytes | None = None
    filesize: int | None = None
    blocksizes: list[int] = []
    for number, _wire, value in _fields(buf):
        if number == 1 and isinstance(value, int):
            type_ = value
        elif number == 2 and isinstance(value, bytes):
            data = value
        elif number == 3 and isinstance(value, int):
            filesize = value
        elif number == 4 and isinstance(value, int):
            blocksizes.append(value)
        elif number == 4 and isinstance(value, bytes):
            # Protobuf readers must also accept a repeated scalar in packed form.
            pos = 0
            while pos < len(value):
                size, pos = read_varint(value, pos)
                blocksizes.append(size)
        # hashType, fanout, mode and mtime are not needed to read file bytes.
    if type_ is None:
        raise ValueError("UnixFS data without a type")
    return UnixFSData(type_, data, filesize, tuple(blocksizes))


def links_of(codec: int, block: bytes | memoryview) -> list[Cid]:
    """The CIDs a block links to (dag-pb links; raw blocks have none)."""
    if codec == RAW:
        return []
    if codec == DAG_PB:
        return [link.hash for link in decode_node(block).links]
    raise ValueError(f"cannot walk blocks of codec 0x{codec:x}")

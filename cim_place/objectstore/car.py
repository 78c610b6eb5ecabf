"""CAR v1 files: DAGs in and out of a store, interoperable with the IPFS tools.

Format (https://ipld.io/specs/transport/car/carv1/)::

    varint(len(header)) | header = DAG-CBOR {"roots": [CID, ...], "version": 1}
    then, per block: varint(len(cid) + len(data)) | cid (binary) | data

The header is tiny and goes through ``dag_cbor`` and ``multiformats``; block sections stay bytes.
Reading verifies every block against its CID. Importing is all or nothing: blocks are staged in
the volume, every root's DAG is checked for completeness, and only then do the blocks become
addressable; a truncated file, a block that does not match its CID or a missing block imports
nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import BinaryIO

import dag_cbor
from multiformats import CID

from cim_place.errors import CarError, InvalidCidError, StoreError
from cim_place.interfaces import BlockSource
from cim_place.objectstore import dag
from cim_place.objectstore.blockstore import FsBlockStore
from cim_place.objectstore.cid import SHA2_256, Cid, matches, read_varint, split, to_str, varint

MAX_HEADER = 1 << 20
"""A header larger than this is garbage, not a list of roots."""
MAX_SECTION = 16 << 20
"""Blocks are at most a few MiB (IPFS exchanges up to 2 MiB); a larger length is garbage."""


def encode_header(roots: Sequence[Cid]) -> bytes:
    """The varint-prefixed CAR v1 header naming ``roots``."""
    header = dag_cbor.encode({"roots": [CID.decode(root) for root in roots], "version": 1})
    return varint(len(header)) + header


def write_car(source: BlockSource, roots: Sequence[Cid], out: BinaryIO) -> int:
    """Write the DAGs below ``roots`` as a CAR v1 to ``out``; returns the bytes written.

    Blocks come in :func:`dag.walk` order (each root first, depth first), each block once even
    when several roots share it. Raises BlockNotFoundError / CorruptBlockError when a block of
    the DAG is missing or damaged in ``source``.
    """
    header = encode_header(roots)
    out.write(header)
    written = len(header)
    seen: set[Cid] = set()
    for root in roots:
        for cid, data in dag.walk(source, root):
            if cid in seen:
                continue
            seen.add(cid)
            prefix = varint(len(cid) + len(data))
            out.write(prefix)
            out.write(cid)
            out.write(data)
            written += len(prefix) + len(cid) + len(data)
    return written


class _Reader:
    """A stream with the byte offset kept, for error messages that say where."""

    def __init__(self, stream: BinaryIO) -> None:
        self._stream = stream
        self.offset = 0

    def exactly(self, n: int, what: str) -> bytes:
        start = self.offset
        chunks: list[bytes] = []
        got = 0
        while got < n:
            chunk = self._stream.read(n - got)
            if not chunk:
                raise CarError(
                    f"CAR file truncated at byte {start + got}: {what} needs {n} bytes from byte "
                    f"{start}, only {got} left; the file is incomplete, fetch or export it again"
                )
            chunks.append(chunk)
            got += len(chunk)
        self.offset += n
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def varint(self, what: str, *, eof_ok: bool = False) -> int | None:
        """A varint, or None at a clean end of file when ``eof_ok``."""
        start = self.offset
        result = shift = 0
        while True:
            byte = self._stream.read(1)
            if not byte:
                if eof_ok and self.offset == start:
                    return None
                raise CarError(
                    f"CAR file truncated at byte {self.offset}: {what} (a varint from byte "
                    f"{start}) is cut off; the file is incomplete, fetch or export it again"
                )
            self.offset += 1
            result |= (byte[0] & 0x7F) << shift
            if not byte[0] & 0x80:
                return result
            shift += 7
            if shift > 63:
                raise CarError(f"CAR file is garbage at byte {start}: {what} is not a varint")


def _header_roots(raw: bytes) -> list[Cid]:
    try:
        header = dag_cbor.decode(raw)
    except Exception as exc:  # dag_cbor raises several unrelated types on garbage
        raise CarError(
            f"CAR header (from byte 0) is not DAG-CBOR: {exc}; not a CAR file?"
        ) from None
    if not isinstance(header, dict) or header.get("version") != 1:
        version = header.get("version") if isinstance(header, dict) else None
        raise CarError(
            f"CAR header (from byte 0) is not a CAR v1 header (version {version!r}); "
            "cim-place reads CAR v1 (CAR v2 files can be converted with `ipfs-car` or go-car)"
        )
    roots = header.get("roots")
    if not isinstance(roots, list):
        raise CarError("CAR header (from byte 0) has no list of root CIDs")
    out: list[Cid] = []
    for root in roots:
        if not isinstance(root, CID):
            raise CarError(f"CAR header (from byte 0) lists a root that is not a CID: {root!r}")
        cid = bytes(root)
        try:
            split(cid)
        except InvalidCidError as exc:
            raise CarError(f"CAR header names an unsupported root: {exc}") from None
        out.append(cid)
    return out


def _cid_length(section: bytes, offset: int) -> int:
    """Length of the binary CID at the start of a section."""
    if len(section) >= 2 and section[0] == SHA2_256 and section[1] == 0x20:
        return 34  # CIDv0: a bare sha2-256 multihash
    try:
        version, pos = read_varint(section, 0)
        if version != 1:
            raise ValueError(f"CID version {version}")
        _, pos = read_varint(section, pos)  # codec
        _, pos = read_varint(section, pos)  # multihash code
        length, pos = read_varint(section, pos)
    except ValueError as exc:
        raise CarError(
            f"CAR file is garbage at byte {offset}: the block section does not start with a "
            f"CID ({exc})"
        ) from None
    if pos + length > len(section):
        raise CarError(f"CAR file is garbage at byte {offset}: the CID runs past its section")
    return pos + length


def _sections(reader: _Reader) -> Iterator[tuple[Cid, bytes]]:
    while True:
        start = reader.offset
        length = reader.varint("a block section length", eof_ok=True)
        if length is None:
            return
        if length == 0 or length > MAX_SECTION:
            raise CarError(
                f"CAR file is garbage at byte {start}: a block section of {length} bytes "
                f"(allowed: 1 to {MAX_SECTION})"
            )
        body_at = reader.offset
        section = reader.exactly(length, "a block section")
        n = _cid_length(section, body_at)
        cid, data = section[:n], section[n:]
        try:
            ok = matches(cid, data)
        except InvalidCidError as exc:
            raise CarError(f"CAR block at byte {start}: {exc}") from None
        if not ok:
            raise CarError(
                f"CAR block {to_str(cid)} at byte {start} does not match its CID "
                "(the file is damaged); nothing was imported"
            )
        yield cid, data


def read_car(stream: BinaryIO) -> tuple[list[Cid], Iterator[tuple[Cid, bytes]]]:
    """Read a CAR v1: its roots now, its blocks lazily as (cid, data).

    Raises CarError, naming the byte offset, on a truncated or malformed file or a block whose
    bytes do not hash to its CID.
    """
    reader = _Reader(stream)
    length = reader.varint("the header length", eof_ok=True)
    if length is None:
        raise CarError("CAR file is empty (0 bytes); export it again")
    if length == 0 or length > MAX_HEADER:
        raise CarError(
            f"CAR file is garbage at byte 0: a header of {length} bytes; not a CAR file?"
        )
    roots = _header_roots(reader.exactly(length, "the header"))
    return roots, _sections(reader)


@dataclass(frozen=True, slots=True)
class CarImport:
    """What :func:`import_car` did."""

    roots: list[Cid]
    blocks_read: int
    """Distinct blocks in the file."""
    blocks_added: int
    """Blocks that were new to the store."""
    dag_blocks: dict[Cid, int] = field(default_factory=dict)
    """Distinct blocks in each root's DAG."""


def import_car(
    stream: BinaryIO,
    store: FsBlockStore,
    *,
    check_roots: Callable[[list[Cid]], None] | None = None,
) -> CarImport:
    """Import every block of a CAR v1 into ``store``, all or nothing.

    Every block is verified against its CID and staged; every root's DAG must then be complete
    (from the file and the blocks the store already has). Only then are the staged blocks made
    addressable. On any failure (CarError for a bad or incomplete file, StoreFullError) the store
    is left as it was. Pinning the roots is the caller's business. ``check_roots`` may reject
    the file by its roots (raising) before any block is read.
    """
    roots, sections = read_car(stream)
    if not roots:
        raise CarError("CAR file names no root; cim-place imports DAGs by their roots")
    if check_roots is not None:
        check_roots(roots)
    seen: set[Cid] = set()
    with store.staging() as staging:
        for cid, data in sections:
            seen.add(cid)
            staging.put(cid, data)
        dag_blocks: dict[Cid, int] = {}
        for root in roots:
            try:
                absent, dag_blocks[root] = dag.survey(staging, root)
            except StoreError as exc:
                raise CarError(
                    f"cannot check the DAG of root {to_str(root)} in the CAR file: {exc}; "
                    "nothing was imported"
                ) from None
            if absent:
                shown = ", ".join(to_str(cid) for cid in absent[:3])
                more = f" and {len(absent) - 3} more" if len(absent) > 3 else ""
                raise CarError(
                    f"CAR file does not hold the whole DAG of root {to_str(root)}: "
                    f"{len(absent)} block(s) missing ({shown}{more}); nothing was imported. "
                    "Export the CAR again with every block of the DAG"
                )
        added = staging.commit()
    return CarImport(roots, len(seen), len(added), dag_blocks)

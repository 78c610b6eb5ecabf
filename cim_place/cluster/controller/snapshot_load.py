"""Reading a projection snapshot back: streamed, section by section, checked whole (no I/O).

This module owns :func:`load_parts` (and :func:`load`, :func:`restore` on whole bytes). The
format is :mod:`cim_place.cluster.controller.snapshot_format`'s; what this module adds is how
little memory a restore needs, because a controller restarts at its largest (10M objects: a
400 MiB snapshot, a 1 GiB payload, a 1 GiB projection):

- the snapshot arrives as the object store's chunks; each chunk is hashed, decompressed and
  released in turn, so the compressed bytes shrink as the projection grows;
- the payload is never whole: each section is decompressed into its own buffer and turned into
  its column (or CID array) at once, so at any time at most one section exists twice;
- the checksum and the length are checked at the end, before the projection is returned; a
  fresh projection is built, so nothing changes on failure, and a failure is reported as what it
  is (truncated or corrupt before "unreadable").

Old snapshots (the sparse map after the columns) are read too: columns met before the sparse map
wait, as bytes, until it says their typecodes.
"""

from __future__ import annotations

import gc
import hashlib
import zlib
from array import array
from collections.abc import Iterator
from typing import Any

import numpy as np
import numpy.typing as npt

from cim_place.cluster.controller.projection import Projection
from cim_place.cluster.controller.snapshot_format import (
    CID_ARRAYS,
    COLUMNS,
    COMPRESSED,
    FORMAT_VERSION,
    HEADER_SIZE,
    SECTION,
    Header,
    SnapshotError,
    adopt,
    build,
    cid_array,
    column_of,
    header_of,
    sparse_of,
)

__all__ = ["load", "load_parts", "restore", "verify_parts"]

_PIECE = 1 << 20
"""Most bytes decompressed at once."""

Chunk = bytes | bytearray | memoryview


def restore(projection: Projection, data: Chunk) -> int:
    """Replace ``projection``'s objects and event state by the snapshot ``data``; its sequence.

    All or nothing: every check runs on a fresh projection first; SnapshotError on any failure.
    """
    fresh = load(data)
    adopt(projection, fresh)
    return fresh.last_sequence


def load(data: Chunk) -> Projection:
    """A new projection from the snapshot ``data``; SnapshotError if it is not a valid one."""
    return load_parts([data if isinstance(data, bytes) else bytes(data)])


def load_parts(parts: list[bytes]) -> Projection:
    """A new projection from the snapshot whose bytes are ``parts`` in order; SnapshotError if
    it is not a valid one. ``parts`` is consumed: each part is dropped once decompressed."""
    header, payload = _open(parts)
    # Restoring allocates many objects (interned tables, sparse state) none of which can be
    # garbage yet: no collection on the way.
    collecting = gc.isenabled()
    gc.disable()
    try:
        try:
            fresh = _read(payload)
        except SnapshotError:
            payload.drain()
            payload.check()
            raise
        except Exception as exc:
            # Bytes not checked yet can fail any parser in any way (zlib, DAG-CBOR, numpy's
            # header tokenizer...). Corruption shows as a bad checksum; with a good one the
            # writer wrote this: a bug or another build, never a crash.
            payload.drain()
            payload.check()
            raise SnapshotError(
                f"unreadable despite a good checksum: {type(exc).__name__}: {exc}"
            ) from None
        payload.check()
    finally:
        if collecting:
            gc.enable()
    if fresh.last_sequence != header.sequence:
        raise SnapshotError("the header's sequence disagrees with the payload's")
    return fresh


def verify_parts(parts: list[bytes]) -> Header:
    """The header of the snapshot whose bytes are ``parts`` once its version, length and
    checksum are right (nothing decompressed); ``parts`` is consumed."""
    header, payload = _open(parts)
    payload.drain()
    payload.check()
    return header


def _open(parts: list[bytes]) -> tuple[Header, _Payload]:
    parts.reverse()  # taken from the end, each dropped once used
    head = b""
    while len(head) < HEADER_SIZE and parts:
        head += parts.pop()
    header = header_of(head)
    if header.version != FORMAT_VERSION:
        raise SnapshotError(
            f"format version {header.version}, this controller reads {FORMAT_VERSION}"
        )
    if len(head) > HEADER_SIZE:
        parts.append(head[HEADER_SIZE:])
    return header, _Payload(parts, header)


class _Payload:
    """The decompressed payload, read in order from compressed parts, hashed on the way."""

    def __init__(self, parts: list[bytes], header: Header) -> None:
        self._parts = parts
        self._header = header
        self._hash = hashlib.sha256()
        self._length = 0
        self._inflate = zlib.decompressobj() if header.flags & COMPRESSED else None
        self._pieces = self._decompressed()
        self._left = memoryview(b"")

    def _decompressed(self) -> Iterator[memoryview]:
        while self._parts:
            part = self._parts.pop()
            self._hash.update(part)
            self._length += len(part)
            if self._inflate is None:
                yield memoryview(part)
                continue
            data: Chunk = part
            del part
            while data:
                out = self._inflate.decompress(data, _PIECE)
                data = self._inflate.unconsumed_tail
                if out:
                    yield memoryview(out)
        if self._inflate is not None and (tail := self._inflate.flush()):
            yield memoryview(tail)

    def read(self, size: int) -> bytearray | None:
        """The next ``size`` bytes; None at the end; SnapshotError if the end cuts them."""
        if not self._left:
            self._left = next(self._pieces, memoryview(b""))
            if not self._left:
                return None
        out = bytearray(size)
        at = 0
        while at < size:
            if not self._left:
                self._left = next(self._pieces, memoryview(b""))
                if not self._left:
                    raise SnapshotError(f"truncated: a section ends after {at} of {size} bytes")
            taken = min(size - at, len(self._left))
            out[at : at + taken] = self._left[:taken]
            self._left = self._left[taken:]
            at += taken
        return out

    def drain(self) -> None:
        """Hash what is left, decompressing nothing (after a failure, to say what it was)."""
        while self._parts:
            part = self._parts.pop()
            self._hash.update(part)
            self._length += len(part)

    def check(self) -> None:
        """SnapshotError unless the payload read had the header's length and checksum."""
        if self._length != self._header.length:
            raise SnapshotError(f"truncated: {self._length} payload bytes of {self._header.length}")
        if self._hash.digest() != self._header.checksum:
            raise SnapshotError("checksum mismatch (corrupt)")


def _read(payload: _Payload) -> Projection:
    sparse: dict[str, Any] | None = None
    waiting: dict[bytes, bytearray] = {}  # columns met before the sparse map
    columns: dict[bytes, array[Any]] = {}
    cid_arrays: dict[str, npt.NDArray[np.generic]] = {}
    names: bytearray | None = None
    while (head := payload.read(SECTION.size)) is not None:
        name, length = SECTION.unpack(head)
        data = payload.read(length) if length else bytearray()
        if data is None:
            raise SnapshotError(f"section {name!r} truncated")
        if name == b"sprs":
            sparse = sparse_of(data)
            for waited, bytes_ in waiting.items():
                columns[waited] = column_of(waited, bytes_, _typecode(sparse, waited))
            waiting.clear()
        elif name in COLUMNS:
            if sparse is None:
                waiting[name] = data
            else:
                columns[name] = column_of(name, data, _typecode(sparse, name))
        elif name in CID_ARRAYS:
            cid_arrays[CID_ARRAYS[name]] = cid_array(data)
        elif name == b"name":
            names = data
        del data
    payload.check()  # before any cross-section check: a cut payload is "truncated"
    missing = {*COLUMNS} - set(columns)
    missing |= {name for name, key in CID_ARRAYS.items() if key not in cid_arrays}
    if sparse is None:
        missing.add(b"sprs")
    if names is None:
        missing.add(b"name")
    if missing or sparse is None or names is None:
        raise SnapshotError(f"sections missing: {sorted(missing)}")
    return build(sparse, columns, cid_arrays, names)


def _typecode(sparse: dict[str, Any], name: bytes) -> str:
    return str(sparse["typecodes"][name.decode()])

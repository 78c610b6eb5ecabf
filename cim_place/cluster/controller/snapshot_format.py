"""The bytes of a projection snapshot: export a :class:`Projection` and restore it (no I/O).

This module owns the snapshot format. A snapshot is a 64-byte header and a payload::

    header:  b"CIMPSNAP" | u32 format version | u32 flags | u64 last applied stream sequence
             | u64 payload length | 32-byte SHA-256 of the payload (all little-endian)
    payload: zlib (flag 1) of sections, each b"<4-char name>" | u64 length | bytes

The object columns travel as their raw buffers (``array.tobytes``: one copy, no loop per
object), the names as their UTF-8 blob, the CID table through :func:`_encode_cids` /
:func:`_decode_cids` (the only place that knows how the projection indexes CIDs), and the sparse
state (interned strings, metadata maps and locations, damage, tasks in flight, failures,
inventories, tombstones, counters) as one DAG-CBOR map. Nodes, drain flags and policies are not
in it: the controller reads them from KV at every start.

Export is split so that the event loop pays only for the copy: :func:`take` copies the columns
(tens of milliseconds at a million objects), :func:`seal` (compress and hash, in a thread)
builds the bytes. Reading back is :mod:`cim_place.cluster.controller.snapshot_load`'s, with the
pieces here (:func:`sparse_of`, :func:`column_of`, :func:`cid_array`, :func:`build`): it checks
the header, the checksum, the version and every index before it touches the projection: a
snapshot that fails any check raises :class:`SnapshotError` and changes nothing.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import math
import struct
import sys
import zlib
from array import array
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from cim_place.cluster.controller.cid_index import CidIndex, CidIndexError
from cim_place.cluster.controller.projection import Projection
from cim_place.cluster.controller.projection_columns import _WIDTH
from cim_place.cluster.controller.projection_tasks import FailureKey, LastFailure, TaskInFlight
from cim_place.cluster.events.types import InventoryDigest, ObjectDeleted
from cim_place.errors import CimPlaceError
from cim_place.objectstore import dagcbor
from cim_place.objectstore.dagcbor import Value

__all__ = [
    "FORMAT_VERSION",
    "Sealed",
    "SnapshotError",
    "Taken",
    "adopt",
    "build",
    "cid_array",
    "column_of",
    "header_of",
    "seal",
    "sparse_of",
    "take",
    "verify",
]

MAGIC = b"CIMPSNAP"
FORMAT_VERSION = 1
"""Bumped whenever the layout changes; a snapshot of another version is refused (full replay)."""
_TYPECODES = "bBhHiIlLqQfd"
"""Array typecodes a column may have (integers and floats)."""
_HEADER = struct.Struct("<8sIIQQ32s")
HEADER_SIZE = _HEADER.size
SECTION = struct.Struct("<4sQ")
COMPRESSED = 1

# Column sections: name -> projection attribute. Each column travels with its own array typecode
# (recorded in the sparse map), so a column the projection widens or narrows needs no new
# format version; a column whose *meaning* changes does.
COLUMNS: dict[bytes, str] = {
    b"size": "_size",
    b"fsen": "_first_seen",
    b"sequ": "_sequence",
    b"ownr": "_owner",
    b"meta": "_meta",
    b"nmat": "_name_at",
    b"nmln": "_name_len",
    b"rep_": "_rep",
    b"repa": "_rep_at",
}
# Sections of the CID index (cid_index.py, ``to_arrays``): name -> array.
CID_ARRAYS = {
    b"cirs": "records",
    b"cifr": "free",
    b"cipb": "prefix_bytes",
    b"cipl": "prefix_lengths",
    b"ciss": "spill_slots",
    b"cisl": "spill_lengths",
    b"cisb": "spill_bytes",
}


class SnapshotError(CimPlaceError):
    """Bytes that are not a usable snapshot (truncated, corrupt, another format version)."""


@dataclass(frozen=True, slots=True)
class Taken:
    """A copy of a projection's state, independent of it (safe to seal in a thread)."""

    sequence: int
    sections: list[tuple[bytes, bytes]]
    cids: dict[str, npt.NDArray[np.generic]]
    objects: int


@dataclass(frozen=True, slots=True)
class Sealed:
    """A snapshot's bytes, as the header and the compressed pieces (never joined on the way to
    the object store: at 10M objects each copy is 400 MiB), and what its header says."""

    sequence: int
    parts: list[bytes]
    objects: int

    @property
    def size(self) -> int:
        return sum(len(part) for part in self.parts)

    @property
    def data(self) -> bytes:
        """The bytes whole (tests and small snapshots)."""
        return b"".join(self.parts)


@dataclass(frozen=True, slots=True)
class Header:
    version: int
    flags: int
    sequence: int
    length: int
    checksum: bytes


def header_of(data: bytes | bytearray | memoryview) -> Header:
    """The header of a snapshot; SnapshotError if ``data`` does not start with one."""
    if len(data) < HEADER_SIZE:
        raise SnapshotError(f"truncated: {len(data)} bytes, shorter than the header")
    magic, version, flags, sequence, length, checksum = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise SnapshotError("not a cim-place projection snapshot (bad magic)")
    return Header(version, flags, sequence, length, checksum)


# -- the CID table ---------------------------------------------------------------------------------


def _copy_cids(projection: Projection) -> dict[str, npt.NDArray[np.generic]]:
    """A copy of the CID index, cheap enough for the event loop (buffer copies)."""
    return projection._index.to_arrays()


def _encode_cids(arrays: dict[str, npt.NDArray[np.generic]]) -> Iterator[tuple[bytes, bytes]]:
    """The CID index's arrays, each in the ``.npy`` format (dtype and shape, no pickle), one at
    a time (each is compressed and dropped before the next is encoded)."""
    for name, key in CID_ARRAYS.items():
        out = io.BytesIO()
        np.lib.format.write_array(out, np.ascontiguousarray(arrays[key]), allow_pickle=False)
        yield name, out.getvalue()


def cid_array(data: bytes | bytearray | memoryview) -> npt.NDArray[np.generic]:
    """One array of :func:`_encode_cids`' sections, as a view of ``data`` (no copy: at 10M
    objects the records alone are 330 MB, and the restore's peak memory is the budget)."""
    head = io.BytesIO(bytes(data[: min(len(data), 1 << 16)]))
    try:
        version = np.lib.format.read_magic(head)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(head)
        else:
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(head)
    except ValueError as exc:
        raise SnapshotError(f"a CID array's header: {exc}") from None
    if dtype.hasobject:
        raise SnapshotError("a CID array holds objects")
    count = math.prod(shape)
    if head.tell() + count * dtype.itemsize != len(data):
        raise SnapshotError("a CID array's length does not match its header")
    flat = np.frombuffer(data, dtype=dtype, count=count, offset=head.tell())
    return flat.reshape(shape, order="F" if fortran else "C")


def _decode_cids(arrays: dict[str, npt.NDArray[np.generic]], fresh: Projection) -> None:
    """Rebuild ``fresh``'s CID index from :func:`_encode_cids`' arrays (checked whole)."""
    try:
        fresh._index = CidIndex.from_arrays(arrays)
    except CidIndexError as exc:
        raise SnapshotError(f"the CID index: {exc}") from None


# -- export ----------------------------------------------------------------------------------------


def take(projection: Projection) -> Taken:
    """Copy what a snapshot holds (on the event loop: about 0.1 s at a million objects)."""
    p = projection
    sections: list[tuple[bytes, bytes]] = []
    typecodes: dict[str, Value] = {}
    for name, attribute in COLUMNS.items():
        column = getattr(p, attribute)
        sections.append((name, column.tobytes()))
        typecodes[name.decode()] = column.typecode
    sections.append((b"name", bytes(p._names)))
    # The sparse map first: it says the columns' typecodes, so that a reader can build each
    # column as its section arrives (cim_place.cluster.controller.snapshot_load).
    sections.insert(0, (b"sprs", dagcbor.encode(_sparse(p, typecodes))))
    return Taken(p.last_sequence, sections, _copy_cids(p), len(p))


def seal(taken: Taken, *, compress: bool = True) -> Sealed:
    """The snapshot bytes of ``taken`` (compression and hashing: run it in a thread)."""
    # Section by section, so that the uncompressed payload never exists whole in memory.
    packer = zlib.compressobj(1) if compress else None
    parts: list[bytes] = []
    for name, data in itertools.chain(taken.sections, _encode_cids(taken.cids)):
        for piece in (SECTION.pack(name, len(data)), data):
            parts.append(piece if packer is None else packer.compress(piece))
    if packer is not None:
        parts.append(packer.flush())
    hashed = hashlib.sha256()
    for part in parts:
        hashed.update(part)
    header = _HEADER.pack(
        MAGIC,
        FORMAT_VERSION,
        COMPRESSED if compress else 0,
        taken.sequence,
        sum(len(part) for part in parts),
        hashed.digest(),
    )
    return Sealed(taken.sequence, [header, *(part for part in parts if part)], taken.objects)


def _sparse(p: Projection, typecodes: dict[str, Value]) -> dict[str, Value]:
    return {
        "byteorder": sys.byteorder,
        "typecodes": typecodes,
        "itemsizes": {t: array(t).itemsize for t in _TYPECODES},
        "strings": list(p._strings),
        "metas": [[[k, v] for k, v in meta.items()] for meta in p._metas],
        "locations": [[n, v] for n, v in p._locations],
        "rep_more": [[slot, list(more)] for slot, more in p._rep_more.items()],
        "damaged": [
            [cid, [[n, v, list(blocks)] for (n, v), blocks in per.items()]]
            for cid, per in p._damaged.items()
        ],
        "tasks": [
            [t.id, t.kind, t.node, t.root, t.volume, t.enqueued_at, t.repair_policy]
            for t in p._tasks.values()
        ],
        "failures": [
            [cid, [[k, n, v, count] for (k, n, v), count in per.items()]]
            for cid, per in p._failures.items()
        ],
        "last_failure": [
            [cid, [[k, n, v, f.at, f.permanent, f.reason] for (k, n, v), f in per.items()]]
            for cid, per in p._last_failure.items()
        ],
        "inventories": [[n, v, d.body()] for (n, v), d in p._inventories.items()],
        "deleted": [[cid, d.body()] for cid, d in p._deleted.items()],
        "counters": {
            "last_sequence": p.last_sequence,
            "applied": p.applied,
            "rejected": p.rejected,
            "replayed": p.replayed,
            "total_size": p.total_size,
        },
        "rejections": dict(p.rejections),
    }


# -- import ----------------------------------------------------------------------------------------

# One word per attribute (a list literal would take a line each).
_RESTORED = [
    *COLUMNS.values(),
    *"_index _names _rep_more _damaged _strings".split(),  # noqa: SIM905
    *"_string_id _metas _meta_id _locations _location_id _tasks".split(),  # noqa: SIM905
    *"_tasks_by_cid _failures _last_failure _inventories _deleted".split(),  # noqa: SIM905
    *"last_sequence applied total_size rejected rejections replayed".split(),  # noqa: SIM905
]
"""The projection attributes a snapshot replaces (nodes, drains and policies stay)."""


def adopt(projection: Projection, fresh: Projection) -> None:
    """Move what a snapshot holds from ``fresh`` (see :func:`load`) into ``projection``."""
    for attribute in _RESTORED:
        setattr(projection, attribute, getattr(fresh, attribute))


def verify(data: bytes | bytearray | memoryview) -> Header:
    """The header of the snapshot ``data`` once its version, length and checksum are right."""
    header = header_of(data)
    if header.version != FORMAT_VERSION:
        raise SnapshotError(
            f"format version {header.version}, this controller reads {FORMAT_VERSION}"
        )
    payload = memoryview(data)[HEADER_SIZE:]
    if len(payload) != header.length:
        raise SnapshotError(f"truncated: {len(payload)} payload bytes of {header.length}")
    if hashlib.sha256(payload).digest() != header.checksum:
        raise SnapshotError("checksum mismatch (corrupt)")
    return header


def column_of(name: bytes, data: bytes | bytearray | memoryview, typecode: str) -> array[Any]:
    """The column ``name`` from its section's bytes, as an array of ``typecode``."""
    if typecode not in _TYPECODES:
        raise SnapshotError(f"column {name!r} has typecode {typecode!r}")
    column = array(typecode)
    if len(data) % column.itemsize:
        raise SnapshotError(f"section {name!r} is not a whole number of items")
    column.frombytes(data)
    return column


def sparse_of(data: bytes | bytearray | memoryview) -> dict[str, Any]:
    """The sparse section decoded, its typecodes and item sizes checked against this build."""
    sparse = dagcbor.decode(data)
    if not isinstance(sparse, dict):
        raise SnapshotError("the sparse section is not a map")
    s: dict[str, Any] = sparse
    itemsizes, typecodes = s["itemsizes"], s["typecodes"]
    for typecode in typecodes.values():
        if typecode not in _TYPECODES or itemsizes.get(typecode) != array(typecode).itemsize:
            raise SnapshotError(f"written with another item size for {typecode!r}")
    return s


def build(
    s: dict[str, Any],
    columns: dict[bytes, array[Any]],
    cid_arrays: dict[str, npt.NDArray[np.generic]],
    names: bytes | bytearray | memoryview,
) -> Projection:
    """A fresh projection from the decoded sections, every index checked."""
    fresh = Projection()
    _decode_cids(cid_arrays, fresh)
    slots = fresh._index.slots
    swap = s["byteorder"] != sys.byteorder
    for name, attribute in COLUMNS.items():
        column = columns[name]
        if swap:
            column.byteswap()
        width = _WIDTH if attribute in ("_rep", "_rep_at") else 1
        if len(column) != slots * width:
            raise SnapshotError(f"column {name!r} has {len(column)} items for {slots} slots")
        setattr(fresh, attribute, column)
    fresh._names = bytearray(names)
    fresh._strings = [str(x) for x in s["strings"]]
    fresh._string_id = {text: i for i, text in enumerate(fresh._strings)}
    fresh._metas = [{str(k): str(v) for k, v in pairs} for pairs in s["metas"]]
    fresh._meta_id = {tuple(m.items()): i for i, m in enumerate(fresh._metas)}
    fresh._locations = [(str(n), str(v)) for n, v in s["locations"]]
    fresh._location_id = {loc: i for i, loc in enumerate(fresh._locations) if i}
    _check_indexes(fresh, slots)
    fresh._rep_more = {int(slot): [int(x) for x in more] for slot, more in s["rep_more"]}
    fresh._damaged = {
        bytes(cid): {(n, v): frozenset(bytes(b) for b in blocks) for n, v, blocks in per}
        for cid, per in s["damaged"]
    }
    for task_id, kind, node, root, volume, at, repair_policy in s["tasks"]:
        task = TaskInFlight(task_id, kind, node, bytes(root), volume, float(at), repair_policy)
        fresh._tasks[task_id] = task
        fresh._tasks_by_cid.setdefault(task.root, set()).add(task_id)
    fresh._failures = {
        bytes(cid): {_key(k, n, v): int(c) for k, n, v, c in per} for cid, per in s["failures"]
    }
    fresh._last_failure = {
        bytes(cid): {
            _key(k, n, v): LastFailure(float(at), bool(perm), str(why))
            for k, n, v, at, perm, why in per
        }
        for cid, per in s["last_failure"]
    }
    fresh._inventories = {
        (str(n), str(v)): InventoryDigest.from_body(body) for n, v, body in s["inventories"]
    }
    fresh._deleted = {bytes(cid): ObjectDeleted.from_body(body) for cid, body in s["deleted"]}
    counters = s["counters"]
    fresh.last_sequence = int(counters["last_sequence"])
    fresh.applied = int(counters["applied"])
    fresh.rejected = int(counters["rejected"])
    fresh.replayed = int(counters["replayed"])
    fresh.total_size = int(counters["total_size"])
    fresh.rejections = {str(k): int(v) for k, v in s["rejections"].items()}
    return fresh


def _key(kind: str, node: str, volume: str | None) -> FailureKey:
    return (str(kind), str(node), None if volume is None else str(volume))


def _check_indexes(fresh: Projection, slots: int) -> None:
    """Every id in the columns points into its table, and every name into the blob."""
    checks = (
        ("owner", fresh._owner, len(fresh._strings)),
        ("metadata", fresh._meta, len(fresh._metas)),
        ("location", fresh._rep, len(fresh._locations)),
    )
    for what, column, limit in checks:
        if len(column) and int(np.frombuffer(column, dtype=column.typecode).max()) >= limit:
            raise SnapshotError(f"a {what} id points past its table")
    if slots:
        at = np.frombuffer(fresh._name_at, dtype=fresh._name_at.typecode).astype(np.int64)
        length = np.frombuffer(fresh._name_len, dtype=fresh._name_len.typecode).astype(np.int64)
        named = at >= 0
        if bool(np.any(at[named] + length[named] > len(fresh._names))):
            raise SnapshotError("a name points past the names blob")

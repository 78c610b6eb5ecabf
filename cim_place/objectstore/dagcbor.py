"""A small, fast DAG-CBOR codec for the values cim-place puts in messages.

The ``dag_cbor`` package is correct but decodes about 3k objects/s here, too slow for the event
path; this codec handles the subset cim-place uses (None, bool, int, float, str, bytes, list, dict
with string keys, and CIDs as tag 42) and produces byte-identical output, which the tests check
against ``dag_cbor``. CIDs are represented by :class:`Link` so that they stay bytes on hot paths.

Canonical form (the DAG-CBOR spec): shortest integer encodings, map keys sorted by length then
bytewise, floats always 64-bit, no indefinite lengths, tag 42 only.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import TypeAlias

from cim_place.errors import InvalidCidError
from cim_place.objectstore.cid import Cid, split


@dataclass(frozen=True, slots=True)
class Link:
    """A CID inside a DAG-CBOR value (tag 42)."""

    cid: Cid


Value: TypeAlias = (
    bool | int | float | str | bytes | Link | list["Value"] | dict[str, "Value"] | None
)


class DagCborError(ValueError):
    """Bytes that are not DAG-CBOR of the supported subset, or a value that cannot be encoded."""


def _head(major: int, n: int, out: bytearray) -> None:
    if n < 24:
        out.append(major << 5 | n)
    elif n < 0x100:
        out.append(major << 5 | 24)
        out.append(n)
    elif n < 0x10000:
        out.append(major << 5 | 25)
        out += n.to_bytes(2, "big")
    elif n < 0x100000000:
        out.append(major << 5 | 26)
        out += n.to_bytes(4, "big")
    elif n < 0x10000000000000000:
        out.append(major << 5 | 27)
        out += n.to_bytes(8, "big")
    else:
        raise DagCborError(f"integer {n} does not fit in 64 bits")


def _encode(value: Value, out: bytearray) -> None:
    if value is None:
        out.append(0xF6)
    elif value is True:
        out.append(0xF5)
    elif value is False:
        out.append(0xF4)
    elif isinstance(value, int):
        if value >= 0:
            _head(0, value, out)
        else:
            _head(1, -1 - value, out)
    elif isinstance(value, str):
        raw = value.encode("utf-8")
        _head(3, len(raw), out)
        out += raw
    elif isinstance(value, bytes):
        _head(2, len(value), out)
        out += value
    elif isinstance(value, Link):
        out += b"\xd8\x2a"  # tag 42
        _head(2, len(value.cid) + 1, out)
        out.append(0)  # the multibase identity prefix DAG-CBOR requires
        out += value.cid
    elif isinstance(value, list):
        _head(4, len(value), out)
        for item in value:
            _encode(item, out)
    elif isinstance(value, dict):
        keys = []
        for key in value:
            if not isinstance(key, str):
                raise DagCborError(f"map key {key!r} is not a string")
            keys.append((len(key.encode("utf-8")), key.encode("utf-8"), key))
        keys.sort()
        _head(5, len(keys), out)
        for _, raw, key in keys:
            _head(3, len(raw), out)
            out += raw
            _encode(value[key], out)
    elif isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            raise DagCborError("DAG-CBOR forbids NaN and infinities")
        out.append(0xFB)
        out += struct.pack(">d", value)
    else:
        raise DagCborError(f"cannot encode {type(value).__name__} as DAG-CBOR")


def encode(value: Value) -> bytes:
    out = bytearray()
    _encode(value, out)
    return bytes(out)


class _Reader:
    __slots__ = ("buf", "pos")

    def __init__(self, buf: bytes) -> None:
        self.buf = buf
        self.pos = 0

    def take(self, n: int) -> bytes:
        end = self.pos + n
        if end > len(self.buf):
            raise DagCborError("truncated DAG-CBOR")
        chunk = self.buf[self.pos : end]
        self.pos = end
        return chunk

    def head(self) -> tuple[int, int]:
        first = self.take(1)[0]
        major, info = first >> 5, first & 31
        if info < 24:
            return major, info
        if info == 27 and major == 7:
            return major, info
        sizes = {24: 1, 25: 2, 26: 4, 27: 8}
        if info not in sizes:
            raise DagCborError(f"unsupported CBOR additional info {info}")
        n = int.from_bytes(self.take(sizes[info]), "big")
        if (info == 24 and n < 24) or (info > 24 and n < 1 << (8 * sizes[info - 1])):
            raise DagCborError("non-canonical integer encoding")
        return major, n

    def value(self, depth: int = 0) -> Value:
        if depth > 64:
            raise DagCborError("DAG-CBOR nested too deeply")
        major, n = self.head()
        if major == 0:
            return n
        if major == 1:
            return -1 - n
        if major == 2:
            return self.take(n)
        if major == 3:
            try:
                return self.take(n).decode("utf-8")
            except UnicodeDecodeError:
                raise DagCborError("invalid UTF-8 in a string") from None
        if major == 4:
            return [self.value(depth + 1) for _ in range(n)]
        if major == 5:
            result: dict[str, Value] = {}
            previous: tuple[int, bytes] | None = None
            for _ in range(n):
                key = self.value(depth + 1)
                if not isinstance(key, str):
                    raise DagCborError("map key is not a string")
                order = (len(key.encode("utf-8")), key.encode("utf-8"))
                if previous is not None and order <= previous:
                    raise DagCborError("map keys not in canonical order or duplicated")
                previous = order
                result[key] = self.value(depth + 1)
            return result
        if major == 6:
            if n != 42:
                raise DagCborError(f"unsupported CBOR tag {n} (DAG-CBOR allows only 42)")
            raw = self.value(depth + 1)
            if not isinstance(raw, bytes) or not raw or raw[0] != 0:
                raise DagCborError("tag 42 must hold a byte string starting with 0x00")
            try:
                split(raw[1:])
            except (ValueError, InvalidCidError) as exc:
                raise DagCborError(f"tag 42 holds an invalid CID: {exc}") from None
            return Link(raw[1:])
        if major == 7:
            if n == 20:
                return False
            if n == 21:
                return True
            if n == 22:
                return None
            if n == 27:
                value: float = struct.unpack(">d", self.take(8))[0]
                return value
        raise DagCborError(f"unsupported CBOR simple value or float width ({major}, {n})")


def decode(buf: bytes) -> Value:
    reader = _Reader(buf)
    value = reader.value()
    if reader.pos != len(buf):
        raise DagCborError(f"{len(buf) - reader.pos} trailing bytes after the DAG-CBOR value")
    return value

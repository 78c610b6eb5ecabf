"""A small, fast DAG-CBOR codec for the values cim-place puts in messages.

The ``dag_cbor`` package is correct but decodes about 3k objects/s here, too slow for the event
path; this codec handles the subset cim-place uses (None, bool, int, float, str, bytes, list, dict
with string keys, and CIDs as tag 42) and produces byte-identical output, which the tests check
against ``dag_cbor``. CIDs are represented by :class:`Link` so that they stay bytes on hot paths.

Decoding has two paths with one answer. :func:`decode_reference` is the strict pure-Python decoder
(about 25-35 us for an event envelope). :func:`decode` first lets ``cbor2``'s C decoder read the
bytes (about 9 us with the checks) and keeps its result only when it is provably what the
reference returns: re-encoding it with ``cbor2`` gives back exactly the input bytes (so integer
widths, lengths, definite lengths, trailing bytes and duplicate keys are as DAG-CBOR demands, and
no tag but 42 is left in a form the walk below would take for a plain value), then one walk
checks that it holds only None, bool, 64-bit int, str, bytes, lists and maps with string keys in
canonical order, and tag 42 around a valid CID (which it turns into a :class:`Link`). Anything
else, valid or not (floats included), goes to the reference, which decodes it or raises
:class:`DagCborError` naming the problem. Encoding is ours alone: :func:`encode` is the
reference.

Canonical form (the DAG-CBOR spec): shortest integer encodings, map keys sorted by length then
bytewise, floats always 64-bit, no indefinite lengths, tag 42 only.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any, TypeAlias

import cbor2

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
            encoded = key.encode("utf-8")
            keys.append((len(encoded), encoded, key))
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


_ARG_BYTES = {24: 1, 25: 2, 26: 4, 27: 8}
"""Bytes of the argument that follows a head, by additional info."""


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
        if info not in _ARG_BYTES:
            raise DagCborError(f"unsupported CBOR additional info {info}")
        n = int.from_bytes(self.take(_ARG_BYTES[info]), "big")
        if (info == 24 and n < 24) or (info > 24 and n < 1 << (8 * _ARG_BYTES[info - 1])):
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
                raw_key = key.encode("utf-8")
                order = (len(raw_key), raw_key)
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
                if value != value or value in (float("inf"), float("-inf")):
                    raise DagCborError("DAG-CBOR forbids NaN and infinities")
                return value
        raise DagCborError(f"unsupported CBOR simple value or float width ({major}, {n})")


def decode_reference(buf: bytes) -> Value:
    """The strict pure-Python decoder: the definition of what :func:`decode` accepts."""
    reader = _Reader(buf)
    value = reader.value()
    if reader.pos != len(buf):
        raise DagCborError(f"{len(buf) - reader.pos} trailing bytes after the DAG-CBOR value")
    return value


# -- the fast path ------------------------------------------------------------------------------


class _Refused(Exception):
    """The fast path cannot vouch for this input; the reference decides."""


_MIN_INT = -(1 << 64)
_MAX_INT = (1 << 64) - 1

# Map key tuples known to be in canonical order (the envelope's and events' keys, a few metadata
# key sets); bounded so that foreign input cannot grow it without limit.
_CANONICAL_KEYS: set[tuple[str, ...]] = set()
_CANONICAL_KEYS_MAX = 4096


def _check_order(keys: tuple[Any, ...]) -> None:
    previous: tuple[int, bytes] | None = None
    for key in keys:
        if type(key) is not str:
            raise _Refused
        raw = key.encode("utf-8")
        order = (len(raw), raw)
        if previous is not None and order <= previous:
            raise _Refused
        previous = order
    if len(_CANONICAL_KEYS) < _CANONICAL_KEYS_MAX:
        _CANONICAL_KEYS.add(keys)


def _link(tag: cbor2.CBORTag) -> Link:
    value = tag.value
    if tag.tag != 42 or type(value) is not bytes or not value or value[0] != 0:
        raise _Refused
    cid = value[1:]
    # A CIDv1 whose codec, hash code and digest length are one-byte varints (every CID cim-place
    # makes) is valid when the digest has that length; anything else is checked by split().
    size = len(cid)
    if size > 4 and cid[0] == 1 and cid[1] < 0x80 and cid[2] < 0x80 and size == 4 + cid[3]:
        return Link(cid)
    try:
        split(cid)
    except (ValueError, InvalidCidError):
        raise _Refused from None
    return Link(cid)


def _check_map(mapping: dict[Any, Any]) -> None:
    keys = tuple(mapping)
    if keys not in _CANONICAL_KEYS:
        _check_order(keys)
    for key, item in mapping.items():
        kind = type(item)
        if kind is str or kind is bytes or kind is bool or item is None:
            continue
        if kind is int:
            if not _MIN_INT <= item <= _MAX_INT:  # a bignum (tag 2 or 3) decoded by cbor2
                raise _Refused
        elif kind is dict:
            _check_map(item)
        elif kind is list:
            _check_list(item)
        elif kind is cbor2.CBORTag:
            mapping[key] = _link(item)  # same key: the dict's size does not change
        else:
            raise _Refused


def _check_list(items: list[Any]) -> None:
    for index, item in enumerate(items):
        kind = type(item)
        if kind is str or kind is bytes or kind is bool or item is None:
            continue
        if kind is int:
            if not _MIN_INT <= item <= _MAX_INT:
                raise _Refused
        elif kind is dict:
            _check_map(item)
        elif kind is list:
            _check_list(item)
        elif kind is cbor2.CBORTag:
            items[index] = _link(item)
        else:
            raise _Refused


def decode(buf: bytes) -> Value:
    """Decode DAG-CBOR ``buf``; raises DagCborError if it is not canonical DAG-CBOR of the subset.

    Same result as :func:`decode_reference`, about three times faster on what cim-place sends.
    """
    try:
        # max_depth below the reference's limit (64), so that nothing deeper is accepted here.
        value = cbor2.loads(buf, max_depth=32)
        # cbor2 writes the shortest heads and definite lengths, and keeps the decoded key order:
        # equal bytes mean the input was complete, free of duplicate keys and canonical except,
        # possibly, for the key order and the kinds of values, which the walk checks.
        if cbor2.dumps(value) == buf:
            holder = [value]
            _check_list(holder)
            result: Value = holder[0]
            return result
    except (_Refused, cbor2.CBORError, ValueError, TypeError, RecursionError):
        pass
    return decode_reference(buf)

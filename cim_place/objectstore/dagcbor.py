"""DAG-CBOR for the values cim-place puts in messages, through ``cbrrr`` (a strict codec in C).

``cbrrr`` encodes canonical DAG-CBOR (shortest integer heads, map keys sorted by length then
bytewise, 64-bit floats, no NaN or infinities, definite lengths, tag 42 only) and its decoder
refuses anything else: non-minimal integers, unsorted or duplicate keys, half and single floats,
NaN, indefinite lengths, tags other than 42, simple values other than false/true/null, invalid
UTF-8 and trailing bytes. It encodes one envelope in about 1-2 us, where the pure-Python codec it
replaced took about 10 us; the bytes are the same (the tests check them against the reference
``dag_cbor`` package, and the events' and tasks' fixed vectors).

Values: None, bool, int (-2**64 .. 2**64-1), float, str, bytes, list, dict with str keys, and
CIDs as :class:`Link` (tag 42), which keeps the CID as bytes so that hot paths never parse it.
Exact types only: ``cbrrr`` refuses a tuple, a str or int subclass, or a Mapping that is not a
dict. A tag-42 CID is checked while decoding (a malformed one is refused, as the reference does).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeAlias

from cbrrr import _cbrrr

from cim_place.errors import InvalidCidError
from cim_place.objectstore.cid import Cid, split

__all__ = ["DagCborError", "Link", "Value", "decode", "encode"]


@dataclass(frozen=True, slots=True)
class Link:
    """A CID inside a DAG-CBOR value (tag 42)."""

    cid: Cid

    def __bytes__(self) -> bytes:
        # cbrrr writes tag 42 around bytes(link) for every object of the type it is given.
        return self.cid


Value: TypeAlias = (
    bool | int | float | str | bytes | Link | list["Value"] | dict[str, "Value"] | None
)


class DagCborError(ValueError):
    """Bytes that are not canonical DAG-CBOR, or a value that cannot be encoded as DAG-CBOR."""


def _link(cid: bytes) -> Link:
    """The Link of a tag-42 CID that cbrrr read (without its 0x00 prefix), once it is valid."""
    # A CIDv1 whose version, codec, hash code and digest length are one-byte varints (every CID
    # cim-place makes) is valid when the digest has that length; anything else goes to split().
    size = len(cid)
    if size > 4 and cid[0] == 1 and cid[1] < 0x80 and cid[2] < 0x80 and size == 4 + cid[3]:
        return Link(cid)
    try:
        split(cid)
    except (ValueError, InvalidCidError) as exc:
        raise DagCborError(f"tag 42 holds an invalid CID: {exc}") from None
    return Link(cid)


def encode(value: Value) -> bytes:
    """The canonical DAG-CBOR of ``value``; DagCborError if it holds something DAG-CBOR cannot."""
    try:
        return _cbrrr.encode_dag_cbor(value, Link, False)
    except (TypeError, ValueError, OverflowError) as exc:
        raise DagCborError(f"cannot encode as DAG-CBOR: {exc}") from None


def decode(buf: bytes | bytearray | memoryview) -> Value:
    """Decode canonical DAG-CBOR ``buf``; DagCborError naming the first thing that is not."""
    try:
        # The C entry point, as cbrrr.decode_dag_cbor calls it, without that wrapper's frame.
        value, length = _cbrrr.decode_dag_cbor(buf, _link, False)  # type: ignore[arg-type]
    except DagCborError:
        raise
    except (ValueError, OverflowError, MemoryError) as exc:
        # CbrrrDecodeError and UnicodeDecodeError are ValueErrors.
        raise DagCborError(f"not canonical DAG-CBOR: {exc}") from None
    if length != len(buf):
        raise DagCborError(f"{len(buf) - length} trailing bytes after the DAG-CBOR value")
    return value  # type: ignore[no-any-return]  # not cast(): a call per message decoded

"""DAG-CBOR through cbrrr: the reference `dag_cbor` package's bytes, and nothing non-canonical."""

from __future__ import annotations

import contextlib

import dag_cbor
import pytest
from hypothesis import given
from hypothesis import strategies as st
from multiformats import CID

from cim_place.objectstore import cid as cids
from cim_place.objectstore import dagcbor
from cim_place.objectstore.dagcbor import Link, Value

links = st.binary(max_size=64).map(lambda b: Link(cids.make_cid(cids.RAW, b)))
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**64), max_value=2**64 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=20),
    st.binary(max_size=40),
    links,
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=5), st.dictionaries(st.text(max_size=8), inner, max_size=5)
    ),
    max_leaves=20,
)


def to_reference(value: Value) -> object:
    if isinstance(value, Link):
        return CID.decode(value.cid)
    if isinstance(value, list):
        return [to_reference(item) for item in value]
    if isinstance(value, dict):
        return {key: to_reference(item) for key, item in value.items()}
    return value


def from_reference(value: object) -> object:
    if isinstance(value, CID):
        return Link(bytes(value))
    if isinstance(value, list):
        return [from_reference(item) for item in value]
    if isinstance(value, dict):
        return {key: from_reference(item) for key, item in value.items()}
    return value


@given(values)
def test_encoding_is_byte_identical_to_the_reference(value: Value) -> None:
    encoded = dagcbor.encode(value)
    assert encoded == dag_cbor.encode(to_reference(value))  # type: ignore[call-overload]
    decoded = dagcbor.decode(encoded)
    assert decoded == value
    assert type(decoded) is type(value)
    assert from_reference(dag_cbor.decode(encoded)) == value


@given(st.binary(max_size=64))
def test_garbage_raises_a_codec_error_only(garbage: bytes) -> None:
    with contextlib.suppress(dagcbor.DagCborError):
        dagcbor.decode(garbage)


def accepts_like_the_reference(raw: bytes) -> None:
    """``decode`` accepts only what re-encodes to ``raw``, and what the reference accepts."""
    try:
        value = dagcbor.decode(raw)
    except dagcbor.DagCborError:
        with pytest.raises(Exception):  # noqa: B017 (dag_cbor raises several types)
            dag_cbor.decode(raw)
        return
    assert dagcbor.encode(value) == raw  # canonical: the one encoding of its value
    try:
        reference = dag_cbor.decode(raw)
    except Exception:
        # multiformats knows only registered codecs and hash functions; a CID is all it can be.
        assert b"\xd8\x2a" in raw
        return
    assert from_reference(reference) == value


@given(values, st.data())
def test_damaged_input_is_refused_or_canonical(value: Value, data: st.DataObject) -> None:
    encoded = bytearray(dagcbor.encode(value))
    for _ in range(data.draw(st.integers(1, 3))):
        action = data.draw(st.sampled_from(["flip", "insert", "delete", "append"]))
        at = data.draw(st.integers(0, len(encoded)))
        byte = data.draw(st.integers(0, 255))
        if action == "flip" and at < len(encoded):
            encoded[at] = byte
        elif action == "insert":
            encoded.insert(at, byte)
        elif action == "delete" and at < len(encoded):
            del encoded[at]
        elif action == "append":
            encoded.append(byte)
    accepts_like_the_reference(bytes(encoded))


@given(st.binary(max_size=80))
def test_random_input_is_refused_or_canonical(raw: bytes) -> None:
    accepts_like_the_reference(raw)


@pytest.mark.parametrize(
    "raw",
    [
        b"\x18\x05",  # 5 in two bytes: a non-minimal integer
        b"\x19\x00\x05",  # 5 in three bytes
        b"\x39\x00\x00",  # -1 in three bytes
        b"\x58\x01\x00",  # a byte string's length in two bytes
        b"\xa2\x61b\x01\x61a\x02",  # keys out of order
        b"\xa2\x62aa\x01\x61b\x02",  # longer key first
        b"\xa2\x61a\x01\x61a\x02",  # duplicate key
        b"\xa1\x01\x02",  # integer key
        b"\xa1\x41a\x02",  # byte-string key
        b"\x01\x02",  # trailing bytes
        b"\xa0\x00",  # trailing bytes after a map
        b"\x9f\x01\xff",  # indefinite-length array
        b"\xbf\x61a\x01\xff",  # indefinite-length map
        b"\x5f\x41a\xff",  # indefinite-length byte string
        b"\x7f\x61a\xff",  # indefinite-length text string
        b"\xc1\x00",  # tag 1 (a date)
        b"\xc2\x49\x01\x00\x00\x00\x00\x00\x00\x00\x00",  # tag 2: a bignum
        b"\xd9\xd9\xf7\x01",  # tag 55799 (self-describe)
        b"\xd8\x2b\x41\x00",  # tag 43
        b"\xd8\x2a\x41\x01",  # tag 42 without the 0x00 prefix
        b"\xd8\x2a\x42\x00\x01",  # tag 42 with a malformed CID
        b"\xd8\x2a\x61a",  # tag 42 around a string
        b"\xf7",  # undefined
        b"\xf0",  # a simple value
        b"\x81\xf8\x20",  # a simple value in a list
        b"\xa1\x61a\xf7",  # undefined in a map
        b"\xf9\x00\x00",  # half float
        b"\xfa\x00\x00\x00\x00",  # single float
        b"\xf9\x7e\x00",  # NaN, half
        b"\xfb\x7f\xf8\x00\x00\x00\x00\x00\x00",  # NaN as a double
        b"\xfb\x7f\xf0\x00\x00\x00\x00\x00\x00",  # infinity
        b"\x62\xc3\x28",  # invalid UTF-8
        b"\x82\x01",  # truncated array
        b"\x65abc",  # truncated string
        b"",  # nothing
    ],
)
def test_non_canonical_or_foreign_input_is_refused(raw: bytes) -> None:
    with pytest.raises(dagcbor.DagCborError):
        dagcbor.decode(raw)
    with pytest.raises(Exception):  # noqa: B017 (the reference refuses it too)
        dag_cbor.decode(raw)


def test_every_tag_but_42_is_refused() -> None:
    def head(tag: int) -> bytes:
        if tag < 24:
            return bytes([0xC0 | tag])
        if tag < 256:
            return bytes([0xD8, tag])
        return b"\xd9" + tag.to_bytes(2, "big")

    cid = cids.make_cid(cids.RAW, b"x")
    for tag in range(1 << 16):
        for content in (b"\x00", b"\x61a", b"\x58\x25\x00" + cid, b"\x82\x01\x02"):
            raw = head(tag) + content
            if tag == 42 and content[0] == 0x58:
                assert dagcbor.decode(raw) == Link(cid)
            else:
                with pytest.raises(dagcbor.DagCborError):
                    dagcbor.decode(raw)


@pytest.mark.parametrize(
    "value",
    [float("nan"), float("inf"), 2**64, -(2**64) - 1, {1: 2}, (1, 2), {"a": object()}, "\udc80"],
)
def test_values_outside_dag_cbor_are_not_encoded(value: object) -> None:
    with pytest.raises(dagcbor.DagCborError):
        dagcbor.encode(value)  # type: ignore[arg-type]


def test_links_and_bytes_stay_apart() -> None:
    cid = cids.make_cid(cids.RAW, b"x")
    encoded = dagcbor.encode({"b": cid, "l": Link(cid)})
    assert encoded == dag_cbor.encode({"b": cid, "l": CID.decode(cid)})
    assert dagcbor.decode(encoded) == {"b": cid, "l": Link(cid)}

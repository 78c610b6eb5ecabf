"""The fast DAG-CBOR codec produces exactly the bytes the reference `dag_cbor` package does."""

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


@given(values)
def test_encoding_is_byte_identical_to_the_reference(value: Value) -> None:
    encoded = dagcbor.encode(value)
    assert encoded == dag_cbor.encode(to_reference(value))  # type: ignore[call-overload]
    assert dagcbor.decode(encoded) == value


@given(st.binary(max_size=64))
def test_garbage_raises_a_codec_error_only(garbage: bytes) -> None:
    with contextlib.suppress(dagcbor.DagCborError):
        dagcbor.decode(garbage)


@pytest.mark.parametrize(
    "raw",
    [
        b"\x18\x05",  # 5 encoded in two bytes: not canonical
        b"\xa2\x61b\x01\x61a\x02",  # keys out of order
        b"\xc1\x00",  # a tag other than 42
        b"\xf9\x00\x00",  # a half-width float
        b"\x82\x01",  # truncated array
    ],
)
def test_non_canonical_or_foreign_input_is_refused(raw: bytes) -> None:
    with pytest.raises(dagcbor.DagCborError):
        dagcbor.decode(raw)


# -- the fast decoder: the same answer as the reference, for any input ---------------------------


def reference_or_error(raw: bytes) -> object:
    try:
        return dagcbor.decode_reference(raw)
    except dagcbor.DagCborError:
        return dagcbor.DagCborError


def fast_or_error(raw: bytes) -> object:
    try:
        return dagcbor.decode(raw)
    except dagcbor.DagCborError:
        return dagcbor.DagCborError


@given(values)
def test_fast_decoding_equals_the_reference_on_valid_input(value: Value) -> None:
    encoded = dagcbor.encode(value)
    decoded = dagcbor.decode(encoded)
    assert decoded == dagcbor.decode_reference(encoded) == value
    assert type(decoded) is type(value)


@given(values, st.data())
def test_fast_decoding_equals_the_reference_on_damaged_input(
    value: Value, data: st.DataObject
) -> None:
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
    raw = bytes(encoded)
    assert fast_or_error(raw) == reference_or_error(raw)


@given(st.binary(max_size=80))
def test_fast_decoding_equals_the_reference_on_garbage(raw: bytes) -> None:
    assert fast_or_error(raw) == reference_or_error(raw)


@pytest.mark.parametrize(
    "raw",
    [
        b"\x18\x05",  # non-canonical integer
        b"\xa2\x61b\x01\x61a\x02",  # keys out of order
        b"\xa2\x61a\x01\x61a\x02",  # duplicate key
        b"\xa1\x01\x02",  # integer key
        b"\xa1\x41a\x02",  # byte-string key
        b"\x01\x02",  # trailing bytes
        b"\x9f\x01\xff",  # indefinite-length array
        b"\x5f\x41a\xff",  # indefinite-length byte string
        b"\xc1\x00",  # tag 1 (a date to cbor2)
        b"\xc2\x49\x01\x00\x00\x00\x00\x00\x00\x00\x00",  # tag 2: a bignum
        b"\xd9\xd9\xf7\x01",  # tag 55799 (self-describe)
        b"\xd8\x2a\x41\x01",  # tag 42 without the 0x00 prefix
        b"\xd8\x2a\x42\x00\x01",  # tag 42 with a malformed CID
        b"\xd8\x2a\x61a",  # tag 42 around a string
        b"\xf7",  # undefined
        b"\xf0",  # a simple value
        b"\x81\xf8\x20",  # a simple value in a list
        b"\xa1\x61a\xf7",  # undefined in a map
        b"\xf9\x00\x00",  # half float
        b"\xfa\x00\x00\x00\x00",  # single float
        b"\xf9\x7e\x00",  # NaN
        b"\xfb\x7f\xf8\x00\x00\x00\x00\x00\x00",  # NaN as a double
        b"\x62\xc3\x28",  # invalid UTF-8
        b"\x81" * 70 + b"\x01",  # nested too deeply
    ],
)
def test_fast_decoding_refuses_what_the_reference_refuses(raw: bytes) -> None:
    with pytest.raises(dagcbor.DagCborError):
        dagcbor.decode_reference(raw)
    with pytest.raises(dagcbor.DagCborError):
        dagcbor.decode(raw)


def test_every_tag_cbor2_decodes_by_itself_gets_the_reference_answer() -> None:
    import cbor2

    hooked: set[int] = set()

    def hook(tag: cbor2.CBORTag, _immutable: bool) -> None:
        hooked.add(tag.tag)

    def head(tag: int) -> bytes:
        if tag < 24:
            return bytes([0xC0 | tag])
        if tag < 256:
            return bytes([0xD8, tag])
        return b"\xd9" + tag.to_bytes(2, "big")

    builtin = []
    for tag in range(1 << 16):
        with contextlib.suppress(Exception):
            cbor2.loads(head(tag) + b"\x00", tag_hook=hook)
        if tag not in hooked:
            builtin.append(tag)
    assert 2 in builtin and 55799 in builtin  # the probe works
    contents = [
        b"\x00",
        b"\x1b\x00\x00\x00\x01\x00\x00\x00\x00",
        b"\x61a",
        b"\x49\x01\x00\x00\x00\x00\x00\x00\x00\x00",
        b"\x44\x7f\x00\x00\x01",
        b"\x82\x01\x02",
        b"\x82\x01\x61a",
        b"\xa1\x61a\x01",
    ]
    for tag in builtin:
        for content in contents:
            for raw in (head(tag) + content, b"\x81" + head(tag) + content):
                assert fast_or_error(raw) == reference_or_error(raw), raw.hex()

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
    assert encoded == dag_cbor.encode(to_reference(value))  # type: ignore[arg-type]
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

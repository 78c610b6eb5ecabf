"""The sender's fast path: a body that ``inline()`` passes travels as the offload walk says."""

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from cim_place.comms.content import OFFLOAD_KEY, Attachment, ContentRef
from cim_place.comms.offload import Offloader, inline
from cim_place.objectstore.cid import RAW, make_cid
from cim_place.objectstore.dagcbor import Link

LINK = Link(make_cid(RAW, b"x"))
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=40),
    st.binary(max_size=40),
    st.just(LINK),
    st.just(b"\xff" * 50).map(bytearray),
    st.just(Attachment(b"attached")),
    st.just(ContentRef(LINK.cid, 10)),
    st.just({OFFLOAD_KEY: LINK, "size": -1}),
)
bodies = st.dictionaries(
    st.text(max_size=5),
    st.recursive(
        scalars,
        lambda inner: st.one_of(
            st.lists(inner, max_size=3),
            st.lists(inner, max_size=3).map(tuple),
            st.dictionaries(st.text(max_size=5), inner, max_size=3),
        ),
        max_leaves=8,
    ),
    max_size=5,
)


@given(bodies, st.integers(min_value=0, max_value=64))
async def test_an_inline_body_is_what_the_walk_returns(
    body: dict[str, Any], threshold: int
) -> None:
    if not inline(body, threshold):
        return  # the walk decides (it may upload)
    result = await Offloader(None, "n1").offload(body, threshold)
    assert result.body == body
    assert not result.offloaded


def test_what_needs_the_walk() -> None:
    assert inline({"a": "x" * 16, "b": [1, {"c": b"y" * 16}]}, 16)
    assert not inline({"a": "x" * 17}, 16)
    assert not inline({"a": "é" * 9}, 16)  # 18 UTF-8 bytes
    assert not inline({"a": [b"y" * 17]}, 16)
    assert not inline({"a": (1, 2)}, 16)
    assert not inline({"a": Attachment(b"z")}, 16)
    assert not inline({"a": {OFFLOAD_KEY: LINK, "size": 1}}, 16)

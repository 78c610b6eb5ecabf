"""The sender's fast path: a message is encoded at once only when the walk has nothing to do."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cim_place.cluster.nats.envelope import Content, decode
from cim_place.comms.content import OFFLOAD_KEY, Attachment, InvalidMessageError
from cim_place.comms.offload import Offloader, inline
from cim_place.comms.outgoing import Outgoing
from cim_place.comms.settings import ThresholdCache
from cim_place.objectstore import dagcbor
from cim_place.objectstore.cid import RAW, make_cid
from cim_place.objectstore.dagcbor import DagCborError, Link

LINK = Link(make_cid(RAW, b"x"))
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**64), max_value=2**64),
    st.floats(allow_infinity=False),
    st.text(max_size=40),
    st.binary(max_size=40),
    st.just(LINK),
    st.just(b"\xff" * 50).map(bytearray),
    st.just(Attachment(b"attached")),
    st.just({OFFLOAD_KEY: LINK, "size": -1}),
    st.just({OFFLOAD_KEY: LINK, "size": 1}),
    st.just(OFFLOAD_KEY),
)
bodies = st.dictionaries(
    st.one_of(st.text(max_size=5), st.just(OFFLOAD_KEY)),
    st.recursive(
        scalars,
        lambda inner: st.one_of(
            st.lists(inner, max_size=3),
            st.lists(inner, max_size=3).map(tuple),
            st.dictionaries(
                st.one_of(st.text(max_size=5), st.just(OFFLOAD_KEY)), inner, max_size=3
            ),
        ),
        max_leaves=8,
    ),
    max_size=5,
)


def outgoing(threshold: int) -> Outgoing:
    cache = ThresholdCache(None, fixed=threshold)  # type: ignore[arg-type]  # never read: fixed
    return Outgoing(None, cache, Offloader(None, "n1"), owner="alice", readers=("*",))


def has_marker_key(value: object) -> bool:
    if isinstance(value, dict):
        return OFFLOAD_KEY in value or any(has_marker_key(item) for item in value.values())
    if isinstance(value, list | tuple):
        return any(has_marker_key(item) for item in value)
    return False


@given(bodies, st.integers(min_value=0, max_value=300))
def test_the_fast_path_is_taken_exactly_when_inline_says_so(
    body: dict[str, Any], threshold: int
) -> None:
    content = Content("command", "Tick", body)
    ready = outgoing(threshold).inline(content, None, None)
    if ready is None:
        # The walk decides: something to offload or convert, or a marker to check, or a value
        # the codec refuses (the walk raises the same error then).
        return
    envelope, data = ready
    assert inline(body, threshold)
    assert envelope.content is content
    assert data == envelope.encode()
    assert decode(data).content.body == body


@given(bodies, st.integers(min_value=0, max_value=300))
def test_a_body_the_walk_would_leave_as_it_is_takes_the_fast_path(
    body: dict[str, Any], threshold: int
) -> None:
    if not inline(body, threshold) or has_marker_key(body):
        return
    try:
        dagcbor.encode(body)
    except DagCborError:
        return  # a value inline() lets through but the codec refuses (NaN, a huge int)
    assert outgoing(threshold).inline(Content("event", "Ticked", body), None, None) is not None


async def test_a_marker_passed_on_is_checked_by_the_walk() -> None:
    sender = outgoing(64)
    bad = Content("command", "T", {"doc": {OFFLOAD_KEY: LINK, "size": -1}})
    assert sender.inline(bad, None, None) is None
    with pytest.raises(InvalidMessageError, match="size"):
        await sender.prepare(bad, None, None, None)
    good = Content("command", "T", {"doc": {OFFLOAD_KEY: LINK, "size": 3}})
    envelope, data = await sender.prepare(good, None, None, None)
    assert data is None and envelope.content.body == good.body


def test_long_values_and_attachments_take_the_walk() -> None:
    sender = outgoing(16)
    assert sender.inline(Content("command", "T", {"a": b"y" * 17}), None, None) is None
    attached = Content("command", "T", {"a": Attachment(b"z")})  # type: ignore[dict-item]
    assert sender.inline(attached, None, None) is None
    assert sender.inline(Content("command", "T", {"a": (1, 2)}), None, None) is None  # type: ignore[dict-item]
    # Many short values above the threshold together: inline() decides, no walk needed.
    many = {str(n): "x" * 8 for n in range(8)}
    ready = sender.inline(Content("command", "T", many), None, None)
    assert ready is not None and len(ready[1]) > 16

"""The message envelope: round trips, causation, headers, and refusal of foreign bytes."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cim_place.cluster.nats import envelope
from cim_place.cluster.nats.envelope import Content, Envelope, EnvelopeError
from cim_place.cluster.nats.subjects import InvalidSubjectError, Subjects, outbox_stream
from cim_place.objectstore import cid as cids
from cim_place.objectstore import dagcbor
from cim_place.objectstore.dagcbor import Link

bodies = st.dictionaries(
    st.text(min_size=1, max_size=10),
    st.one_of(
        st.integers(min_value=0, max_value=2**40),
        st.text(max_size=20),
        st.binary(max_size=8).map(lambda b: Link(cids.make_cid(cids.RAW, b))),
    ),
    max_size=5,
)
contents = st.builds(
    Content, st.sampled_from(envelope.KINDS), st.text(min_size=1, max_size=20), bodies
)
metadata = st.dictionaries(st.text(max_size=10), st.text(max_size=10), max_size=4)


@given(contents, st.text(max_size=20), metadata)
def test_round_trip(content: Content, owner: str, meta: dict[str, str]) -> None:
    message = Envelope.new(content, owner=owner, metadata=meta)
    decoded = envelope.decode(message.encode(), sequence=7)
    assert decoded == message.with_sequence(7)


@given(contents, contents)
def test_a_caused_message_keeps_the_correlation(first: Content, second: Content) -> None:
    cause = Envelope.new(first, owner="alice")
    effect = cause.caused(second)
    assert effect.correlation_id == cause.correlation_id == cause.id
    assert effect.causation_id == cause.id
    assert effect.id != cause.id
    assert effect.owner == "alice"
    assert envelope.decode(effect.encode()) == effect


def test_headers_let_tools_filter_without_decoding() -> None:
    cause = Envelope.new(Content("command", "AddDocument"), owner="alice")
    effect = cause.caused(Content("event", "DocumentAdded"))
    headers = effect.headers()
    assert headers["Nats-Msg-Id"] == effect.id
    assert headers["Cim-Correlation-Id"] == cause.id
    assert headers["Cim-Causation-Id"] == cause.id
    assert headers["Cim-Owner"] == "alice"
    assert headers["Cim-Type"] == "DocumentAdded"


def test_cids_in_bodies_are_real_links() -> None:
    root = cids.make_cid(cids.RAW, b"hello world")
    message = Envelope.new(Content("event", "ObjectStored", {"root": Link(root)}), owner="n1")
    assert b"\xd8\x2a" in message.encode()  # tag 42
    assert envelope.decode(message.encode()).content.body["root"] == Link(root)


@given(st.binary(max_size=200))
def test_garbage_is_an_envelope_error(garbage: bytes) -> None:
    with contextlib.suppress(EnvelopeError):
        envelope.decode(garbage)


@pytest.mark.parametrize(
    "doc",
    [
        b"\xa0",  # empty map
        b"\x01",  # not a map
        # content.kind unhashable, metadata not strings, body not a map, id empty:
        dagcbor.encode(
            {
                "id": "a",
                "correlation_id": "a",
                "owner": "",
                "content": {"kind": ["event"], "type": "T"},
            }
        ),
        dagcbor.encode(
            {
                "id": "a",
                "correlation_id": "a",
                "owner": "",
                "metadata": {"k": 1},
                "content": {"kind": "event", "type": "T"},
            }
        ),
        dagcbor.encode(
            {
                "id": "a",
                "correlation_id": "a",
                "owner": "",
                "content": {"kind": "event", "type": "T", "body": []},
            }
        ),
        dagcbor.encode(
            {
                "id": "",
                "correlation_id": "a",
                "owner": "",
                "content": {"kind": "event", "type": "T"},
            }
        ),
    ],
)
def test_missing_fields_are_refused(doc: bytes) -> None:
    with pytest.raises(EnvelopeError):
        envelope.decode(doc)


def test_subjects_are_built_in_one_place() -> None:
    subjects = Subjects()
    assert subjects.event("leaf-1", "ObjectStored") == "cim.place.evt.leaf-1.ObjectStored"
    assert subjects.events_of("leaf-1") == "cim.place.evt.leaf-1.>"
    assert subjects.task("leaf-1") == "cim.place.task.leaf-1"
    assert subjects.block_get("leaf-1") == "cim.place.blk.leaf-1.get"
    assert Subjects("acme.cim").api("status") == "acme.cim.api.status"
    assert outbox_stream("leaf-1") == "OUTBOX_leaf-1"


@pytest.mark.parametrize("node", ["", "a.b", "a b", "x*", "y>", "z" * 65])
def test_unusable_node_ids_are_refused(node: str) -> None:
    with pytest.raises(InvalidSubjectError, match="node id"):
        Subjects().task(node)


def test_unusable_prefix_is_refused() -> None:
    with pytest.raises(InvalidSubjectError, match="prefix"):
        Subjects("cim..place")

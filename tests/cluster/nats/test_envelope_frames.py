"""The envelope's framed encoding of a new message is the codec's encoding of the whole document."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from cim_place.cluster.nats import envelope
from cim_place.cluster.nats.envelope import Content, Envelope, _envelope
from cim_place.objectstore import cid as cids
from cim_place.objectstore import dagcbor
from cim_place.objectstore.dagcbor import Link

values = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(min_value=-(2**63), max_value=2**63),
        st.floats(allow_nan=False, allow_infinity=False),
        st.text(max_size=30),
        st.binary(max_size=30),
        st.binary(max_size=8).map(lambda b: Link(cids.make_cid(cids.RAW, b))),
    ),
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=10,
)
bodies = st.dictionaries(st.text(max_size=10), values, max_size=6)
ids = st.one_of(st.text(min_size=1, max_size=300), st.text("0123456789abcdef", max_size=300))


def whole(message: Envelope) -> bytes:
    """The codec's encoding of the full document, as the envelope was encoded before frames."""
    return dagcbor.encode(
        {
            "id": message.id,
            "correlation_id": message.correlation_id,
            "causation_id": message.causation_id,
            "owner": message.owner,
            "metadata": dict(message.metadata),
            "content": {
                "kind": message.content.kind,
                "type": message.content.type,
                "body": dict(message.content.body),
            },
        }
    )


@given(
    st.sampled_from(envelope.KINDS), st.text(min_size=1, max_size=40), st.text(max_size=40), bodies
)
def test_a_new_message_encodes_as_the_whole_document(
    kind: envelope.Kind, content_type: str, owner: str, body: dict[str, dagcbor.Value]
) -> None:
    message = Envelope.new(Content(kind, content_type, body), owner=owner)
    assert message.encode() == whole(message)
    assert envelope.decode(message.encode()) == message


@given(ids, st.text(max_size=20), bodies)
def test_any_id_encodes_as_the_whole_document(
    message_id: str, owner: str, body: dict[str, dagcbor.Value]
) -> None:
    content = Content("command", "Tick", body)
    message = _envelope(message_id, message_id, None, owner, content, {}, None)
    assert message.encode() == whole(message)
    caused = message.caused(content)
    assert caused.encode() == whole(caused)

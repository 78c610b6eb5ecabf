"""One codec for every event and task body: same bytes as the hand-written bodies it replaced.

``VECTORS`` are envelopes encoded by the per-class ``body()`` methods before the generic codec
(``cim_place.cluster.nats.bodies``) replaced them, captured once and fixed here; the property
tests compare the codec with those methods, kept as an oracle in ``legacy_codec.py``, on any
event, and the decoder with the old field readers on any body.
"""

from __future__ import annotations

from typing import Any

import legacy_codec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from cim_place.cluster.events.types import (
    EVENT_TYPES,
    EventBodyError,
    InventoryDigest,
    NodeJoined,
    NodeLeft,
    ObjectRemoved,
    ObjectStored,
    TaskCompleted,
    TaskFailed,
    event_content,
    parse_event,
)
from cim_place.cluster.nats.envelope import Content, Envelope, decode
from cim_place.cluster.tasks.model import Task, TaskFormatError, decode_task, task_envelope
from cim_place.objectstore import dagcbor
from cim_place.objectstore.cid import RAW, make_cid
from cim_place.objectstore.dagcbor import Link


def cid_of(data: bytes) -> bytes:
    return make_cid(RAW, data)


VECTORS: list[tuple[Any, str]] = [
    (
        ObjectStored(
            root=cid_of(b"object 1"),
            size=1001,
            blocks=2,
            volume="v1",
            owner="alice",
            name="doc-1",
            metadata={"i": "1"},
        ),
        "a66269646469642d31656f776e6572666c6561662d6167636f6e74656e74a364626f6479a7646e616d6565646f632d3164726f6f74d82a582500015512207591168325ee4e53348662e67ddfe78704595cdbee277397afd26ff6fa8a95546473697a651903e9656f776e657265616c69636566626c6f636b730266766f6c756d65627631686d65746164617461a161696131646b696e64656576656e7464747970656c4f626a65637453746f726564686d65746164617461a1616d61316c636175736174696f6e5f69646763617573652d316e636f7272656c6174696f6e5f696466636f72722d31",
    ),
    (
        ObjectRemoved(
            root=cid_of(b"gone"),
            size=3,
            blocks=1,
            volume="v2",
            owner="bob",
            name=None,
            metadata={},
        ),
        "a66269646469642d31656f776e6572666c6561662d6167636f6e74656e74a364626f6479a7646e616d65f664726f6f74d82a58250001551220283bb9deef02e6843abfb538efa1eca70801bd8a701c3f98191e1234963392476473697a6503656f776e657263626f6266626c6f636b730166766f6c756d65627632686d65746164617461a0646b696e64656576656e7464747970656d4f626a65637452656d6f766564686d65746164617461a1616d61316c636175736174696f6e5f69646763617573652d316e636f7272656c6174696f6e5f696466636f72722d31",
    ),
    (
        InventoryDigest(
            volume="v1",
            pins=2,
            size=2048,
            digest=b"\xc9\x02\x80h\xd2\xf4T\xec\xa2O8t\x03f\xd7P\xb0\xe3\x1a\x86\xbf\xe2\x00G\xa6\xc07\xfe\xc3;vb",
            taken_at=1700000000.5,
        ),
        "a66269646469642d31656f776e6572666c6561662d6167636f6e74656e74a364626f6479a56470696e73026473697a65190800666469676573745820c9028068d2f454eca24f38740366d750b0e31a86bfe20047a6c037fec33b766266766f6c756d656276316874616b656e5f6174fb41d954fc40200000646b696e64656576656e7464747970656f496e76656e746f7279446967657374686d65746164617461a1616d61316c636175736174696f6e5f69646763617573652d316e636f7272656c6174696f6e5f696466636f72722d31",
    ),
    (
        NodeJoined(
            node="leaf-a",
            labels={"region": "eu", "zone": "eu-1", "host": "h1"},
            tags=("ssd",),
            volumes=("v1", "v2"),
            version="0.1.0",
            started_at=1700000000.0,
        ),
        "a66269646469642d31656f776e6572666c6561662d6167636f6e74656e74a364626f6479a6646e6f6465666c6561662d6164746167738163737364666c6162656c73a364686f7374626831647a6f6e656465752d3166726567696f6e6265756776657273696f6e65302e312e3067766f6c756d6573826276316276326a737461727465645f6174fb41d954fc40000000646b696e64656576656e7464747970656a4e6f64654a6f696e6564686d65746164617461a1616d61316c636175736174696f6e5f69646763617573652d316e636f7272656c6174696f6e5f696466636f72722d31",
    ),
    (
        NodeLeft(node="leaf-a", reason="shutdown"),
        "a66269646469642d31656f776e6572666c6561662d6167636f6e74656e74a364626f6479a2646e6f6465666c6561662d6166726561736f6e6873687574646f776e646b696e64656576656e746474797065684e6f64654c656674686d65746164617461a1616d61316c636175736174696f6e5f69646763617573652d316e636f7272656c6174696f6e5f696466636f72722d31",
    ),
    (
        TaskCompleted(
            task_id="t-1",
            action="fetch",
            node="leaf-a",
            root=cid_of(b"x"),
            volume="v1",
            attempts=1,
            duration=0.25,
            result={"bytes_fetched": 10},
        ),
        "a66269646469642d31656f776e6572666c6561662d6167636f6e74656e74a364626f6479a8646e6f6465666c6561662d6164726f6f74d82a582500015512202d711642b726b04401627ca9fbac32f5c8530fb1903cc4db02258717921a488166616374696f6e65666574636866726573756c74a16d62797465735f666574636865640a66766f6c756d65627631677461736b5f696463742d3168617474656d70747301686475726174696f6efb3fd0000000000000646b696e64656576656e7464747970656d5461736b436f6d706c65746564686d65746164617461a1616d61316c636175736174696f6e5f69646763617573652d316e636f7272656c6174696f6e5f696466636f72722d31",
    ),
    (
        TaskFailed(
            task_id="t-2",
            action="drop",
            node="leaf-a",
            root=None,
            volume=None,
            attempts=5,
            reason="full",
            permanent=True,
            duration=0.0,
        ),
        "a66269646469642d31656f776e6572666c6561662d6167636f6e74656e74a364626f6479a9646e6f6465666c6561662d6164726f6f74f666616374696f6e6464726f7066726561736f6e6466756c6c66766f6c756d65f6677461736b5f696463742d3268617474656d70747305686475726174696f6efb0000000000000000697065726d616e656e74f5646b696e64656576656e7464747970656a5461736b4661696c6564686d65746164617461a1616d61316c636175736174696f6e5f69646763617573652d316e636f7272656c6174696f6e5f696466636f72722d31",
    ),
    (
        ObjectStored(
            root=cid_of(b"object 2"),
            size=1002,
            blocks=3,
            volume="v9",
            owner="alice",
            name="doc-2",
            metadata={"i": "2"},
        ),
        "a66269646469642d31656f776e6572666c6561662d6167636f6e74656e74a364626f6479a7646e616d6565646f632d3264726f6f74d82a5825000155122048d2552fe79c09b22b2eb20994b2d79da7d8b680809ccb6b93198f8c7f691c546473697a651903ea656f776e657265616c69636566626c6f636b730366766f6c756d65627639686d65746164617461a161696132646b696e64656576656e7464747970656c4f626a65637453746f726564686d65746164617461a1616d61316c636175736174696f6e5f69646763617573652d316e636f7272656c6174696f6e5f696466636f72722d31",
    ),
    (
        ObjectStored(
            root=cid_of(b"y"),
            size=0,
            blocks=0,
            volume="",
            owner="",
            name=None,
            metadata={},
        ),
        "a66269646469642d31656f776e6572666c6561662d6167636f6e74656e74a364626f6479a7646e616d65f664726f6f74d82a58250001551220a1fce4363854ff888cff4b8e7875d600c2682390412a8cf79b37d0b11148b0fa6473697a6500656f776e65726066626c6f636b730066766f6c756d6560686d65746164617461a0646b696e64656576656e7464747970656c4f626a65637453746f726564686d65746164617461a1616d61316c636175736174696f6e5f69646763617573652d316e636f7272656c6174696f6e5f696466636f72722d31",
    ),
    (
        NodeJoined(node="n", labels={}, tags=(), volumes=(), version="", started_at=0.0),
        "a66269646469642d31656f776e6572666c6561662d6167636f6e74656e74a364626f6479a6646e6f6465616e647461677380666c6162656c73a06776657273696f6e6067766f6c756d6573806a737461727465645f6174fb0000000000000000646b696e64656576656e7464747970656a4e6f64654a6f696e6564686d65746164617461a1616d61316c636175736174696f6e5f69646763617573652d316e636f7272656c6174696f6e5f696466636f72722d31",
    ),
    (
        NodeLeft(node="n", reason=""),
        "a66269646469642d31656f776e6572666c6561662d6167636f6e74656e74a364626f6479a2646e6f6465616e66726561736f6e60646b696e64656576656e746474797065684e6f64654c656674686d65746164617461a1616d61316c636175736174696f6e5f69646763617573652d316e636f7272656c6174696f6e5f696466636f72722d31",
    ),
    (
        TaskCompleted(
            task_id="t",
            action="verify",
            node="n",
            root=None,
            volume=None,
            attempts=0,
            duration=3,
            result={},
        ),
        "a66269646469642d31656f776e6572666c6561662d6167636f6e74656e74a364626f6479a8646e6f6465616e64726f6f74f666616374696f6e6676657269667966726573756c74a066766f6c756d65f6677461736b5f6964617468617474656d70747300686475726174696f6e03646b696e64656576656e7464747970656d5461736b436f6d706c65746564686d65746164617461a1616d61316c636175736174696f6e5f69646763617573652d316e636f7272656c6174696f6e5f696466636f72722d31",
    ),
    (
        TaskFailed(
            task_id="t",
            action=None,
            node="n",
            root=cid_of(b"z"),
            volume="v",
            attempts=2,
            reason="rrrrrrrrrrrrrrrrrrrrrrrrrrrrrr",
            permanent=False,
            duration=1.5,
        ),
        "a66269646469642d31656f776e6572666c6561662d6167636f6e74656e74a364626f6479a9646e6f6465616e64726f6f74d82a58250001551220594e519ae499312b29433b7dd8a97ff068defcba9755b6d5d00e84c524d67b0666616374696f6ef666726561736f6e781e72727272727272727272727272727272727272727272727272727272727266766f6c756d656176677461736b5f6964617468617474656d70747302686475726174696f6efb3ff8000000000000697065726d616e656e74f4646b696e64656576656e7464747970656a5461736b4661696c6564686d65746164617461a1616d61316c636175736174696f6e5f69646763617573652d316e636f7272656c6174696f6e5f696466636f72722d31",
    ),
    (
        Task(
            id="ta86f1282212719282f9db848b26be8c9",
            kind="fetch",
            node="n1",
            root=cid_of(b"x"),
            holders=("n2", "n3"),
            volume="disk1",
            generation=3,
            reason="policy web: 3 copies",
            created_by="controller-1",
            attempt=1,
            name="doc",
            owner="alice",
            metadata={"a": "b"},
        ),
        "a66269647821746138366631323832323132373139323832663964623834386232366265386339656f776e65726c636f6e74726f6c6c65722d3167636f6e74656e74a364626f6479ac646b696e64656665746368646e616d6563646f63646e6f6465626e3164726f6f74d82a582500015512202d711642b726b04401627ca9fbac32f5c8530fb1903cc4db02258717921a4881656f776e657265616c69636566726561736f6e74706f6c696379207765623a203320636f7069657366766f6c756d65656469736b3167686f6c6465727382626e32626e33677461736b5f69647821746138366631323832323132373139323832663964623834386232366265386339686d65746164617461a1616161626a637265617465645f62796c636f6e74726f6c6c65722d316a67656e65726174696f6e03646b696e6467636f6d6d616e6464747970656b46657463684f626a656374686d65746164617461a06c636175736174696f6e5f6964f66e636f7272656c6174696f6e5f69647821746138366631323832323132373139323832663964623834386232366265386339",
    ),
    (
        Task(
            id="t53b6d67c8aba4a367ba480eb2f033788",
            kind="drop",
            node="n1",
            root=cid_of(b"x"),
            holders=(),
            volume=None,
            generation=0,
            reason="",
            created_by="",
            attempt=1,
            name=None,
            owner="",
            metadata={},
        ),
        "a66269647821743533623664363763386162613461333637626134383065623266303333373838656f776e65726067636f6e74656e74a364626f6479ac646b696e646464726f70646e616d65f6646e6f6465626e3164726f6f74d82a582500015512202d711642b726b04401627ca9fbac32f5c8530fb1903cc4db02258717921a4881656f776e65726066726561736f6e6066766f6c756d65f667686f6c6465727380677461736b5f69647821743533623664363763386162613461333637626134383065623266303333373838686d65746164617461a06a637265617465645f6279606a67656e65726174696f6e00646b696e6467636f6d6d616e6464747970656a44726f704f626a656374686d65746164617461a06c636175736174696f6e5f6964f66e636f7272656c6174696f6e5f69647821743533623664363763386162613461333637626134383065623266303333373838",
    ),
]
"""(event or task, hex of its envelope as the hand-written encoder wrote it)."""


def envelope_of(item: Any) -> Envelope:
    if isinstance(item, Task):
        return task_envelope(item)
    return Envelope("id-1", "corr-1", "cause-1", "leaf-a", event_content(item), {"m": "1"})


@pytest.mark.parametrize(("item", "wire"), VECTORS, ids=lambda v: type(v).__name__)
def test_every_vector_encodes_and_decodes_as_before(item: Any, wire: str) -> None:
    data = envelope_of(item).encode()
    assert data.hex() == wire
    decoded = decode(bytes.fromhex(wire))
    if isinstance(item, Task):
        assert decode_task(decoded) == item
    else:
        assert parse_event(decoded) == item


def test_the_vectors_cover_every_event_type_they_predate() -> None:
    covered = {type(item).TYPE for item, _ in VECTORS if not isinstance(item, Task)}
    assert covered == legacy_codec.LEGACY_TYPES <= set(EVENT_TYPES)


# -- any event: same bytes as the old body(), same answer as the old readers ---------------------

texts = st.text(max_size=8)
counts = st.integers(min_value=0, max_value=2**64 - 1)
seconds = st.one_of(
    st.floats(min_value=0, allow_nan=False, allow_infinity=False),
    st.integers(min_value=0, max_value=2**53),
)
cids = st.binary(max_size=16).map(lambda b: make_cid(RAW, b))
str_maps = st.dictionaries(texts, texts, max_size=3)
str_tuples = st.lists(texts, max_size=3).map(tuple)
actions = st.sampled_from(["fetch", "drop", "verify"])
results = st.dictionaries(texts, st.one_of(counts, texts, st.none()), max_size=3)

events = st.one_of(
    *(
        st.builds(
            cls,
            root=cids,
            size=counts,
            blocks=counts,
            volume=texts,
            owner=texts,
            name=st.none() | texts,
            metadata=str_maps,
        )
        for cls in (ObjectStored, ObjectRemoved)
    ),
    st.builds(
        InventoryDigest,
        volume=texts,
        pins=counts,
        size=counts,
        digest=st.binary(min_size=32, max_size=32),
        taken_at=seconds,
    ),
    st.builds(
        NodeJoined,
        node=texts,
        labels=str_maps,
        tags=str_tuples,
        volumes=str_tuples,
        version=texts,
        started_at=seconds,
    ),
    st.builds(NodeLeft, node=texts, reason=texts),
    st.builds(
        TaskCompleted,
        task_id=texts,
        action=actions,
        node=texts,
        root=st.none() | cids,
        volume=st.none() | texts,
        attempts=counts,
        duration=seconds,
        result=results,
    ),
    st.builds(
        TaskFailed,
        task_id=texts,
        action=st.none() | actions,
        node=texts,
        root=st.none() | cids,
        volume=st.none() | texts,
        attempts=counts,
        reason=texts,
        permanent=st.booleans(),
        duration=seconds,
    ),
)


@given(events)
def test_any_event_encodes_to_the_bytes_of_the_hand_written_body(event: Any) -> None:
    body = event_content(event).body
    assert dagcbor.encode(dict(body)) == dagcbor.encode(legacy_codec.body(event))
    envelope = Envelope("i", "c", None, "o", event_content(event))
    assert parse_event(decode(envelope.encode())) == legacy_codec.from_body(
        type(event), decode(envelope.encode()).content.body
    )


def outcome(parse: Any) -> object:
    try:
        return parse()
    except EventBodyError as error:
        return ("error", str(error))


field_values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-5, max_value=2**40),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=6),
    st.binary(max_size=6),
    st.binary(min_size=32, max_size=32),
    st.just(Link(make_cid(RAW, b"x"))),
    st.sampled_from(["fetch", "drop", "verify"]),
    st.lists(st.one_of(st.text(max_size=3), st.integers()), max_size=2),
    st.dictionaries(st.text(max_size=3), st.one_of(st.text(max_size=3), st.integers()), max_size=2),
)


def read(cls: Any, body: dict[str, Any]) -> object:
    return outcome(
        lambda: parse_event(Envelope("i", "c", None, "o", Content("event", cls.TYPE, body)))
    )


@given(events, st.lists(field_values, max_size=3), st.booleans(), st.data())
def test_any_body_reads_as_the_old_readers_read_it(
    event: Any, values: list[Any], keep: bool, data: st.DataObject
) -> None:
    cls = type(event)
    keys = list(legacy_codec.body(event))
    # Replace some fields by foreign values, or send only those, as a broken sender might.
    changed = {data.draw(st.sampled_from(keys)): value for value in values}
    body = {**legacy_codec.body(event), **changed} if keep else changed
    old = outcome(lambda: legacy_codec.from_body(cls, body))
    new = read(cls, body)
    if not isinstance(old, tuple):
        assert new == old
    elif not isinstance(new, tuple):
        # The one deliberate change: a field with a default may be absent (an older sender).
        assert "is missing field" in old[1]
        filled = {**legacy_codec.body(new), **body}
        assert legacy_codec.from_body(cls, filled) == new
    # Both refuse: with several fields wrong, each may name a different one first.


@given(events, field_values, st.data())
def test_one_wrong_field_gets_the_old_message(event: Any, value: Any, data: st.DataObject) -> None:
    cls = type(event)
    body = legacy_codec.body(event)
    body[data.draw(st.sampled_from(list(body)))] = value
    old = outcome(lambda: legacy_codec.from_body(cls, body))
    new = read(cls, body)
    assert new == old


# -- tasks: same bytes as the old Task.body(), read back by the same codec ------------------------

node_ids = st.from_regex(r"[A-Za-z0-9_-]{1,64}", fullmatch=True)
tasks = st.builds(
    Task.create,
    st.sampled_from(["fetch", "drop", "verify"]),
    node_ids,
    cids,
    generation=counts,
    holders=st.lists(node_ids, max_size=4),
    volume=st.none() | texts,
    reason=texts,
    created_by=texts,
    name=st.none() | texts,
    owner=texts,
    metadata=str_maps,
)


@given(tasks)
def test_any_task_encodes_to_the_bytes_of_the_hand_written_body(task: Task) -> None:
    assert dagcbor.encode(task.body()) == dagcbor.encode(legacy_codec.task_body(task))
    assert decode_task(decode(task_envelope(task).encode())) == task


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ({"holders": ["n2", "a b"]}, "DropObject.holders: node id 'a b' is not usable"),
        ({"holders": ["n2"] * 1025}, "DropObject.holders has 1025 items; at most 1024"),
        ({"holders": "n2"}, "DropObject.holders must be a list"),
        ({"generation": -1}, "DropObject.generation must be a non-negative integer, got -1"),
        ({"metadata": {"a": 1}}, "DropObject.metadata must map strings to strings"),
        ({"node": None}, "DropObject.node must be a string, got NoneType"),
    ],
)
def test_a_bad_task_field_is_named(change: dict[str, Any], problem: str) -> None:
    body = {**Task.create("drop", "n1", cid_of(b"x"), generation=1).body(), **change}
    envelope = Envelope("t1", "t1", None, "x", Content("command", "DropObject", body))
    with pytest.raises(TaskFormatError, match=problem):
        decode_task(decode(envelope.encode()))


def test_a_rate_limit_travels_only_when_set() -> None:
    base = Task.create("repair", "n1", cid_of(b"x"), generation=2, holders=("n2",))
    assert "rate_limit" not in base.body()
    limited = Task.create(
        "repair", "n1", cid_of(b"x"), generation=2, holders=("n2",), rate_limit=2 << 20
    )
    assert limited.body()["rate_limit"] == 2 << 20
    assert decode_task(decode(task_envelope(limited).encode())) == limited
    assert decode_task(decode(task_envelope(base).encode())).rate_limit is None


@pytest.mark.parametrize("rate", [0, -1])
def test_a_task_with_a_rate_limit_below_one_byte_per_second_is_refused(rate: int) -> None:
    task = Task.create("repair", "n1", cid_of(b"x"), generation=2, holders=("n2",), rate_limit=7)
    envelope = task_envelope(task)
    body = {**envelope.content.body, "rate_limit": rate}
    forged = Envelope(
        envelope.id,
        envelope.correlation_id,
        None,
        envelope.owner,
        Content("command", envelope.content.type, body),
    )
    with pytest.raises(TaskFormatError, match="rate_limit must be a"):
        decode_task(decode(forged.encode()))

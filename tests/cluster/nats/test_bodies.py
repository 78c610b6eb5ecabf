"""The body codec: what declaring a dataclass gives, beyond the events that exist today."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Annotated, ClassVar

import pytest

from cim_place.cluster.events.types import EVENT_TYPES, Event, EventBodyError, parse_event
from cim_place.cluster.nats.bodies import BodyCodec, Check, CidLink, MaxItems, Size, wire
from cim_place.cluster.nats.envelope import Content, Envelope, EnvelopeError, decode
from cim_place.objectstore.cid import RAW, make_cid
from cim_place.objectstore.dagcbor import Link

ROOT = make_cid(RAW, b"x")


def even(n: int) -> None:
    if n % 2:
        raise ValueError(f"{n} is odd")


@dataclass(frozen=True, slots=True)
class Extent:
    offset: int
    length: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Sample:
    root: CidLink
    hash: Annotated[bytes, Size(4, "a checksum")]
    extents: tuple[Extent, ...] = ()
    first: Extent | None = None
    pairs: Annotated[tuple[Annotated[int, Check(even)], ...], MaxItems(3)] = ()
    labels: Mapping[str, str] = field(default_factory=dict)
    blocks: tuple[CidLink, ...] = ()
    note: str = field(default="", metadata=wire("n"))
    local: int = field(default=7, metadata=wire(None))


CODEC = BodyCodec(Sample)
SAMPLE = Sample(
    root=ROOT,
    hash=b"abcd",
    extents=(Extent(0, 10), Extent(10, 5)),
    first=Extent(0, 10),
    pairs=(2, 4),
    labels={"zone": "z1"},
    blocks=(ROOT, ROOT),
    note="hi",
    local=9,
)


def round_trip(body: dict[str, object]) -> Sample:
    envelope = Envelope.new(Content("event", "Sample", body), owner="x")  # type: ignore[arg-type]
    return CODEC.decode(decode(envelope.encode()).content.body)


def test_nested_dataclasses_renamed_and_local_fields() -> None:
    body = CODEC.encode(SAMPLE)
    assert body == {
        "root": Link(ROOT),
        "hash": b"abcd",
        "extents": [{"offset": 0, "length": 10}, {"offset": 10, "length": 5}],
        "first": {"offset": 0, "length": 10},
        "pairs": [2, 4],
        "labels": {"zone": "z1"},
        "blocks": [Link(ROOT), Link(ROOT)],
        "n": "hi",
    }
    decoded = round_trip(body)
    assert decoded.local == 7  # does not travel: the default
    assert (decoded.root, decoded.extents, decoded.first, decoded.blocks, decoded.note) == (
        ROOT,
        SAMPLE.extents,
        SAMPLE.first,
        (ROOT, ROOT),
        "hi",
    )
    assert CODEC.values(decode_body(body))[:2] == (ROOT, b"abcd")


def decode_body(body: dict[str, object]) -> dict[str, object]:
    envelope = Envelope.new(Content("event", "Sample", body), owner="x")  # type: ignore[arg-type]
    return dict(decode(envelope.encode()).content.body)


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ({"hash": b"abc"}, "Sample.hash must be 4 bytes (a checksum), got b'abc'"),
        ({"extents": [{"offset": 1}]}, "Sample.extents body is missing field 'length'"),
        ({"first": {"offset": -1, "length": 1}}, "Sample.first.offset must be a non-negative"),
        ({"pairs": [2, 3]}, "Sample.pairs: 3 is odd"),
        ({"pairs": [2, 4, 6, 8]}, "Sample.pairs has 4 items; at most 3 allowed"),
        ({"labels": {"a": 1}}, "Sample.labels must map strings to strings"),
        ({"n": 5}, "Sample.n must be a string, got int"),
        ({"root": None}, "Sample.root must be a CID link"),
        ({"blocks": [Link(ROOT), b"raw"]}, "Sample.blocks must be a CID link"),
    ],
)
def test_each_problem_is_named(change: dict[str, object], problem: str) -> None:
    with pytest.raises(EnvelopeError, match=problem.replace("(", r"\(").replace(")", r"\)")):
        round_trip({**CODEC.encode(SAMPLE), **change})


def test_a_field_without_default_is_required() -> None:
    body = CODEC.encode(SAMPLE)
    del body["hash"]
    with pytest.raises(EnvelopeError, match="Sample body is missing field 'hash'"):
        round_trip(body)


def test_unsupported_annotations_are_refused_when_declared() -> None:
    @dataclass(frozen=True)
    class Odd:
        when: complex

    with pytest.raises(TypeError, match="no body codec"):
        BodyCodec(Odd)


def test_declaring_an_event_is_all_it_takes() -> None:
    @dataclass(frozen=True, slots=True, kw_only=True)
    class ReplicaProbed(Event):
        TYPE: ClassVar[str] = "ReplicaProbed"
        root: CidLink
        volume: str
        found_at: float
        detail: str = ""

    try:
        assert EVENT_TYPES["ReplicaProbed"] is ReplicaProbed
        event = ReplicaProbed(root=ROOT, volume="v1", found_at=1.5)
        envelope = Envelope.new(Content("event", event.TYPE, event.body()), owner="x")
        assert parse_event(decode(envelope.encode())) == event
        bad = Envelope.new(Content("event", "ReplicaProbed", {"volume": "v1"}), owner="x")
        with pytest.raises(EventBodyError, match="ReplicaProbed body is missing field 'root'"):
            parse_event(decode(bad.encode()))
        with pytest.raises(TypeError, match="declared by"):

            @dataclass(frozen=True, slots=True, kw_only=True)
            class Again(Event):
                TYPE: ClassVar[str] = "ReplicaProbed"

    finally:
        EVENT_TYPES.pop("ReplicaProbed", None)

"""The checks every event and node record passes before the controller believes it."""

from __future__ import annotations

import itertools
import json
import math
import time

import pytest

from cim_place.cluster.controller.projection import Projection
from cim_place.cluster.events.readers import source_of
from cim_place.cluster.events.types import (
    AnyEvent,
    InventoryDigest,
    NodeJoined,
    ObjectStored,
    TaskCompleted,
    event_envelope,
)
from cim_place.cluster.events.validate import Rejection, check_event, check_source
from cim_place.cluster.nats.envelope import Content, Envelope
from cim_place.cluster.state.nodes import NodeRecord, VolumeStatus, check_node_record
from cim_place.objectstore.cid import RAW, make_cid
from cim_place.objectstore.dagcbor import Link

A = make_cid(RAW, b"object a")
NOW = time.time()
_sequence = itertools.count(1)


def envelope(event: AnyEvent, node: str = "n1") -> Envelope:
    return event_envelope(event, owner=node).with_sequence(next(_sequence))


def stored(**changes: object) -> ObjectStored:
    fields: dict[str, object] = {
        "root": A,
        "size": 1024,
        "blocks": 1,
        "volume": "v1",
        "owner": "alice",
        "name": "report.pdf",
        "metadata": {"team": "web"},
    }
    fields.update(changes)
    return ObjectStored(**fields)  # type: ignore[arg-type]


def with_body(event: AnyEvent, **changes: object) -> Envelope:
    """``event``'s envelope with body fields replaced by anything (what a forger can send)."""
    base = envelope(event)
    body = dict(base.content.body)
    body.update(changes)  # type: ignore[arg-type]
    return Envelope(
        base.id,
        base.correlation_id,
        None,
        base.owner,
        Content("event", base.content.type, body),
        sequence=base.sequence,
    )


def reason(env: Envelope, node: str = "n1") -> str | None:
    found = check_event(env, node, now=NOW)
    return None if found is None else found.reason


def test_a_good_event_passes() -> None:
    assert reason(envelope(stored())) is None
    digest = InventoryDigest(volume="v1", pins=1, size=1, digest=b"\0" * 32, taken_at=NOW)
    assert reason(envelope(digest)) is None


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"size": -5}, "malformed"),
        ({"size": 1 << 63}, "out-of-range"),
        ({"blocks": "many"}, "malformed"),
        ({"root": Link(b"\x01\x55\x12\x20" + b"x" * 3)}, "bad-cid"),
        ({"root": "bafy"}, "malformed"),
        ({"volume": "../etc"}, "limits"),
        ({"owner": "o" * 1000}, "limits"),
        ({"name": "n" * 5000}, "limits"),
        ({"metadata": {str(i): "x" for i in range(100)}}, "limits"),
        ({"metadata": {"k": 1}}, "malformed"),
    ],
)
def test_object_events_out_of_range_are_rejected(changes: dict[str, object], expected: str) -> None:
    assert reason(with_body(stored(), **changes)) == expected


def test_a_node_speaks_only_for_itself() -> None:
    joined = NodeJoined(node="n2", volumes=("v1",))
    assert reason(envelope(joined), node="n1") == "node-mismatch"
    done = TaskCompleted(
        task_id="t", action="fetch", node="n2", root=A, volume="v1", attempts=1, duration=0.1
    )
    assert reason(envelope(done), node="n1") == "node-mismatch"
    assert reason(envelope(done), node="n2") is None
    assert reason(envelope(stored()), node="n1.x") == "bad-node"


def test_times_must_be_finite_and_not_in_the_future() -> None:
    for taken_at in (math.inf, math.nan, NOW + 10 * 86_400):
        digest = InventoryDigest(volume="v1", pins=1, size=1, digest=b"\0" * 32, taken_at=taken_at)
        assert reason(envelope(digest)) in ("bad-time", "malformed")


def test_unknown_types_and_commands_are_rejected() -> None:
    base = envelope(stored())
    odd = Envelope(base.id, base.id, None, "n1", Content("event", "Surprise", {}), sequence=1)
    assert reason(odd) == "unknown-type"
    command = Envelope(base.id, base.id, None, "n1", Content("command", "ObjectStored", {}))
    assert reason(command) == "not-event"


def test_the_projection_counts_rejections_and_keeps_going() -> None:
    projection = Projection()
    seen: list[tuple[Rejection, str, str]] = []
    projection.on_reject = lambda r, n, t: seen.append((r, n, t))
    assert projection.apply_event(with_body(stored(), size=-5), node="n1") == set()
    assert projection.apply_event(envelope(stored()), node="n1") == {A}
    assert projection.rejected == 1 and projection.rejections == {"malformed": 1}
    assert seen[0][1:] == ("n1", "ObjectStored")
    assert projection.replicas(A) == {("n1", "v1")}


def record(**changes: object) -> NodeRecord:
    fields: dict[str, object] = {
        "node": "n1",
        "labels": {"zone": "z1"},
        "volumes": (VolumeStatus("v1", 1 << 30, 0, 1 << 30),),
        "heartbeat_at": NOW,
    }
    fields.update(changes)
    return NodeRecord(**fields)  # type: ignore[arg-type]


def test_node_records_are_checked() -> None:
    assert check_node_record(record(), "n1", now=NOW) is None
    assert "key" in (check_node_record(record(), "n2", now=NOW) or "")
    bad = [
        record(volumes=(VolumeStatus("v1", -5, 0, 0),)),
        record(volumes=(VolumeStatus("v1", 1 << 63, 0, 0),)),
        record(volumes=(VolumeStatus("v1", 1, 0, 0), VolumeStatus("v1", 1, 0, 0))),
        record(volumes=(VolumeStatus("a b", 1, 0, 0),)),
        record(labels={str(i): "x" for i in range(100)}),
        record(labels={"zone": "z" * 1000}),
        record(node="not a node"),
        record(heartbeat_at=math.inf),
        record(heartbeat_at=NOW + 10 * 86_400),
    ]
    for junk in bad:
        assert check_node_record(junk, None, now=NOW) is not None, junk


def test_infinite_capacity_is_a_malformed_record_not_a_crash() -> None:
    doc = json.loads(record().encode())
    doc["volumes"][0]["capacity"] = math.inf
    with pytest.raises(ValueError, match="not finite"):
        NodeRecord.decode(json.dumps(doc).encode())


def test_the_projection_ignores_junk_heartbeats() -> None:
    projection = Projection()
    projection.sync_nodes([record(volumes=(VolumeStatus("v1", -5, 0, 0),)), record(node="n2")])
    assert set(projection.nodes) == {"n2"}


def test_a_sourced_event_must_come_from_its_nodes_outbox() -> None:
    # As nats-server 2.15 writes it (measured on a LocalDomain).
    header = {
        "Nats-Stream-Source": "OUTBOX_n1:DYW1ELw9 3 > > cim.place.evt.n1.TaskCompleted ZIVouONc"
    }
    assert source_of(header) == "OUTBOX_n1"
    assert source_of(None) is None and source_of({}) is None
    assert check_source("n1", source_of(header)) is None
    assert check_source("n1", None) is None  # published to the hub's stream directly
    wrong = check_source("n2", source_of(header))
    assert wrong is not None and wrong.reason == "wrong-source"

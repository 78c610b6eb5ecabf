"""What the controller believes: the checks every event passes before it touches the projection.

This module owns the pure checks of the control plane's input (no I/O, no clock of its own):
:func:`check_event` takes an envelope as the hub stored it and the node its subject names, and
returns None (believable) or a :class:`Rejection` with a short ``reason`` (the label of the
``cim_place_rejected_events_total`` metric) and a one-line ``detail``. The node records of KV
``cim-place-nodes`` are checked by :func:`cim_place.cluster.state.nodes.check_node_record`, with
the same limits (:data:`LIMITS`).

The checks, in order:

1. the subject's node token is a valid node id;
2. the content is an event of a known type whose body parses (field types);
3. **a node speaks only for itself**: a body that names a node (task outcomes, joins, leaves)
   must name the subject's node (NATS permissions enforce the subject; this catches a body that
   lies about it). The envelope's ``owner`` is a claim, not an identity: the projection goes by
   the subject's node whatever the owner says;
4. ranges: sizes and counts >= 0 and below :data:`MAX_COUNT`, CIDs parse, volume names are
   node-id shaped, owners, names and metadata within limits, times finite and within
   0 .. now + :data:`MAX_CLOCK_SKEW` (a time in the future would outrank true ones).

Cheap on purpose: the controller ingests every event of the domain through it (the figure with
validation on is in ``docs/BENCHMARKS.md``).
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass

from cim_place.cluster.events.types import (
    EVENT_TYPES,
    EventBodyError,
    InventoryDigest,
    NodeJoined,
    NodeLeft,
    ObjectFields,
    ObjectRemoved,
    ObjectStored,
    TaskCompleted,
    TaskFailed,
    object_fields,
    parse_event,
)
from cim_place.cluster.nats.envelope import Envelope
from cim_place.cluster.nats.subjects import outbox_stream
from cim_place.errors import InvalidCidError
from cim_place.objectstore.cid import split

__all__ = [
    "LIMITS",
    "MAX_CLOCK_SKEW",
    "MAX_COUNT",
    "Limits",
    "Rejection",
    "check_event",
    "check_metadata",
    "check_object_fields",
    "check_source",
    "check_time",
    "valid_name",
]

_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")

MAX_COUNT = 1 << 62
"""Largest size, capacity or count believed (about 4.6 EB): far above any disk, far below the
limits of int64 columns and of float conversion."""
MAX_CLOCK_SKEW = 86_400.0
"""Seconds a publisher's clock may run ahead of the controller's."""


@dataclass(frozen=True, slots=True)
class Limits:
    """Sizes of free-form text a node may send (labels, tags, owners, names, metadata)."""

    text: int = 256
    name: int = 1024
    entries: int = 64
    volumes: int = 256


LIMITS = Limits()


@dataclass(frozen=True, slots=True)
class Rejection:
    """Why a record is not believed: ``reason`` (a metric label) and ``detail`` (what was wrong)."""

    reason: str
    detail: str


# Node ids and volume names seen valid: a domain has few, and every event names one of each, so
# a set lookup replaces the regular expression on the hot path (bounded: junk is never added).
_VALID_NAMES: set[str] = set()
_MAX_REMEMBERED = 65_536
# The common root CID prefixes (CIDv1, raw or dag-pb, sha2-256, 32 bytes): checked by prefix and
# length instead of a varint parse.
_COMMON_CID_PREFIXES = (b"\x01\x55\x12\x20", b"\x01\x70\x12\x20", b"\x01\x71\x12\x20")


def valid_name(value: object) -> bool:
    """A node id or volume name: 1-64 letters, digits, '-' or '_' (a subject token)."""
    if type(value) is not str:
        return False
    if value in _VALID_NAMES:
        return True
    if _NAME.match(value) is None:
        return False
    if len(_VALID_NAMES) < _MAX_REMEMBERED:
        _VALID_NAMES.add(value)
    return True


def check_time(value: float, what: str, now: float) -> Rejection | None:
    # A time in the future would outrank every true one; one in the past is merely old.
    if not math.isfinite(value) or value < 0 or value > now + MAX_CLOCK_SKEW:
        return Rejection("bad-time", f"{what} {value!r} is not a plausible Unix time")
    return None


def check_metadata(metadata: Mapping[str, str], what: str, limits: Limits = LIMITS) -> str | None:
    """None when ``metadata`` is within limits, else what is wrong."""
    if len(metadata) > limits.entries:
        return f"{what} has {len(metadata)} entries; at most {limits.entries}"
    for key, value in metadata.items():
        if not key or len(key) > limits.text or len(value) > limits.text:
            return f"{what} entry {key[:40]!r} is empty or longer than {limits.text} characters"
    return None


def check_source(node: str, source: str | None) -> Rejection | None:
    """An event the hub sourced must come from the outbox of the node its subject names.

    A seized leaf may keep any subject in its own outbox, and the hub sources an outbox whole
    (over ``$JS.S.>`` subjects that the link's permissions cannot tell apart): the source header,
    which the hub sets, says whose outbox it really was.
    """
    if source is None or source == outbox_stream(node):
        return None
    return Rejection("wrong-source", f"sourced from {source[:80]!r}, not {outbox_stream(node)!r}")


def check_event(
    envelope: Envelope, node: str, *, now: float | None = None, limits: Limits = LIMITS
) -> Rejection | None:
    """None when the event ``node``'s subject carried may be applied; else why not."""
    if not valid_name(node):
        return Rejection("bad-node", f"subject node {node[:80]!r} is not a valid node id")
    content = envelope.content
    if content.kind != "event":
        return Rejection("not-event", f"a {content.kind!r} on an event subject")
    if content.type not in EVENT_TYPES:
        return Rejection("unknown-type", f"unknown event type {content.type[:80]!r}")
    clock = time.time() if now is None else now
    if content.type in (ObjectStored.TYPE, ObjectRemoved.TYPE):
        # The hot path: the fields in one pass, no event object built.
        fields = object_fields(content.body)
        if fields is None:
            return _parse_failure(envelope)
        return check_object_fields(fields, limits)
    try:
        event = parse_event(envelope)
    except EventBodyError as exc:
        return Rejection("malformed", str(exc)[:200])
    if isinstance(event, TaskCompleted | TaskFailed | NodeJoined | NodeLeft):
        if event.node != node:
            return Rejection(
                "node-mismatch",
                f"{content.type} names node {event.node[:80]!r}, published by {node!r}",
            )
        if isinstance(event, TaskCompleted | TaskFailed):
            if event.volume is not None and not valid_name(event.volume):
                return Rejection("limits", f"{content.type}.volume is not a valid volume name")
            if event.root is not None:
                return _check_cid(event.root, content.type)
        return None
    if isinstance(event, InventoryDigest):
        if not valid_name(event.volume):
            return Rejection("limits", "InventoryDigest.volume is not a valid volume name")
        if event.pins > MAX_COUNT or event.size > MAX_COUNT:
            return Rejection("out-of-range", "InventoryDigest pins or size out of range")
        return check_time(event.taken_at, "InventoryDigest.taken_at", clock)
    return None


def _parse_failure(envelope: Envelope) -> Rejection:
    try:
        parse_event(envelope)
    except EventBodyError as exc:
        return Rejection("malformed", str(exc)[:200])
    return Rejection("malformed", f"{envelope.content.type} body is malformed")


def _check_cid(root: bytes, what: str) -> Rejection | None:
    if len(root) == 36 and root[:4] in _COMMON_CID_PREFIXES:
        return None
    try:
        split(root)
    except InvalidCidError as exc:
        return Rejection("bad-cid", f"{what}.root: {exc}"[:200])
    return None


def check_object_fields(fields: ObjectFields, limits: Limits = LIMITS) -> Rejection | None:
    """The range checks of an ObjectStored / ObjectRemoved body already read by
    :func:`~cim_place.cluster.events.types.object_fields` (the projection's hot path)."""
    root, size, blocks, volume, owner, name, metadata = fields
    if size > MAX_COUNT or blocks > MAX_COUNT:
        return Rejection("out-of-range", f"size {size} or blocks {blocks} out of range")
    if not valid_name(volume):
        return Rejection("limits", f"volume {volume[:80]!r} is not a valid volume name")
    if len(owner) > limits.text:
        return Rejection("limits", f"owner longer than {limits.text} characters")
    if name is not None and len(name) > limits.name:
        return Rejection("limits", f"name longer than {limits.name} characters")
    if metadata:
        problem = check_metadata(metadata, "metadata", limits)
        if problem is not None:
            return Rejection("limits", problem)
    return _check_cid(root, "object")

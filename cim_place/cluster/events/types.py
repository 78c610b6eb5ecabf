"""The events cim-place persists, and their bodies as typed values.

This module owns the vocabulary of the event store: which event types exist and what each body
holds. Every event is a frozen dataclass with a ``TYPE`` (the ``content.type`` of its envelope and
the last token of its subject), ``body()`` to build the DAG-CBOR body and ``from_body()`` to parse
one back, naming the first bad field. CIDs travel as :class:`~cim_place.objectstore.dagcbor.Link`
(tag 42) so that IPLD tools see real links.

An agent publishes ``ObjectStored`` / ``ObjectRemoved`` for every pin and unpin, an
``InventoryDigest`` per volume now and then (so the controller can detect drift without listing
every pin), ``NodeJoined`` / ``NodeLeft`` around its life, and ``TaskCompleted`` / ``TaskFailed``
caused by the task they report on (their envelope's ``causation_id`` is the task's id).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import ClassVar, Literal, Self, TypeAlias, cast

from cim_place.cluster.nats.envelope import Content, Envelope, EnvelopeError
from cim_place.objectstore.cid import Cid
from cim_place.objectstore.dagcbor import Link, Value

__all__ = [
    "EVENT_TYPES",
    "AnyEvent",
    "EventBodyError",
    "InventoryDigest",
    "NodeJoined",
    "NodeLeft",
    "ObjectDeleted",
    "ObjectFields",
    "ObjectRemoved",
    "ObjectStored",
    "ReplicaDamaged",
    "TaskAction",
    "TaskCompleted",
    "TaskFailed",
    "event_content",
    "event_envelope",
    "inventory_digest",
    "object_fields",
    "parse_event",
]

Body: TypeAlias = dict[str, Value]
TaskAction = Literal["fetch", "drop", "verify", "repair"]
TASK_ACTIONS: tuple[TaskAction, ...] = ("fetch", "drop", "verify", "repair")
DamageProblem = Literal["corrupt", "missing"]
DAMAGE_PROBLEMS: tuple[DamageProblem, ...] = ("corrupt", "missing")


class EventBodyError(EnvelopeError):
    """An envelope that decodes but whose event type is unknown or whose body is malformed."""


# -- field readers: each names the event type and field that is wrong ---------------------------


def _field(body: Mapping[str, Value], key: str, event: str) -> Value:
    if key not in body:
        raise EventBodyError(f"{event} body is missing field {key!r}")
    return body[key]


def _str(body: Mapping[str, Value], key: str, event: str) -> str:
    value = _field(body, key, event)
    if not isinstance(value, str):
        raise EventBodyError(f"{event}.{key} must be a string, got {type(value).__name__}")
    return value


def _opt_str(body: Mapping[str, Value], key: str, event: str) -> str | None:
    if body.get(key) is None:
        return None
    return _str(body, key, event)


def _count(body: Mapping[str, Value], key: str, event: str) -> int:
    value = _field(body, key, event)
    # bool is an int in Python; a true/false count is foreign data, not a number.
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise EventBodyError(f"{event}.{key} must be a non-negative integer, got {value!r}")
    return value


def _seconds(body: Mapping[str, Value], key: str, event: str) -> float:
    value = _field(body, key, event)
    if not isinstance(value, int | float) or isinstance(value, bool) or value < 0:
        raise EventBodyError(f"{event}.{key} must be a non-negative number, got {value!r}")
    return float(value)


def _cid(body: Mapping[str, Value], key: str, event: str) -> Cid:
    value = _field(body, key, event)
    if not isinstance(value, Link):
        raise EventBodyError(f"{event}.{key} must be a CID link (tag 42), got {value!r}")
    return value.cid


def _opt_cid(body: Mapping[str, Value], key: str, event: str) -> Cid | None:
    if body.get(key) is None:
        return None
    return _cid(body, key, event)


def _all_str(mapping: dict[str, Value]) -> bool:
    # A loop, not all() over a generator: this runs for every object event the controller reads.
    for value in mapping.values():  # noqa: SIM110
        if type(value) is not str:
            return False
    return True


def _str_map(body: Mapping[str, Value], key: str, event: str) -> dict[str, str]:
    value = body.get(key, {})
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise EventBodyError(f"{event}.{key} must map strings to strings")
    return {k: str(v) for k, v in value.items()}


def _str_list(body: Mapping[str, Value], key: str, event: str) -> list[str]:
    value = body.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise EventBodyError(f"{event}.{key} must be a list of strings")
    return [str(v) for v in value]


def _action(body: Mapping[str, Value], key: str, event: str) -> TaskAction:
    value = _str(body, key, event)
    for action in TASK_ACTIONS:
        if value == action:
            return action
    raise EventBodyError(f"{event}.{key} must be one of {', '.join(TASK_ACTIONS)}, got {value!r}")


# -- events ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class _ObjectEvent:
    """What ObjectStored and ObjectRemoved both say about one root on one volume."""

    TYPE: ClassVar[str] = ""
    root: Cid
    size: int
    """Bytes of content (the file size for UnixFS), not of the encoded blocks."""
    blocks: int
    volume: str
    owner: str
    name: str | None = None
    metadata: Mapping[str, str] = field(default_factory=dict)

    def body(self) -> Body:
        return {
            "root": Link(self.root),
            "size": self.size,
            "blocks": self.blocks,
            "volume": self.volume,
            "owner": self.owner,
            "name": self.name,
            "metadata": dict(self.metadata),
        }

    @classmethod
    def from_body(cls, body: Mapping[str, Value]) -> Self:
        fields = object_fields(body)
        if fields is not None:
            root, size, blocks, volume, owner, name, metadata = fields
            return cls(
                root=root,
                size=size,
                blocks=blocks,
                volume=volume,
                owner=owner,
                name=name,
                metadata=metadata,
            )
        # Something is missing or of the wrong type: the field readers name it.
        t = cls.TYPE
        return cls(
            root=_cid(body, "root", t),
            size=_count(body, "size", t),
            blocks=_count(body, "blocks", t),
            volume=_str(body, "volume", t),
            owner=_str(body, "owner", t),
            name=_opt_str(body, "name", t),
            metadata=_str_map(body, "metadata", t),
        )


ObjectFields: TypeAlias = tuple[Cid, int, int, str, str, str | None, Mapping[str, str]]
"""``(root, size, blocks, volume, owner, name, metadata)`` of an object event's body."""


def object_fields(body: Mapping[str, Value]) -> ObjectFields | None:
    """The fields of a well-formed ObjectStored / ObjectRemoved body, read in one pass.

    None when a field is missing or of the wrong type (:meth:`ObjectStored.from_body` then says
    which). Exact types, as the codec returns them: the controller reads every object event
    through here, and its projection takes the tuple without building the event.
    """
    root = body.get("root")
    size = body.get("size")
    blocks = body.get("blocks")
    volume = body.get("volume")
    owner = body.get("owner")
    name = body.get("name")
    metadata = body.get("metadata")
    if (
        type(root) is Link
        and type(size) is int
        and size >= 0
        and type(blocks) is int
        and blocks >= 0
        and type(volume) is str
        and type(owner) is str
        and (name is None or type(name) is str)
        and type(metadata) is dict
        and _all_str(metadata)
    ):
        return root.cid, size, blocks, volume, owner, name, cast(Mapping[str, str], metadata)
    return None


@dataclass(frozen=True, slots=True, kw_only=True)
class ObjectStored(_ObjectEvent):
    """A root was pinned on a volume of the publishing node, its whole DAG present and verified."""

    TYPE: ClassVar[str] = "ObjectStored"


@dataclass(frozen=True, slots=True, kw_only=True)
class ObjectRemoved(_ObjectEvent):
    """A root was unpinned from a volume of the publishing node (its blocks may be collected)."""

    TYPE: ClassVar[str] = "ObjectRemoved"


@dataclass(frozen=True, slots=True, kw_only=True)
class ObjectDeleted:
    """An operator removed a root from the whole domain (``cim-place rm``): a tombstone.

    Published by the leading controller on ``<prefix>.evt.<hub domain>.ObjectDeleted`` (the
    operator's NATS user may not publish events: it asks the controller on
    ``<prefix>.api.rm``). Every replica is then dropped, whatever the policy's minimum.
    ``names``: the domain names that pointed at the root and were removed with it.
    """

    TYPE: ClassVar[str] = "ObjectDeleted"
    root: Cid
    by: str
    reason: str = ""
    names: tuple[str, ...] = ()

    def body(self) -> Body:
        return {
            "root": Link(self.root),
            "by": self.by,
            "reason": self.reason,
            "names": list(self.names),
        }

    @classmethod
    def from_body(cls, body: Mapping[str, Value]) -> Self:
        t = cls.TYPE
        return cls(
            root=_cid(body, "root", t),
            by=_str(body, "by", t),
            reason=_str(body, "reason", t),
            names=tuple(_str_list(body, "names", t)),
        )


def inventory_digest(roots: Iterable[Cid]) -> bytes:
    """SHA-256 over the sorted, de-duplicated root CIDs (each length-prefixed).

    The agent and the controller compute it the same way, from the volume's pins and from the
    controller's locations projection; a difference means drift, and only then does the controller
    ask for the full list.
    """
    digest = hashlib.sha256()
    for root in sorted(set(roots)):
        digest.update(len(root).to_bytes(2, "big"))
        digest.update(root)
    return digest.digest()


@dataclass(frozen=True, slots=True, kw_only=True)
class InventoryDigest:
    """What one volume holds, summarised: pin count, content size and :func:`inventory_digest`."""

    TYPE: ClassVar[str] = "InventoryDigest"
    volume: str
    pins: int
    size: int
    """Content bytes of all pins on the volume."""
    digest: bytes
    taken_at: float
    """Unix time (seconds) at which the pins were listed."""

    def body(self) -> Body:
        return {
            "volume": self.volume,
            "pins": self.pins,
            "size": self.size,
            "digest": self.digest,
            "taken_at": self.taken_at,
        }

    @classmethod
    def from_body(cls, body: Mapping[str, Value]) -> Self:
        t = cls.TYPE
        digest = _field(body, "digest", t)
        if not isinstance(digest, bytes) or len(digest) != 32:
            raise EventBodyError(f"{t}.digest must be 32 bytes (SHA-256), got {digest!r}")
        return cls(
            volume=_str(body, "volume", t),
            pins=_count(body, "pins", t),
            size=_count(body, "size", t),
            digest=digest,
            taken_at=_seconds(body, "taken_at", t),
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class NodeJoined:
    """An agent started (or restarted) and joined the domain."""

    TYPE: ClassVar[str] = "NodeJoined"
    node: str
    labels: Mapping[str, str] = field(default_factory=dict)
    """Failure-domain labels: region, zone, host."""
    tags: tuple[str, ...] = ()
    volumes: tuple[str, ...] = ()
    version: str = ""
    started_at: float = 0.0
    """Unix time (seconds) at which the agent started."""

    def body(self) -> Body:
        return {
            "node": self.node,
            "labels": dict(self.labels),
            "tags": list(self.tags),
            "volumes": list(self.volumes),
            "version": self.version,
            "started_at": self.started_at,
        }

    @classmethod
    def from_body(cls, body: Mapping[str, Value]) -> Self:
        t = cls.TYPE
        return cls(
            node=_str(body, "node", t),
            labels=_str_map(body, "labels", t),
            tags=tuple(_str_list(body, "tags", t)),
            volumes=tuple(_str_list(body, "volumes", t)),
            version=_str(body, "version", t),
            started_at=_seconds(body, "started_at", t),
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class NodeLeft:
    """An agent stopped on purpose (shutdown, drain); a crash shows as an expired heartbeat."""

    TYPE: ClassVar[str] = "NodeLeft"
    node: str
    reason: str = ""

    def body(self) -> Body:
        return {"node": self.node, "reason": self.reason}

    @classmethod
    def from_body(cls, body: Mapping[str, Value]) -> Self:
        t = cls.TYPE
        return cls(node=_str(body, "node", t), reason=_str(body, "reason", t))


@dataclass(frozen=True, slots=True, kw_only=True)
class TaskCompleted:
    """A task's result is durable; its envelope's causation_id is the task's id."""

    TYPE: ClassVar[str] = "TaskCompleted"
    task_id: str
    action: TaskAction
    node: str
    root: Cid | None
    volume: str | None
    attempts: int
    duration: float
    """Seconds spent on the successful attempt."""
    result: Mapping[str, Value] = field(default_factory=dict)
    """What the handler reported (for example bytes and blocks fetched)."""

    def body(self) -> Body:
        return {
            "task_id": self.task_id,
            "action": self.action,
            "node": self.node,
            "root": None if self.root is None else Link(self.root),
            "volume": self.volume,
            "attempts": self.attempts,
            "duration": self.duration,
            "result": dict(self.result),
        }

    @classmethod
    def from_body(cls, body: Mapping[str, Value]) -> Self:
        t = cls.TYPE
        result = body.get("result", {})
        if not isinstance(result, dict):
            raise EventBodyError(f"{t}.result must be a map")
        return cls(
            task_id=_str(body, "task_id", t),
            action=_action(body, "action", t),
            node=_str(body, "node", t),
            root=_opt_cid(body, "root", t),
            volume=_opt_str(body, "volume", t),
            attempts=_count(body, "attempts", t),
            duration=_seconds(body, "duration", t),
            result=result,
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class TaskFailed:
    """A task ended as failed; its envelope's causation is the task's id.

    ``permanent`` tells a failure that retrying cannot fix (a full volume, a malformed task) from
    one that ran out of attempts, so the controller knows whether the same work elsewhere may
    succeed. ``action`` and ``root`` are None when the task message could not even be decoded.
    """

    TYPE: ClassVar[str] = "TaskFailed"
    task_id: str
    action: TaskAction | None
    node: str
    root: Cid | None
    volume: str | None
    attempts: int
    reason: str
    permanent: bool = False
    duration: float = 0.0

    def body(self) -> Body:
        return {
            "task_id": self.task_id,
            "action": self.action,
            "node": self.node,
            "root": None if self.root is None else Link(self.root),
            "volume": self.volume,
            "attempts": self.attempts,
            "reason": self.reason,
            "permanent": self.permanent,
            "duration": self.duration,
        }

    @classmethod
    def from_body(cls, body: Mapping[str, Value]) -> Self:
        t = cls.TYPE
        permanent = body.get("permanent", False)
        if not isinstance(permanent, bool):
            raise EventBodyError(f"{t}.permanent must be a boolean")
        return cls(
            task_id=_str(body, "task_id", t),
            action=None if body.get("action") is None else _action(body, "action", t),
            node=_str(body, "node", t),
            root=_opt_cid(body, "root", t),
            volume=_opt_str(body, "volume", t),
            attempts=_count(body, "attempts", t),
            reason=_str(body, "reason", t),
            permanent=permanent,
            duration=_seconds(body, "duration", t) if "duration" in body else 0.0,
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class ReplicaDamaged:
    """Blocks of a pinned root on a volume of ``node`` failed verification or are gone.

    Published wherever the damage was seen (``found_by``: scrub, serve, read, fetch). The replica
    no longer counts as a copy until a repair re-fetches those blocks and the node announces the
    root stored again (``ObjectStored``).
    """

    TYPE: ClassVar[str] = "ReplicaDamaged"
    root: Cid
    node: str
    volume: str
    blocks: tuple[Cid, ...]
    problem: DamageProblem
    found_by: str = "scrub"

    def body(self) -> Body:
        return {
            "root": Link(self.root),
            "node": self.node,
            "volume": self.volume,
            "blocks": [Link(cid) for cid in self.blocks],
            "problem": self.problem,
            "found_by": self.found_by,
        }

    @classmethod
    def from_body(cls, body: Mapping[str, Value]) -> Self:
        t = cls.TYPE
        blocks = _field(body, "blocks", t)
        if not isinstance(blocks, list) or not all(isinstance(b, Link) for b in blocks):
            raise EventBodyError(f"{t}.blocks must be a list of CID links (tag 42)")
        problem = _str(body, "problem", t)
        if problem not in DAMAGE_PROBLEMS:
            raise EventBodyError(f"{t}.problem must be corrupt or missing, got {problem!r}")
        return cls(
            root=_cid(body, "root", t),
            node=_str(body, "node", t),
            volume=_str(body, "volume", t),
            blocks=tuple(cast(Link, b).cid for b in blocks),
            problem=problem,
            found_by=_str(body, "found_by", t) if "found_by" in body else "",
        )


AnyEvent: TypeAlias = (
    ObjectStored
    | ObjectRemoved
    | ObjectDeleted
    | InventoryDigest
    | NodeJoined
    | NodeLeft
    | TaskCompleted
    | TaskFailed
    | ReplicaDamaged
)

EVENT_TYPES: Mapping[str, type[AnyEvent]] = {
    cls.TYPE: cls
    for cls in (
        ObjectStored,
        ObjectRemoved,
        ObjectDeleted,
        InventoryDigest,
        NodeJoined,
        NodeLeft,
        TaskCompleted,
        TaskFailed,
        ReplicaDamaged,
    )
}
"""Every event type by its ``content.type``."""


def event_content(event: AnyEvent) -> Content:
    """The envelope content of ``event``: kind ``event``, its TYPE and its body."""
    return Content("event", event.TYPE, event.body())


def event_envelope(
    event: AnyEvent,
    *,
    owner: str,
    cause: Envelope | None = None,
    metadata: Mapping[str, str] | None = None,
) -> Envelope:
    """Wrap ``event`` in a new envelope, or in one caused by ``cause`` (a task, for example)."""
    content = event_content(event)
    if cause is None:
        return Envelope.new(content, owner=owner, metadata=metadata)
    return cause.caused(content, owner=owner, metadata=metadata)


def parse_event(envelope: Envelope) -> AnyEvent:
    """The typed event inside ``envelope``; EventBodyError if it is not a known, valid event."""
    content = envelope.content
    if content.kind != "event":
        raise EventBodyError(f"message {envelope.id} is a {content.kind}, not an event")
    cls = EVENT_TYPES.get(content.type)
    if cls is None:
        raise EventBodyError(
            f"message {envelope.id} has unknown event type {content.type!r} "
            f"(known: {', '.join(sorted(EVENT_TYPES))})"
        )
    return cls.from_body(content.body)

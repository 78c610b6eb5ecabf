"""The events cim-place persists: which event types exist and what each body holds.

Every event is a frozen dataclass deriving from :class:`Event`, with a ``TYPE`` (the
``content.type`` of its envelope and the last token of its subject) and typed fields. That is all
an event needs: declaring the class registers it in :data:`EVENT_TYPES`, and one generic codec
(:class:`~cim_place.cluster.nats.bodies.BodyCodec`) derives its body from the fields and their
annotations, both ways, naming the first bad field of a body it refuses. To add an event::

    @dataclass(frozen=True, slots=True, kw_only=True)
    class ReplicaDamaged(Event):
        # A scrub found blocks of a replica corrupt or missing.
        TYPE: ClassVar[str] = "ReplicaDamaged"
        root: CidLink
        volume: str
        bad_blocks: int
        found_at: float
        detail: str = ""

Field types and what they accept are listed in ``cim_place.cluster.nats.bodies`` (str, counts,
seconds, bytes, CIDs, optional values, lists and maps of strings, small nested dataclasses). A
field added to an existing event needs a default, so that stored events without it still read.
An event declared in another module is known to :func:`parse_event` once that module is
imported. CIDs travel as links (tag 42) so that IPLD tools see real links.

An agent publishes ``ObjectStored`` / ``ObjectRemoved`` for every pin and unpin, an
``InventoryDigest`` per volume now and then (so the controller can detect drift without listing
every pin), ``NodeJoined`` / ``NodeLeft`` around its life, and ``TaskCompleted`` / ``TaskFailed``
caused by the task they report on (their envelope's ``causation_id`` is the task's id).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any, ClassVar, Literal, Self, TypeAlias, cast

from cim_place.cluster.nats.bodies import BodyCodec, CidLink, Size
from cim_place.cluster.nats.envelope import Content, Envelope, EnvelopeError
from cim_place.objectstore.cid import Cid
from cim_place.objectstore.dagcbor import Value

__all__ = [
    "EVENT_TYPES",
    "AnyEvent",
    "Event",
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

TaskAction = Literal["fetch", "drop", "verify", "repair"]
DamageProblem = Literal["corrupt", "missing"]


class EventBodyError(EnvelopeError):
    """An envelope that decodes but whose event type is unknown or whose body is malformed."""


EVENT_TYPES: dict[str, type[Event]] = {}
"""Every event type by its ``content.type``, filled as event classes are declared."""

_CODECS: dict[type[Event], BodyCodec[Any]] = {}


class Event:
    """The base of every event: a frozen dataclass with a ``TYPE`` (see the module docstring)."""

    __slots__ = ()
    TYPE: ClassVar[str] = ""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        name = cls.__dict__.get("TYPE")
        if not name:
            return  # a shared base such as _ObjectEvent
        known = EVENT_TYPES.get(name)
        # dataclass(slots=True) builds the class anew (setting __qualname__ only afterwards):
        # the same declaration registers twice, with the same module and name.
        if known is not None and (known.__module__, known.__name__) != (
            cls.__module__,
            cls.__name__,
        ):
            raise TypeError(f"event type {name!r} is declared by {known.__qualname__} already")
        EVENT_TYPES[name] = cls
        if known is not None:
            _CODECS.pop(known, None)

    def body(self) -> dict[str, Value]:
        """The body that travels in this event's envelope."""
        return codec_of(type(self)).encode(self)

    @classmethod
    def from_body(cls, body: Mapping[str, Value]) -> Self:
        """The event read from ``body``; EventBodyError naming the first bad field."""
        event: Self = codec_of(cls).decode(body)
        return event


def codec_of(cls: type[Event]) -> BodyCodec[Any]:
    """The body codec of event class ``cls``, built on first use."""
    codec = _CODECS.get(cls)
    if codec is None:
        codec = _CODECS[cls] = BodyCodec(cls, error=EventBodyError)
    return codec


# -- events ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class _ObjectEvent(Event):
    """What ObjectStored and ObjectRemoved both say about one root on one volume."""

    root: CidLink
    size: int
    """Bytes of content (the file size for UnixFS), not of the encoded blocks."""
    blocks: int
    volume: str
    owner: str
    name: str | None = None
    metadata: Mapping[str, str] = field(default_factory=dict)


ObjectFields: TypeAlias = tuple[Cid, int, int, str, str, str | None, Mapping[str, str]]
"""``(root, size, blocks, volume, owner, name, metadata)`` of an object event's body."""


def object_fields(body: Mapping[str, Value]) -> ObjectFields | None:
    """The fields of a well-formed ObjectStored / ObjectRemoved body, read in one pass.

    None when a field is missing or of the wrong type (:func:`parse_event` then says which). The
    controller reads every object event through here, and its projection takes the tuple
    without building the event.
    """
    try:
        return cast(ObjectFields, codec_of(ObjectStored).values(body))
    except EventBodyError:
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
class ObjectDeleted(Event):
    """An operator removed a root from the whole domain (``cim-place rm``): a tombstone.

    Published by the leading controller on ``<prefix>.evt.<hub domain>.ObjectDeleted`` (the
    operator's NATS user may not publish events: it asks the controller on
    ``<prefix>.api.rm``). Every replica is then dropped, whatever the policy's minimum.
    ``names``: the domain names that pointed at the root and were removed with it.
    """

    TYPE: ClassVar[str] = "ObjectDeleted"
    root: CidLink
    by: str
    reason: str = ""
    names: tuple[str, ...] = ()


def inventory_digest(roots: Iterable[Cid]) -> bytes:
    """SHA-256 over the sorted, de-duplicated root CIDs (each length-prefixed).

    The agent and the controller compute it the same way, from the volume's pins and from the
    controller's locations projection; a difference means drift, and only then does the controller
    ask for the full list.
    """
    ordered = sorted(set(roots))
    widths = {len(root) for root in ordered}
    if len(widths) == 1:
        # One width (the usual case: every CID of the same version and hash): the prefixed
        # roots are one join, hashed in one call (a volume of 300,000 roots at 10M objects).
        prefix = widths.pop().to_bytes(2, "big")
        return hashlib.sha256(prefix + prefix.join(ordered)).digest()
    digest = hashlib.sha256()
    for root in ordered:
        digest.update(len(root).to_bytes(2, "big"))
        digest.update(root)
    return digest.digest()


@dataclass(frozen=True, slots=True, kw_only=True)
class InventoryDigest(Event):
    """What one volume holds, summarised: pin count, content size and :func:`inventory_digest`."""

    TYPE: ClassVar[str] = "InventoryDigest"
    volume: str
    pins: int
    size: int
    """Content bytes of all pins on the volume."""
    digest: Annotated[bytes, Size(32, "SHA-256")]
    taken_at: float
    """Unix time (seconds) at which the pins were listed."""


@dataclass(frozen=True, slots=True, kw_only=True)
class NodeJoined(Event):
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


@dataclass(frozen=True, slots=True, kw_only=True)
class NodeLeft(Event):
    """An agent stopped on purpose (shutdown, drain); a crash shows as an expired heartbeat."""

    TYPE: ClassVar[str] = "NodeLeft"
    node: str
    reason: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class TaskCompleted(Event):
    """A task's result is durable; its envelope's causation_id is the task's id."""

    TYPE: ClassVar[str] = "TaskCompleted"
    task_id: str
    action: TaskAction
    node: str
    root: CidLink | None
    volume: str | None
    attempts: int
    duration: float
    """Seconds spent on the successful attempt."""
    result: Mapping[str, Value] = field(default_factory=dict)
    """What the handler reported (for example bytes and blocks fetched)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class TaskFailed(Event):
    """A task ended as failed; its envelope's causation is the task's id.

    ``permanent`` tells a failure that retrying cannot fix (a full volume, a malformed task) from
    one that ran out of attempts, so the controller knows whether the same work elsewhere may
    succeed. ``action`` and ``root`` are None when the task message could not even be decoded.
    """

    TYPE: ClassVar[str] = "TaskFailed"
    task_id: str
    action: TaskAction | None
    node: str
    root: CidLink | None
    volume: str | None
    attempts: int
    reason: str
    permanent: bool = False
    duration: float = 0.0


AnyEvent: TypeAlias = Event
"""Any event (every event class derives from :class:`Event`)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ReplicaDamaged(Event):
    """Blocks of a pinned root on a volume of ``node`` failed verification or are gone.

    Published wherever the damage was seen (``found_by``: scrub, serve, read, fetch). The replica
    no longer counts as a copy until a repair re-fetches those blocks and the node announces the
    root stored again (``ObjectStored``).
    """

    TYPE: ClassVar[str] = "ReplicaDamaged"
    root: CidLink
    node: str
    volume: str
    blocks: tuple[CidLink, ...]
    problem: DamageProblem
    found_by: str = "scrub"


def event_content(event: Event) -> Content:
    """The envelope content of ``event``: kind ``event``, its TYPE and its body."""
    return Content("event", event.TYPE, codec_of(type(event)).encode(event))


def event_envelope(
    event: Event,
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


def parse_event(envelope: Envelope) -> Event:
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
    event: Event = codec_of(cls).decode(content.body)
    return event

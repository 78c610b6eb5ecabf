"""The message envelope every cim-place message travels in.

An envelope carries ``id`` (unique), ``correlation_id`` (the conversation it belongs to),
``causation_id`` (the message that caused it), ``owner``, string ``metadata``, and ``content``: an
Event, Command or Query with a ``type`` and a body. The stream ``sequence`` is not part of the
encoded bytes: JetStream assigns it, and a reader passes it to :func:`decode` on receipt.

Encoding is DAG-CBOR (CIDs in bodies are real links, tag 42). The id also goes into
``Nats-Msg-Id`` so JetStream drops duplicates, and correlation, causation, owner and type go into
headers so tools can filter without decoding.
"""

from __future__ import annotations

import itertools
import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Literal

from cim_place.errors import CimPlaceError, TransportError
from cim_place.objectstore import dagcbor
from cim_place.objectstore.dagcbor import Value
from cim_place.objectstore.dagcbor import decode as _decode_value

Kind = Literal["event", "command", "query"]
KINDS: tuple[Kind, ...] = ("event", "command", "query")

MSG_ID = "Nats-Msg-Id"
CORRELATION = "Cim-Correlation-Id"
CAUSATION = "Cim-Causation-Id"
OWNER = "Cim-Owner"
TYPE = "Cim-Type"


class EnvelopeError(TransportError):
    """Bytes on a cim-place subject that are not a valid envelope (garbage, foreign, incomplete)."""


@dataclass(frozen=True, slots=True)
class Content:
    kind: Kind
    type: str
    body: Mapping[str, Value] = field(default_factory=dict)


def _id_prefix() -> str:
    return secrets.token_hex(12)


_prefix = _id_prefix()
_serial = itertools.count()


def _reseed() -> None:
    global _prefix, _serial
    _prefix, _serial = _id_prefix(), itertools.count()


# A forked child must not repeat its parent's ids.
os.register_at_fork(after_in_child=_reseed)


def new_id() -> str:
    """A message id unique across processes: 96 random bits per process and a serial number.

    32 hex digits like a UUID's, and about ten times cheaper than ``uuid4()`` on every send.
    """
    return f"{_prefix}{next(_serial):08x}"


@dataclass(frozen=True, slots=True)
class Envelope:
    id: str
    correlation_id: str
    causation_id: str | None
    owner: str
    content: Content
    metadata: Mapping[str, str] = field(default_factory=dict)
    sequence: int | None = None

    @classmethod
    def new(
        cls, content: Content, *, owner: str, metadata: Mapping[str, str] | None = None
    ) -> Envelope:
        """A message that starts a conversation: it is its own correlation."""
        # new_id() and _envelope() written out: every message sent starts here.
        message_id = f"{_prefix}{next(_serial):08x}"
        envelope = _OpenEnvelope()
        envelope.id = message_id
        envelope.correlation_id = message_id
        envelope.causation_id = None
        envelope.owner = owner
        envelope.content = content
        envelope.metadata = {} if metadata is None else dict(metadata)
        envelope.sequence = None
        envelope.__class__ = Envelope  # type: ignore[assignment]
        return envelope  # type: ignore[return-value]  # now an Envelope

    def caused(
        self,
        content: Content,
        *,
        owner: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> Envelope:
        """A message caused by this one: same correlation, causation = this message's id."""
        return _envelope(
            f"{_prefix}{next(_serial):08x}",  # new_id(), without the call
            self.correlation_id,
            self.id,
            self.owner if owner is None else owner,
            content,
            {} if metadata is None else dict(metadata),
            None,
        )

    def with_sequence(self, sequence: int) -> Envelope:
        return replace(self, sequence=sequence)

    def headers(self) -> dict[str, str]:
        headers = {
            MSG_ID: self.id,
            CORRELATION: self.correlation_id,
            OWNER: self.owner,
            TYPE: self.content.type,
        }
        if self.causation_id is not None:
            headers[CAUSATION] = self.causation_id
        return headers

    def encode(self) -> bytes:
        content = self.content
        body = content.body
        message_id = self.id
        owner = self.owner
        kind = content.kind
        content_type = content.type
        if (
            self.correlation_id is message_id
            and self.causation_id is None
            and not self.metadata
            and type(body) is dict
            and type(message_id) is str
            and type(owner) is str
            and type(kind) is str
            and type(content_type) is str
            and len(message_id) < 256
            and message_id.isascii()
        ):
            # A message that starts a conversation, without metadata: most commands. Only its
            # id and body differ from the last such message of the same owner and type, so the
            # rest comes from _frames (the same bytes the codec writes for the full document).
            frames = _frames.get((owner, kind, content_type))
            if frames is None:
                frames = _frame(owner, kind, content_type)
            text = _ASCII_HEADS[len(message_id)] + message_id.encode("ascii")
            return b"".join((_ID_KEY, text, frames[0], dagcbor.encode(body), frames[1], text))
        metadata = self.metadata
        # The codec takes exact dicts; copy only what is another Mapping.
        return dagcbor.encode(
            {
                "id": message_id,
                "correlation_id": self.correlation_id,
                "causation_id": self.causation_id,
                "owner": owner,
                "metadata": metadata if type(metadata) is dict else dict(metadata),
                "content": {
                    "kind": kind,
                    "type": content_type,
                    "body": body if type(body) is dict else dict(body),
                },
            }
        )


# The envelope as DAG-CBOR is a map of six keys in canonical order (by length, then bytewise):
# id, owner, content, metadata, causation_id, correlation_id; content is a map of body, kind, type.
# For a message that starts a conversation (correlation = id, no causation, no metadata), the
# bytes around its id (twice) and body depend only on owner, kind and type: these frames.
_ID_KEY = b"\xa6" + dagcbor.encode("id")
_ASCII_HEADS = tuple(dagcbor.encode("x" * size)[: -size or None] for size in range(256))
"""The text-string head of an ASCII str of each length below 256."""
_frames: dict[tuple[str, str, str], tuple[bytes, bytes]] = {}


def _frame(owner: str, kind: str, content_type: str) -> tuple[bytes, bytes]:
    """The bytes between id and body, and between body and the second id (correlation_id)."""
    text = dagcbor.encode
    frames = (
        text("owner") + text(owner) + text("content") + b"\xa3" + text("body"),
        text("kind")
        + text(kind)
        + text("type")
        + text(content_type)
        + text("metadata")
        + dagcbor.encode({})
        + text("causation_id")
        + dagcbor.encode(None)
        + text("correlation_id"),
    )
    if len(_frames) < 4096:  # a process sends a few types as a few owners; stay bounded
        _frames[(owner, kind, content_type)] = frames
    return frames


# Every message builds one Envelope and one Content, on each side, and a frozen dataclass's
# __init__ sets each field through object.__setattr__. These twins have the same slots, written
# directly; a filled instance then takes the frozen class (CPython allows the switch between
# classes of the same layout), so what callers get is the same Envelope or Content, still frozen.
# A quarter of the cost of __init__.
class _OpenContent:
    __slots__ = Content.__slots__
    kind: Kind
    type: str
    body: Mapping[str, Value]


class _OpenEnvelope:
    __slots__ = Envelope.__slots__
    id: str
    correlation_id: str
    causation_id: str | None
    owner: str
    content: Content
    metadata: Mapping[str, str]
    sequence: int | None


def make_content(kind: Kind, content_type: str, body: Mapping[str, Value]) -> Content:
    """``Content(kind, content_type, body)``, built at a fraction of the cost (once per message)."""
    content = _OpenContent()
    content.kind = kind
    content.type = content_type
    content.body = body
    content.__class__ = Content  # type: ignore[assignment]
    return content  # type: ignore[return-value]  # now a Content (cast() would cost a call)


def _envelope(
    message_id: str,
    correlation: str,
    causation: str | None,
    owner: str,
    content: Content,
    metadata: Mapping[str, str],
    sequence: int | None,
) -> Envelope:
    envelope = _OpenEnvelope()
    envelope.id = message_id
    envelope.correlation_id = correlation
    envelope.causation_id = causation
    envelope.owner = owner
    envelope.content = content
    envelope.metadata = metadata
    envelope.sequence = sequence
    envelope.__class__ = Envelope  # type: ignore[assignment]
    return envelope  # type: ignore[return-value]  # now an Envelope


def _text(doc: Mapping[str, Value], key: str, where: str, *, optional: bool = False) -> str | None:
    value = doc.get(key)
    if value is None and optional:
        return None
    if type(value) is not str or (not value and key != "owner"):
        raise EnvelopeError(f"envelope {where}{key} must be a non-empty string, got {value!r}")
    return value


_ABSENT = object()
"""What ``dict.get`` returns for an absent optional field (``None`` is a present null)."""


def decode(data: bytes, *, sequence: int | None = None) -> Envelope:
    """Decode and validate an envelope; raises EnvelopeError naming the first problem."""
    try:
        doc = _decode_value(data)
    except (ValueError, RecursionError, CimPlaceError) as exc:
        # Bytes on our subjects come from anyone; whatever the codec trips on is "not ours".
        raise EnvelopeError(f"not a DAG-CBOR envelope: {exc}") from None
    # The codec returns plain dicts, lists and str (never subclasses), with str keys only, so
    # exact type tests suffice; this runs for every message a subscriber or the controller reads.
    if type(doc) is not dict:
        raise EnvelopeError("envelope is not a map")
    content = doc.get("content")
    if type(content) is not dict:
        raise EnvelopeError("envelope content must be a map with kind, type and body")
    kind = content.get("kind")
    if kind not in KINDS:  # a tuple: compared by equality, so an unhashable kind is refused too
        allowed = ", ".join(KINDS)
        raise EnvelopeError(f"envelope content.kind must be one of {allowed}, got {kind!r}")
    body = content.get("body", _ABSENT)
    if type(body) is not dict:
        if body is not _ABSENT:
            raise EnvelopeError("envelope content.body must be a map")
        body = {}
    metadata = doc.get("metadata", _ABSENT)
    if type(metadata) is not dict:
        if metadata is not _ABSENT:
            raise EnvelopeError("envelope metadata must map strings to strings")
        metadata = {}
    elif metadata:
        for value in metadata.values():
            if type(value) is not str:
                raise EnvelopeError("envelope metadata must map strings to strings")
    message_id = doc.get("id")
    correlation = doc.get("correlation_id")
    causation = doc.get("causation_id")
    owner = doc.get("owner")
    content_type = content.get("type")
    if not (
        type(message_id) is str
        and message_id
        and type(correlation) is str
        and correlation
        and (causation is None or (type(causation) is str and causation))
        and type(owner) is str
        and type(content_type) is str
        and content_type
    ):
        # Name the first field that is wrong, in the order the envelope lists them.
        _text(doc, "id", "")
        _text(doc, "correlation_id", "")
        _text(doc, "causation_id", "", optional=True)
        _text(doc, "owner", "")
        _text(content, "type", "content.")
        raise EnvelopeError("envelope fields are not all non-empty strings")  # not reached
    # make_content() and _envelope(), written out: this is the receiving end of every message.
    checked = _OpenContent()
    checked.kind = kind
    checked.type = content_type
    checked.body = body
    checked.__class__ = Content  # type: ignore[assignment]
    envelope = _OpenEnvelope()
    envelope.id = message_id
    envelope.correlation_id = correlation
    envelope.causation_id = causation
    envelope.owner = owner
    envelope.content = checked  # type: ignore[assignment]  # now a Content
    envelope.metadata = metadata
    envelope.sequence = sequence
    envelope.__class__ = Envelope  # type: ignore[assignment]
    return envelope  # type: ignore[return-value]  # now an Envelope

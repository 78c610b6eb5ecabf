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
from typing import Literal, cast

from cim_place.errors import CimPlaceError, TransportError
from cim_place.objectstore import dagcbor
from cim_place.objectstore.dagcbor import Value

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
        message_id = new_id()
        return _envelope(message_id, message_id, None, owner, content, dict(metadata or {}), None)

    def caused(
        self,
        content: Content,
        *,
        owner: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> Envelope:
        """A message caused by this one: same correlation, causation = this message's id."""
        return _envelope(
            new_id(),
            self.correlation_id,
            self.id,
            self.owner if owner is None else owner,
            content,
            dict(metadata or {}),
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
        metadata = self.metadata
        body = self.content.body
        # The codec takes exact dicts; copy only what is another Mapping.
        return dagcbor.encode(
            {
                "id": self.id,
                "correlation_id": self.correlation_id,
                "causation_id": self.causation_id,
                "owner": self.owner,
                "metadata": metadata if type(metadata) is dict else dict(metadata),
                "content": {
                    "kind": self.content.kind,
                    "type": self.content.type,
                    "body": body if type(body) is dict else dict(body),
                },
            }
        )


# Every message builds one Envelope and one Content, on each side: setting their slots directly
# costs half of what a frozen dataclass's __init__ does (object.__setattr__ per field), and the
# instances are the same (same fields, still frozen to everyone else).
_new = object.__new__
_set_kind, _set_type, _set_body = (
    getattr(Content, name).__set__ for name in ("kind", "type", "body")
)
_set_id, _set_correlation, _set_causation, _set_owner = (
    getattr(Envelope, name).__set__ for name in ("id", "correlation_id", "causation_id", "owner")
)
_set_content, _set_metadata, _set_sequence = (
    getattr(Envelope, name).__set__ for name in ("content", "metadata", "sequence")
)


def make_content(kind: Kind, content_type: str, body: Mapping[str, Value]) -> Content:
    """``Content(kind, content_type, body)``, built at half the cost (once per message)."""
    content = _new(Content)
    _set_kind(content, kind)
    _set_type(content, content_type)
    _set_body(content, body)
    return content


def _envelope(
    message_id: str,
    correlation: str,
    causation: str | None,
    owner: str,
    content: Content,
    metadata: Mapping[str, str],
    sequence: int | None,
) -> Envelope:
    envelope = _new(Envelope)
    _set_id(envelope, message_id)
    _set_correlation(envelope, correlation)
    _set_causation(envelope, causation)
    _set_owner(envelope, owner)
    _set_content(envelope, content)
    _set_metadata(envelope, metadata)
    _set_sequence(envelope, sequence)
    return envelope


def _text(doc: Mapping[str, Value], key: str, where: str, *, optional: bool = False) -> str | None:
    value = doc.get(key)
    if value is None and optional:
        return None
    if type(value) is not str or (not value and key != "owner"):
        raise EnvelopeError(f"envelope {where}{key} must be a non-empty string, got {value!r}")
    return value


def decode(data: bytes, *, sequence: int | None = None) -> Envelope:
    """Decode and validate an envelope; raises EnvelopeError naming the first problem."""
    try:
        doc = dagcbor.decode(data)
    except (ValueError, RecursionError, CimPlaceError) as exc:
        # Bytes on our subjects come from anyone; whatever the codec trips on is "not ours".
        raise EnvelopeError(f"not a DAG-CBOR envelope: {exc}") from None
    # The codec returns plain dicts, lists and str (never subclasses), so exact type tests
    # suffice; this runs for every event the controller reads.
    if type(doc) is not dict:
        raise EnvelopeError("envelope is not a map")
    content = doc.get("content")
    if type(content) is not dict:
        raise EnvelopeError("envelope content must be a map with kind, type and body")
    kind = content.get("kind")
    if kind not in KINDS:  # a tuple: compared by equality, so an unhashable kind is refused too
        allowed = ", ".join(KINDS)
        raise EnvelopeError(f"envelope content.kind must be one of {allowed}, got {kind!r}")
    body = content.get("body", {})
    if type(body) is not dict:
        raise EnvelopeError("envelope content.body must be a map")
    metadata = doc.get("metadata", {})
    if type(metadata) is not dict:
        raise EnvelopeError("envelope metadata must map strings to strings")
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
    return _envelope(
        message_id,
        correlation,
        causation,
        owner,
        make_content(kind, content_type, body),
        cast(dict[str, str], metadata),
        sequence,
    )

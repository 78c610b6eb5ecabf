"""A received message as an application handler sees it: envelope, body, and lazy content.

A :class:`Message` wraps the decoded envelope. Its ``body`` is what travelled (offload markers
in place of large values); :meth:`Message.read` resolves one offloaded value (fetching it only
then), :meth:`Message.resolve` returns the body with every marker replaced by its content.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from cim_place.cluster.nats.envelope import Envelope, Kind
from cim_place.comms.access import ContentAccessor
from cim_place.comms.content import (
    ContentRef,
    FieldPath,
    InvalidMessageError,
    find_refs,
    path_text,
)
from cim_place.objectstore.dagcbor import Value

__all__ = ["Message", "received"]


def _parse_path(path: str | FieldPath) -> FieldPath:
    if isinstance(path, tuple):
        return path
    return tuple(int(part) if part.isdigit() else part for part in path.split("."))


@dataclass(frozen=True, slots=True)
class Message:
    """One received command, query or event."""

    envelope: Envelope
    subject: str
    accessor: ContentAccessor = field(repr=False)

    @property
    def kind(self) -> Kind:
        return self.envelope.content.kind

    @property
    def type(self) -> str:
        return self.envelope.content.type

    @property
    def id(self) -> str:
        return self.envelope.id

    @property
    def body(self) -> Mapping[str, Value]:
        """The body as it travelled: offloaded values are markers (see :attr:`refs`)."""
        return self.envelope.content.body

    @property
    def refs(self) -> dict[str, ContentRef]:
        """Every offloaded value of the body, by dotted path (``doc``, ``pages.3``)."""
        return {path_text(path): ref for path, ref in find_refs(self.body)}

    def _value_at(self, path: str | FieldPath) -> Value:
        parts = _parse_path(path)
        value: Value = dict(self.body)
        for part in parts:
            in_map = isinstance(value, dict) and isinstance(part, str) and part in value
            in_list = isinstance(value, list) and isinstance(part, int) and 0 <= part < len(value)
            if in_map or in_list:
                value = value[part]  # type: ignore[index]
            else:
                raise InvalidMessageError(
                    f"{self.type} message {self.id} has no value at {path_text(parts)}"
                )
        return value

    def ref(self, path: str | FieldPath) -> ContentRef:
        """The reference of the offloaded value at ``path``."""
        ref = ContentRef.from_value(self._value_at(path))
        if ref is None:
            raise InvalidMessageError(
                f"the value at {path_text(_parse_path(path))} of {self.type} message {self.id} "
                "travelled inline; read it from message.body"
            )
        return ref

    async def read(self, path: str | FieldPath) -> bytes | str:
        """The value at ``path``: inline as it is, offloaded fetched and verified on demand."""
        value = self._value_at(path)
        ref = ContentRef.from_value(value)
        if ref is not None:
            return await self.accessor.read(ref)
        if isinstance(value, bytes | str):
            return value
        raise InvalidMessageError(
            f"the value at {path_text(_parse_path(path))} of {self.type} message {self.id} is a "
            f"{type(value).__name__}, not content; read it from message.body"
        )

    async def resolve(self) -> dict[str, Value]:
        """The body with every offloaded value replaced by its content (fetched if needed)."""

        async def walk(value: Value) -> Value:
            ref = ContentRef.from_value(value)
            if ref is not None:
                return await self.accessor.read(ref)
            if isinstance(value, dict):
                return {key: await walk(item) for key, item in value.items()}
            if isinstance(value, list):
                return [await walk(item) for item in value]
            return value

        return {key: await walk(value) for key, value in self.body.items()}


class _OpenMessage:
    """Message's slots, writable: see :func:`received`."""

    __slots__ = Message.__slots__
    envelope: Envelope
    subject: str
    accessor: ContentAccessor


def received(envelope: Envelope, subject: str, accessor: ContentAccessor) -> Message:
    """``Message(envelope, subject, accessor)`` at a third of the cost: built once per message.

    The slots are written on a twin of the same layout, which then takes the frozen class (as
    ``cim_place.cluster.nats.envelope`` builds envelopes): the caller gets a plain Message.
    """
    message = _OpenMessage()
    message.envelope = envelope
    message.subject = subject
    message.accessor = accessor
    message.__class__ = Message  # type: ignore[assignment]
    return message  # type: ignore[return-value]  # now a Message (cast() would cost a call)

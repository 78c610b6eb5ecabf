"""What an application puts in a message, and how offloaded content looks inside a body.

This module owns the **offload marker**, the value that replaces a large bytes or text value of a
body once it is stored in the object store::

    {"$offload": Link(root CID), "size": n, "content_type": "application/pdf"}
    {"$offload": Link(root CID), "size": n, "content_type": "text/plain; charset=utf-8",
     "encoding": "utf-8"}                      (a str value: the receiver gets a str back)

``size`` counts the stored bytes (UTF-8 for text). The marker is plain DAG-CBOR, so any tool that
reads the event store sees a real IPLD link. :class:`ContentRef` is its typed form;
:class:`Attachment` lets a sender give a content type or a file on disk; ``command``, ``query``
and ``event`` build the :class:`~cim_place.cluster.nats.envelope.Content` of a message.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TypeAlias

from cim_place.cluster.nats.envelope import Content, make_content
from cim_place.errors import CimPlaceError
from cim_place.objectstore.cid import Cid, to_str
from cim_place.objectstore.dagcbor import Link, Value

__all__ = [
    "OFFLOAD_KEY",
    "Attachment",
    "BodyInput",
    "ContentRef",
    "FieldPath",
    "InvalidMessageError",
    "command",
    "event",
    "find_refs",
    "path_text",
    "query",
]

OFFLOAD_KEY = "$offload"
OCTET_STREAM = "application/octet-stream"
TEXT_PLAIN = "text/plain; charset=utf-8"

FieldPath: TypeAlias = tuple[str | int, ...]
"""Where a value sits in a body: map keys and list indices from the top."""
BodyInput: TypeAlias = Mapping[str, object]
"""A body as a sender gives it: DAG-CBOR values, plus Attachment and ContentRef anywhere."""

_TYPE = re.compile(r"^[A-Za-z0-9_-]{1,128}$")


class InvalidMessageError(CimPlaceError):
    """A message the application built cannot be sent as it is (bad type name, bad value)."""


_CHECKED_TYPES: set[str] = set()


def check_type(message_type: str) -> str:
    """Message types become one NATS subject token: letters, digits, '-' and '_'."""
    if message_type in _CHECKED_TYPES:  # an application sends a few types, many times
        return message_type
    if not _TYPE.match(message_type):
        raise InvalidMessageError(
            f"message type {message_type!r} is not usable: use 1-128 letters, digits, '-' or '_' "
            "(it becomes a NATS subject token), e.g. AddDocument"
        )
    if len(_CHECKED_TYPES) < 4096:
        _CHECKED_TYPES.add(message_type)
    return message_type


# command, query and event each check the type (once per type: the set above) and copy the body
# into the Content, written out in each rather than through a shared helper: they run per message.
# Content.body is typed as DAG-CBOR values; Attachments are swapped out by the offloader before
# anything is encoded.


def command(message_type: str, body: BodyInput | None = None) -> Content:
    """A command: a request to do something (``AddDocument``), handled by one service."""
    if message_type not in _CHECKED_TYPES:
        check_type(message_type)
    return make_content("command", message_type, dict(body or {}))  # type: ignore[arg-type]


def query(message_type: str, body: BodyInput | None = None) -> Content:
    """A query: a question answered by an event (``request`` returns it)."""
    if message_type not in _CHECKED_TYPES:
        check_type(message_type)
    return make_content("query", message_type, dict(body or {}))  # type: ignore[arg-type]


def event(message_type: str, body: BodyInput | None = None) -> Content:
    """An event: something that happened (``DocumentAdded``); persisted in the event store."""
    if message_type not in _CHECKED_TYPES:
        check_type(message_type)
    return make_content("event", message_type, dict(body or {}))  # type: ignore[arg-type]


@dataclass(frozen=True, slots=True)
class Attachment:
    """Content for a body with its media type; ``source`` is the bytes or a file to stream.

    An attachment longer than the offload threshold is offloaded like any large value (a file
    is streamed to the agent, never read whole); a short one travels inline as plain bytes.
    """

    source: bytes | Path
    content_type: str = OCTET_STREAM

    @property
    def size(self) -> int:
        if isinstance(self.source, Path):
            return self.source.stat().st_size
        return len(self.source)


@dataclass(frozen=True, slots=True)
class ContentRef:
    """Offloaded content: the root CID of its UnixFS DAG, its size and its media type."""

    cid: Cid
    size: int
    content_type: str = OCTET_STREAM
    encoding: str | None = None
    """``utf-8`` when the value was text: the receiver gets a str back."""

    def to_value(self) -> dict[str, Value]:
        value: dict[str, Value] = {
            OFFLOAD_KEY: Link(self.cid),
            "size": self.size,
            "content_type": self.content_type,
        }
        if self.encoding is not None:
            value["encoding"] = self.encoding
        return value

    @classmethod
    def from_value(cls, value: object) -> ContentRef | None:
        """The reference a body value holds, or None when it is not an offload marker."""
        if not isinstance(value, dict):
            return None
        link = value.get(OFFLOAD_KEY)
        if not isinstance(link, Link):
            return None
        size = value.get("size")
        content_type = value.get("content_type", OCTET_STREAM)
        encoding = value.get("encoding")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise InvalidMessageError(
                f"offload marker of {to_str(link.cid)} has size {size!r}, not a byte count"
            )
        if not isinstance(content_type, str) or not (encoding is None or encoding == "utf-8"):
            raise InvalidMessageError(
                f"offload marker of {to_str(link.cid)} has a bad content_type or encoding"
            )
        return cls(link.cid, size, content_type, encoding)

    def __str__(self) -> str:
        return f"{to_str(self.cid)} ({self.size} bytes, {self.content_type})"


def find_refs(body: Mapping[str, Value]) -> Iterator[tuple[FieldPath, ContentRef]]:
    """Every offload marker in ``body``, depth first, with where it sits."""

    def walk(value: Value, path: FieldPath) -> Iterator[tuple[FieldPath, ContentRef]]:
        ref = ContentRef.from_value(value)
        if ref is not None:
            yield path, ref
        elif isinstance(value, dict):
            for key, item in value.items():
                yield from walk(item, (*path, key))
        elif isinstance(value, list):
            for index, item in enumerate(value):
                yield from walk(item, (*path, index))

    for key, value in body.items():
        yield from walk(value, (key,))


def path_text(path: FieldPath) -> str:
    """``("doc", "pages", 3)`` -> ``doc.pages.3``."""
    return ".".join(str(part) for part in path)

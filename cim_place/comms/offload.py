"""The sending side of offload: large values of a body go to the object store, not the bus.

This module owns the rule and the walk:

1. Walk the body (maps and lists, depth first). A bytes value, a text value (measured in UTF-8
   bytes) or an :class:`~cim_place.comms.content.Attachment` **longer than the threshold** is
   offloaded; one exactly at the threshold travels inline. The threshold is the domain's
   setting (``cim_place.comms.settings``), 64 KiB by default.
2. Offloading streams the value to the local agent
   (``cim_place.cluster.exchange.upload_client``), which imports it as a UnixFS DAG, pins it
   and announces ``ObjectStored``; the value is replaced by the offload marker
   (``ContentRef.to_value()``): root CID, size, content type.
3. The pin's ``readers`` metadata (object access control, ``cim_place.cluster.nats.security``) lists
   who besides the owner may fetch the content; by default ``*``, every authenticated user of
   the domain, as for the message that carries the link.
4. Existing markers (a handler passing on the reference it received) and ContentRefs stay as
   they are: the content is not uploaded again.

The bytes of an offloaded value cross NATS only as upload chunks on the agent's core subject,
never in a message that a stream stores.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from cim_place.cluster.exchange.upload_client import upload
from cim_place.cluster.nats.security import READERS_KEY
from cim_place.cluster.nats.subjects import Subjects
from cim_place.comms.content import (
    OCTET_STREAM,
    OFFLOAD_KEY,
    TEXT_PLAIN,
    Attachment,
    BodyInput,
    ContentRef,
    FieldPath,
    InvalidMessageError,
    path_text,
)
from cim_place.objectstore.dagcbor import Link, Value

__all__ = ["OffloadResult", "Offloader", "inline"]

CONTENT_TYPE_METADATA = "content_type"
"""Pin metadata key holding the media type of offloaded content."""
MESSAGE_TYPE_METADATA = "message_type"
"""Pin metadata key naming the type of the message that offloaded the content."""


@dataclass(slots=True)
class OffloadResult:
    """A body ready to encode, and what was offloaded from it."""

    body: dict[str, Value]
    offloaded: dict[FieldPath, ContentRef] = field(default_factory=dict)
    readers: str = "*"
    """The ``readers`` pin metadata of what gets offloaded (comma separated)."""


def inline(value: dict[str, Any] | list[Any], threshold: int) -> bool:
    """True when ``value`` needs no offload and holds only plain DAG-CBOR values.

    The common case, a small body, costs one pass of exact type tests instead of the awaited
    walk; anything else (a long value, an Attachment, a tuple, a ContentRef) takes the walk.
    """
    items: Iterable[Any] = value.values() if isinstance(value, dict) else value
    for item in items:
        kind: type = type(item)
        if kind is str:
            # A str takes at most 4 UTF-8 bytes per character; measure only when that may matter.
            if len(item) * 4 > threshold and len(item.encode("utf-8")) > threshold:
                return False
        elif kind is bytes:
            if len(item) > threshold:
                return False
        elif kind is dict or kind is list:
            if not inline(item, threshold):
                return False
        elif not (item is None or kind is int or kind is bool or kind is float or kind is Link):
            return False
    if type(value) is dict:
        if OFFLOAD_KEY in value:
            return False  # an offload marker passed on: the walk checks it
        for key in value:
            if type(key) is not str:
                return False
    return True


class Offloader:
    """Replaces the large values of bodies by CID links, storing them through ``node``'s agent.

    ``nc`` is a connection that reaches the agent (the client's own leaf); ``owner`` becomes the
    pin's owner. Uploads run one after another: an agent takes a few sessions at a time, and a
    message rarely carries more than one large value.
    """

    def __init__(
        self,
        nc: Any,
        node: str,
        *,
        owner: str = "",
        subjects: Subjects | None = None,
        timeout: float = 30.0,
    ) -> None:
        self.nc = nc
        self.node = node
        self.owner = owner
        self.subjects = subjects if subjects is not None else Subjects()
        self.timeout = timeout

    async def offload(
        self,
        body: BodyInput,
        threshold: int,
        *,
        message_type: str = "",
        readers: Sequence[str] = ("*",),
    ) -> OffloadResult:
        """``body`` with every value longer than ``threshold`` bytes offloaded.

        ``readers``: who besides the owner may read the offloaded content (``*``: everyone
        authenticated; empty: the owner and the agents only).
        """
        for reader in readers:
            if not reader or "," in reader:
                raise InvalidMessageError(f"reader {reader!r} is not a user name (or '*')")
        if type(body) is dict and inline(body, threshold):
            # Nothing to offload, every value already DAG-CBOR: the body travels as it is.
            return OffloadResult(body=body, readers=",".join(readers))
        result = OffloadResult(body={}, readers=",".join(readers))
        for key, value in body.items():
            if not isinstance(key, str):
                raise InvalidMessageError(f"body key {key!r} is not a string")
            result.body[key] = await self._value(value, (key,), threshold, message_type, result)
        return result

    async def _value(
        self,
        value: object,
        path: FieldPath,
        threshold: int,
        message_type: str,
        result: OffloadResult,
    ) -> Value:
        if isinstance(value, ContentRef):
            return value.to_value()
        if isinstance(value, bytearray | memoryview):
            value = bytes(value)
        if isinstance(value, bytes):
            if len(value) <= threshold:
                return value
            return await self._store(
                io.BytesIO(value), len(value), OCTET_STREAM, None, path, message_type, result
            )
        if isinstance(value, str):
            raw = value.encode("utf-8")
            if len(raw) <= threshold:
                return value
            return await self._store(
                io.BytesIO(raw), len(raw), TEXT_PLAIN, "utf-8", path, message_type, result
            )
        if isinstance(value, Attachment):
            return await self._attachment(value, path, threshold, message_type, result)
        if isinstance(value, Mapping):
            if ContentRef.from_value(value) is not None:
                return dict(value)  # a marker passed on: already in the object store
            out: dict[str, Value] = {}
            for key, item in value.items():
                if not isinstance(key, str):
                    raise InvalidMessageError(
                        f"body key {key!r} at {path_text(path)} is not a string"
                    )
                out[key] = await self._value(item, (*path, key), threshold, message_type, result)
            return out
        if isinstance(value, list | tuple):
            return [
                await self._value(item, (*path, index), threshold, message_type, result)
                for index, item in enumerate(value)
            ]
        if value is None or isinstance(value, bool | int | float | Link):
            return value
        raise InvalidMessageError(
            f"body value at {path_text(path)} is a {type(value).__name__}; use DAG-CBOR values "
            "(None, bool, int, float, str, bytes, list, dict, Link) or an Attachment"
        )

    async def _attachment(
        self,
        attachment: Attachment,
        path: FieldPath,
        threshold: int,
        message_type: str,
        result: OffloadResult,
    ) -> Value:
        size = attachment.size
        source = attachment.source
        if size <= threshold:
            return source.read_bytes() if not isinstance(source, bytes) else source
        content_type = attachment.content_type
        if isinstance(source, bytes):
            return await self._store(
                io.BytesIO(source), size, content_type, None, path, message_type, result
            )
        with source.open("rb") as stream:
            return await self._store(stream, size, content_type, None, path, message_type, result)

    async def _store(
        self,
        stream: BinaryIO,
        size: int,
        content_type: str,
        encoding: str | None,
        path: FieldPath,
        message_type: str,
        result: OffloadResult,
    ) -> Value:
        """Upload ``stream``, record it in ``result`` as offloaded from ``path``; the link value."""
        metadata = {CONTENT_TYPE_METADATA: content_type, READERS_KEY: result.readers}
        if message_type:
            metadata[MESSAGE_TYPE_METADATA] = message_type
        stored = await upload(
            self.nc,
            self.node,
            stream,
            owner=self.owner,
            metadata=metadata,
            size=size,
            subjects=self.subjects,
            timeout=self.timeout,
        )
        ref = ContentRef(stored.cid, stored.size, content_type, encoding)
        result.offloaded[path] = ref
        return ref.to_value()

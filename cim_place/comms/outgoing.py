"""The envelope of an outgoing message, and its bytes: the sending side before the publish.

:class:`Outgoing` owns the sender's fast path. Most messages are small: their envelope is built
and encoded at once, without awaiting. When the bytes are no longer than the offload threshold,
no value of the body is longer either (and the codec took nothing but plain DAG-CBOR values), so
the offloader's walk has nothing to do, nor ``inline()``'s pass over the body: the encoded length
is the size check, and the bytes encoded are the bytes sent. Anything else (a longer envelope, an
offload marker passed on, an Attachment, a tuple) takes the offloader's walk as before.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from cim_place.cluster.nats.envelope import Content, Envelope
from cim_place.comms.content import OFFLOAD_KEY, InvalidMessageError
from cim_place.comms.message import Message
from cim_place.comms.offload import Offloader, inline
from cim_place.comms.settings import ThresholdCache
from cim_place.objectstore.dagcbor import DagCborError

__all__ = ["Outgoing"]

_MARKER = b"\x68" + OFFLOAD_KEY.encode()
"""``$offload`` as a DAG-CBOR text string: an encoded body holding an offload marker has it."""


class Outgoing:
    """Builds the envelopes a client sends, as ``owner``, offloading through ``offloader``.

    ``nc`` is the client's connection (its server's max payload bounds a message).
    """

    def __init__(
        self,
        nc: Any,
        threshold: ThresholdCache,
        offloader: Offloader,
        *,
        owner: str,
        readers: tuple[str, ...],
    ) -> None:
        self.nc = nc
        self.threshold = threshold
        self.offloader = offloader
        self.owner = owner
        self.readers = readers

    async def prepare(
        self,
        content: Content,
        cause: Message | Envelope | None,
        metadata: Mapping[str, str] | None,
        readers: Sequence[str] | None,
    ) -> tuple[Envelope, bytes | None]:
        """The envelope to send, and its bytes when they are known already (else None)."""
        ready = self.inline(content, cause, metadata)
        if ready is not None:
            return ready
        return await self.offloaded(content, cause, metadata, readers), None

    def inline(
        self,
        content: Content,
        cause: Message | Envelope | None,
        metadata: Mapping[str, str] | None,
    ) -> tuple[Envelope, bytes] | None:
        """The envelope of a body that needs no offload, and its bytes; else None."""
        threshold = self.threshold.peek()
        body = content.body
        if threshold is None or type(body) is not dict:
            return None
        if cause is None:
            envelope = Envelope.new(content, owner=self.owner, metadata=metadata)
        else:
            origin = cause.envelope if isinstance(cause, Message) else cause
            envelope = origin.caused(content, owner=self.owner, metadata=metadata)
        try:
            data = envelope.encode()
        except DagCborError:
            return None  # an Attachment, a tuple, a ContentRef...: the walk makes values of them
        # find(), not "in": bytes.__contains__ first tries its argument as an int, and that
        # failure costs more than the search.
        if (len(data) > threshold or data.find(_MARKER) >= 0) and not inline(body, threshold):
            return None
        return envelope, data

    async def offloaded(
        self,
        content: Content,
        cause: Message | Envelope | None,
        metadata: Mapping[str, str] | None,
        readers: Sequence[str] | None,
    ) -> Envelope:
        """The envelope of ``content`` once the offloader's walk has stored its large values."""
        threshold = await self.threshold.get()
        offloaded = await self.offloader.offload(
            content.body,
            threshold,
            message_type=content.type,
            readers=self.readers if readers is None else readers,
        )
        ready = Content(content.kind, content.type, offloaded.body)
        origin = cause.envelope if isinstance(cause, Message) else cause
        if origin is None:
            return Envelope.new(ready, owner=self.owner, metadata=metadata)
        return origin.caused(ready, owner=self.owner, metadata=metadata)

    def encode(self, envelope: Envelope, data: bytes | None = None) -> bytes:
        """The bytes of ``envelope`` (``data`` when already encoded), within the max payload."""
        if data is None:
            data = envelope.encode()
        limit = int(getattr(self.nc, "max_payload", 0) or 0)
        if limit and len(data) > limit:
            raise too_large(envelope, len(data), limit)
        return data


def too_large(envelope: Envelope, size: int, limit: int) -> InvalidMessageError:
    """The error for a message above the server's max payload once its values are offloaded."""
    return InvalidMessageError(
        f"{envelope.content.type} message is {size} bytes after offloading, above "
        f"the server's max payload of {limit}: its many inline values add up; lower the "
        "offload threshold (cim_place.comms.settings) or send the values as Attachments"
    )

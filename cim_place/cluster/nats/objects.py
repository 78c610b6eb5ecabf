"""Reading whole objects of a JetStream object store, fast and checked.

This module owns :func:`read_object` and :func:`read_object_parts`. nats-py's
``ObjectStore.get`` appends every chunk to one ``bytes`` (quadratic on a large object) and pays
an ordered consumer's bookkeeping and, with ``writeinto``, an executor call per chunk; here the
chunks arrive on one push consumer without acks (as the event feed reads the event store), are
kept as they came (or joined once) and are checked against the object's size and SHA-256 digest
from its metadata. Any gap, silence or mismatch raises TransportError: the caller decides what
an unreadable object means.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib

from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.client import JetStreamContext
from nats.js.object_store import ObjectStore

from cim_place.errors import TransportError

__all__ = ["read_object", "read_object_parts"]

_SILENCE = 10.0
"""Seconds without a chunk after which a read fails."""


async def read_object(js: JetStreamContext, store: ObjectStore, bucket: str, name: str) -> bytes:
    """The object ``name`` of ``store`` (bucket ``bucket``) whole, checked against its digest."""
    return b"".join(await read_object_parts(js, store, bucket, name))


async def read_object_parts(
    js: JetStreamContext, store: ObjectStore, bucket: str, name: str
) -> list[bytes]:
    """The chunks of the object ``name``, in order, checked against its size and digest: for a
    reader that consumes them one at a time (a large object never exists twice in memory)."""
    info = await store.get_info(name)
    if not info.nuid or info.digest is None or not info.size:
        raise TransportError(f"object {name} of {bucket} has no content")
    subject = f"$O.{bucket}.C.{info.nuid}"
    parts = await _read_chunks(js, f"OBJ_{bucket}", subject, info.chunks or 0)
    hashed = hashlib.sha256()
    size = 0
    for part in parts:
        hashed.update(part)
        size += len(part)
    digest = base64.urlsafe_b64encode(hashed.digest()).decode().rstrip("=")
    if size != info.size or info.digest.split("=", 1)[-1].rstrip("=") != digest:
        raise TransportError(f"object {name} of {bucket}: {size} bytes not matching its digest")
    return parts


def _consumer_sequence(reply: str | None) -> int:
    """The consumer sequence in a delivered message's ack subject (0 if there is none):
    ``$JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ns>.<pending>``, or the form with a
    domain and an account hash after ``$JS.ACK`` and a trailing token."""
    if not reply:
        return 0
    tokens = reply.split(".")
    with contextlib.suppress(ValueError, IndexError):
        return int(tokens[6] if len(tokens) == 9 else tokens[8])
    return 0


async def _read_chunks(js: JetStreamContext, stream: str, subject: str, chunks: int) -> list[bytes]:
    """The ``chunks`` messages on ``subject`` (one object's chunks), in order.

    One push consumer without acks, as the event feed reads (nats-py's ``ObjectStore.get`` pays
    an ordered consumer's bookkeeping and an executor call per chunk, and concatenates as it
    goes); a consumer sequence that skips or a silence of ``_SILENCE`` s fails the read, which
    the caller treats as an unreadable object.
    """
    nc = js._nc
    parts: list[bytes] = []
    done = asyncio.Event()
    failed: list[str] = []

    async def on_message(msg: Msg) -> None:
        if not msg.data and msg.headers and "Status" in msg.headers:
            if msg.reply:  # flow control: everything before it was taken
                await nc.publish(msg.reply)
            return
        consumer_sequence = _consumer_sequence(msg.reply)
        if consumer_sequence != len(parts) + 1:
            failed.append(f"chunk {consumer_sequence} arrived after {len(parts)}")
            done.set()
            return
        parts.append(msg.data)
        if len(parts) == chunks:
            done.set()

    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox, cb=on_message)
    consumer = None
    try:
        info = await js.add_consumer(
            stream,
            ConsumerConfig(
                deliver_subject=inbox,
                filter_subject=subject,
                deliver_policy=DeliverPolicy.ALL,
                ack_policy=AckPolicy.NONE,
                flow_control=True,
                idle_heartbeat=2.0,
                mem_storage=True,
                num_replicas=1,
                inactive_threshold=60.0,
            ),
        )
        consumer = info.name
        while not done.is_set():
            taken = len(parts)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), _SILENCE)
            if not done.is_set() and len(parts) == taken:
                raise TransportError(f"no chunk for {_SILENCE:.0f} s after {taken} of {chunks}")
        if failed:
            raise TransportError(failed[0])
    finally:
        await sub.unsubscribe()
        if consumer is not None:
            with contextlib.suppress(Exception):
                await js.delete_consumer(stream, consumer)
    return parts

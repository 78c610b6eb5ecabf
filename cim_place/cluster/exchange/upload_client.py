"""The client side of uploads: ``upload`` streams a file through the agent of a node.

It owns the client's half of a session (open, chunks under the agent's window, finish, abort on
any failure) and ``wait_for_uploads``, which probes that an agent's upload service is reachable.
The protocol itself is described in ``upload_wire``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, BinaryIO

from cim_place.cluster.exchange.upload_wire import (
    _ABORT,
    _ACK,
    _DONE,
    _ERROR,
    _FINISH,
    _MIN_CHUNK,
    _OPEN,
    _OPENED,
    _PING,
    _PONG,
    DEFAULT_HEADROOM,
    FULL,
    INVALID,
    MALFORMED,
    NOT_ALLOWED,
    STORE,
    TIMEOUT,
    UploadError,
    _body,
    _control,
    _count,
    _data_head,
    _kind,
    _ProtocolError,
    _session_of,
)
from cim_place.cluster.nats.security import AccessDeniedError
from cim_place.cluster.nats.subjects import Subjects
from cim_place.errors import StoreError, StoreFullError, TransportError
from cim_place.objectstore import dagcbor
from cim_place.objectstore.cid import Cid, parse, to_str
from cim_place.objectstore.unixfs import DEFAULT_PROFILE

__all__ = ["UploadResult", "upload", "wait_for_uploads"]

_log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 10.0


@dataclass(frozen=True, slots=True)
class UploadResult:
    """What the agent pinned."""

    cid: Cid
    size: int
    """File bytes."""
    blocks: int
    """Distinct blocks in the DAG."""

    @property
    def cid_text(self) -> str:
        return to_str(self.cid)


def _raise_error(node: str, body: Mapping[str, dagcbor.Value]) -> None:
    code = body.get("code")
    message = body.get("message")
    code = code if isinstance(code, str) else "error"
    text = message if isinstance(message, str) and message else f"upload to {node} failed"
    if code == FULL:
        raise StoreFullError(text)
    if code in (INVALID, STORE):
        raise StoreError(text)
    if code == NOT_ALLOWED:
        raise AccessDeniedError(text)
    raise UploadError(code, text)


async def upload(
    nc: Any,
    node: str,
    stream: BinaryIO,
    *,
    name: str | None = None,
    owner: str = "",
    metadata: Mapping[str, str] | None = None,
    profile: str = DEFAULT_PROFILE,
    size: int | None = None,
    progress: Callable[[int], None] | None = None,
    subjects: Subjects | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    window: int | None = None,
) -> UploadResult:
    """Store the bytes of ``stream`` through the agent of ``node``; returns what it pinned.

    ``size`` (when known) lets the agent refuse at once when the volume cannot take it.
    ``progress(n)`` gets the bytes of each chunk sent. ``timeout`` bounds every wait for the
    agent (the open reply, an acknowledgement, the final answer after the last one); ``window``
    can lower the agent's window. Raises StoreFullError when the volume is full, StoreError for
    a bad profile or a store failure on the agent, UploadError (a TransportError) when the
    session fails (busy agent, lost chunk, timeout), TransportError when no agent answers. On
    any failure or cancellation the session is aborted, and nothing is pinned.
    """
    subject = (subjects if subjects is not None else Subjects()).agent_add(node)
    replies: asyncio.Queue[bytes] = asyncio.Queue()

    async def on_reply(msg: Any) -> None:
        replies.put_nowait(msg.data)

    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox, cb=on_reply, pending_msgs_limit=0, pending_bytes_limit=0)
    own_max = int(getattr(nc, "max_payload", 0) or 0)
    session: bytes | None = None
    reading: asyncio.Future[tuple[bytearray, int]] | None = None
    done = False
    try:
        opened = await _open(
            nc,
            subject,
            node,
            {
                "name": name,
                "owner": owner,
                "metadata": dict(metadata or {}),
                "profile": profile,
                "size": size,
                "inbox": inbox,
                "max_payload": own_max,
            },
            timeout,
        )
        session = _session_of(opened)
        chunk_size = _count(opened, "chunk") or 0
        agent_window = _count(opened, "window") or 1
        if chunk_size < _MIN_CHUNK:
            raise UploadError(MALFORMED, f"the agent of {node} offered chunks of {chunk_size} B")
        if own_max:
            chunk_size = min(chunk_size, own_max - DEFAULT_HEADROOM)
        limit = max(1, min(agent_window, window or agent_window))
        flow = _Flow(node, replies, timeout)
        loop = asyncio.get_running_loop()
        sent = total = 0
        read = reading = loop.run_in_executor(None, _read_chunk, stream, session, 0, chunk_size)
        while True:
            message, n = await read
            if not n:
                break
            # Read the next chunk while this one waits for room in the window and is sent.
            read = reading = loop.run_in_executor(
                None, _read_chunk, stream, session, sent + 1, chunk_size
            )
            flow.poll()
            while sent - flow.acked >= limit:
                await flow.wait()
            await nc.publish(subject, message)
            sent += 1
            total += n
            if progress is not None:
                progress(n)
        await nc.publish(
            subject, _control(_FINISH, {"session": session, "chunks": sent, "size": total})
        )
        result = await flow.result()
        done = True
        return result
    finally:
        if reading is not None and not reading.done():
            # A read still running in its thread: nobody will await it; keep its error quiet.
            reading.add_done_callback(lambda f: f.cancelled() or f.exception())
        if session is not None and not done:
            # Best effort: the agent's idle timeout covers a lost abort.
            with contextlib.suppress(Exception):
                await nc.publish(
                    subject, _control(_ABORT, {"session": session, "reason": "client stopped"})
                )
                await nc.flush(timeout=1)
        with contextlib.suppress(Exception):
            await sub.unsubscribe()


def _read_chunk(stream: BinaryIO, session: bytes, seq: int, size: int) -> tuple[bytearray, int]:
    """(data message, its chunk's length) for the next ``size`` bytes of ``stream``.

    The bytes are read straight behind the message header (``readinto`` when the stream has it),
    so a chunk is not copied again to be framed. A short read makes a short chunk; 0 is the end.
    """
    head = _data_head(session, seq)
    readinto = getattr(stream, "readinto", None)
    if readinto is None:
        data = stream.read(size)
        return bytearray(head) + data, len(data)
    message = bytearray(len(head) + size)
    message[: len(head)] = head
    n = readinto(memoryview(message)[len(head) :]) or 0
    if n < size:
        del message[len(head) + n :]
    return message, n


async def _open(
    nc: Any, subject: str, node: str, body: dict[str, dagcbor.Value], timeout: float
) -> dict[str, dagcbor.Value]:
    from nats.errors import NoRespondersError

    try:
        reply = await nc.request(subject, _control(_OPEN, body), timeout=timeout)
    except NoRespondersError:
        raise TransportError(
            f"no agent takes uploads for node {node} ({subject}); check that its agent runs "
            "and is connected, and the node id"
        ) from None
    except TimeoutError:
        raise TransportError(
            f"the agent of {node} did not answer the upload request within {timeout:g} s; "
            "check that it runs, or raise the timeout"
        ) from None
    try:
        kind = _kind(reply.data)
        body_in = _body(reply.data)
    except _ProtocolError as exc:
        raise UploadError(MALFORMED, f"the agent of {node} answered oddly: {exc}") from None
    if kind == _ERROR:
        _raise_error(node, body_in)
    if kind != _OPENED:
        raise UploadError(MALFORMED, f"the agent of {node} answered with kind 0x{kind:02x}")
    return body_in


class _Flow:
    """The client's view of a session's replies: acknowledgements, errors, the final answer."""

    def __init__(self, node: str, replies: asyncio.Queue[bytes], timeout: float) -> None:
        self.node = node
        self.replies = replies
        self.timeout = timeout
        self.acked = 0
        self.done: UploadResult | None = None

    def _handle(self, data: bytes) -> None:
        try:
            kind = _kind(data)
            body = _body(data)
        except _ProtocolError as exc:
            _log.warning("ignoring a malformed reply of %s: %s", self.node, exc)
            return
        if kind == _ERROR:
            _raise_error(self.node, body)
        elif kind == _ACK:
            self.acked = max(self.acked, _count(body, "acked") or 0)
        elif kind == _DONE:
            cid = body.get("cid")
            if not isinstance(cid, str):
                raise UploadError(MALFORMED, f"the agent of {self.node} answered without a CID")
            self.done = UploadResult(
                parse(cid), _count(body, "size") or 0, _count(body, "blocks") or 0
            )

    def poll(self) -> None:
        """Handle what has arrived, without waiting (an error raises here)."""
        while not self.replies.empty():
            self._handle(self.replies.get_nowait())

    async def wait(self) -> None:
        """Handle the next reply, waiting at most ``timeout``."""
        try:
            data = await asyncio.wait_for(self.replies.get(), self.timeout)
        except TimeoutError:
            raise UploadError(
                TIMEOUT,
                f"the agent of {self.node} sent nothing for {self.timeout:g} s during the "
                "upload; check that it runs, then upload again",
            ) from None
        self._handle(data)

    async def result(self) -> UploadResult:
        while self.done is None:
            await self.wait()
        return self.done


async def wait_for_uploads(
    nc: Any,
    node: str,
    *,
    subjects: Subjects | None = None,
    timeout: float = 5.0,
    interval: float = 0.1,
) -> bool:
    """True once the UploadService of ``node`` answers a ping from here, False on timeout.

    A service's subscription reaches other leaves through the hub asynchronously; a client
    that has just started (or a test) can use this to know that an upload will find it.
    """
    subject = (subjects if subjects is not None else Subjects()).agent_add(node)
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        try:
            reply = await nc.request(
                subject, _control(_PING, {}), timeout=min(max(interval * 5, 0.05), left)
            )
            if _kind(reply.data) == _PONG:
                return True
        except Exception as exc:  # no responders, timeouts: not there yet
            _log.debug("probing the upload service of %s: %s", node, exc)
        await asyncio.sleep(min(interval, max(0.0, deadline - time.monotonic())))

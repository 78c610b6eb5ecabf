"""Adding content through a running agent: the upload protocol, its agent side and its client.

This module owns ``<prefix>.agent.<node>.add`` (``Subjects.agent_add``). The agent owns its
store, so a CLI on any machine (``cim-place add --server URL FILE``), or a messaging layer that
offloads a large payload, hands the bytes to the agent, which imports them as a UnixFS DAG, pins
the root and answers with the pin. Memory stays constant on both sides whatever the file size.

The protocol, one session per upload:

1. **open** (request/reply): name, owner, metadata, profile, optional expected size, the
   client's reply inbox and its server's max payload. The agent answers with a session id, the
   chunk size (the smaller max payload of both servers, minus headroom) and the window, or with
   an error: ``busy`` (too many sessions), ``full`` (the expected size does not fit), ``invalid``.
2. **data**: the file bytes in chunks, each numbered by a sequence number from 0. At most
   ``window`` chunks are unacknowledged; the agent acknowledges a chunk (cumulatively, on the
   client's inbox) once its importer has *consumed* it, so a slow disk slows the client instead
   of filling memory. A gap in the numbers means a chunk was lost (core NATS is at most once):
   the session fails with ``lost``; a repeated number is ignored.
3. **finish**: the number of chunks and bytes sent. The agent checks them, lets the importer see
   the end of the file, pins the root, calls ``on_pinned(pin)`` (the agent publishes
   ObjectStored there) and sends ``done`` with the CID, size and block count.

Owner: in a domain that authenticates its users (the agent itself connects with credentials),
the owner of the new pin is the requester NATS vouches for (``security.requester_of`` of the
open request's reply subject), never a field the client sends: an empty ``owner`` becomes the
requester, a different one is refused with ``not-allowed``, and so is an anonymous requester.
In an open domain (no users) the client's ``owner`` is taken as it is.

Either side may end a session early: the client with **abort**, the agent with **error** (a full
volume, a lost chunk, an idle timeout, the agent stopping). The importer pins only at the very
end, so a session that ends early leaves no pin; the blocks it wrote are unreferenced and go at
the next garbage collection.

Inside the agent, the NATS handler feeds chunks into a :class:`ChunkPipe` that a worker thread
reads as a file; ``ObjectStore.add`` runs there synchronously, unchanged.

Wire format: every message starts with ``0xCA 0x01 kind``. A data message continues with
``varint(len) session varint(seq)`` and the chunk bytes (no re-encoding); every other kind
continues with a DAG-CBOR map (``cim_place.objectstore.dagcbor``).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import os
import queue
import time
from collections.abc import Awaitable, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from cim_place.cluster.nats.security import AccessDeniedError, requester_of
from cim_place.cluster.nats.subjects import Subjects
from cim_place.errors import ProtocolError, StoreError, StoreFullError, TransportError
from cim_place.interfaces import Pin
from cim_place.objectstore import dagcbor
from cim_place.objectstore.cid import Cid, parse, read_varint, to_str, varint
from cim_place.objectstore.store import ObjectStore
from cim_place.objectstore.unixfs import DEFAULT_PROFILE, get_profile

__all__ = [
    "DEFAULT_HEADROOM",
    "ChunkPipe",
    "OnPinned",
    "UploadAborted",
    "UploadError",
    "UploadResult",
    "UploadService",
    "UploadStats",
    "upload",
    "wait_for_uploads",
]

_log = logging.getLogger(__name__)

MAGIC = 0xCA
VERSION = 1
# client -> agent
_OPEN = 0x01
_DATA = 0x02
_FINISH = 0x03
_ABORT = 0x04
_PING = 0x05
# agent -> client
_OPENED = 0x81
_ACK = 0x82
_DONE = 0x83
_PONG = 0x84
_ERROR = 0xEE

DEFAULT_HEADROOM = 512
"""Bytes of a message kept free for the data framing (session id, sequence number)."""
DEFAULT_WINDOW = 8
DEFAULT_MAX_SESSIONS = 4
DEFAULT_IDLE_TIMEOUT = 30.0
DEFAULT_TIMEOUT = 10.0
_MIN_CHUNK = 1024
_MAX_CONTROL_BYTES = 64 * 1024
_MAX_SESSION_ID = 64

# Error codes an agent sends, and what the client raises for each.
FULL = "full"
"""The volume has no room (StoreFullError on the client)."""
INVALID = "invalid"
"""The open request asks for something impossible: an unknown profile, bad metadata."""
BUSY = "busy"
"""The agent already runs its limit of concurrent sessions; retry later."""
LOST = "lost"
"""A chunk never arrived, or the client sent more than the window allowed."""
TIMEOUT = "timeout"
"""The session saw no progress for the agent's idle timeout."""
ABORTED = "aborted"
"""The client aborted the session."""
STOPPING = "stopping"
"""The agent is shutting down."""
STORE = "store"
"""The store failed (I/O error); StoreError on the client."""
MALFORMED = "malformed"
"""A message that does not follow this protocol."""
NOT_ALLOWED = "not-allowed"
"""In a domain that authenticates its users: an anonymous upload, or one claiming another
owner (AccessDeniedError on the client)."""


class UploadError(TransportError):
    """An upload session failed; ``code`` says why (one of the codes of this module)."""

    def __init__(self, code: str, message: str) -> None:
        self.code = code
        super().__init__(message)


class UploadAborted(StoreError):
    """Raised inside the importer's reads when a session ends early; nothing gets pinned."""

    def __init__(self, code: str, message: str) -> None:
        self.code = code
        super().__init__(message)


class _ProtocolError(ProtocolError):
    pass


class _Refused(Exception):
    def __init__(self, code: str, message: str) -> None:
        self.code = code
        super().__init__(message)


# -- framing -------------------------------------------------------------------------------------


def _control(kind: int, body: Mapping[str, dagcbor.Value]) -> bytes:
    return bytes((MAGIC, VERSION, kind)) + dagcbor.encode(dict(body))


def _data_head(session: bytes, seq: int) -> bytes:
    return bytes((MAGIC, VERSION, _DATA)) + varint(len(session)) + session + varint(seq)


def _kind(data: bytes) -> int:
    if len(data) < 3 or data[0] != MAGIC:
        raise _ProtocolError("not a cim-place upload message (bad magic byte)")
    if data[1] != VERSION:
        raise _ProtocolError(f"upload protocol version {data[1]}; this node speaks {VERSION}")
    return data[2]


def _body(data: bytes) -> dict[str, dagcbor.Value]:
    if len(data) > _MAX_CONTROL_BYTES:
        raise _ProtocolError(f"control message of {len(data)} bytes; at most {_MAX_CONTROL_BYTES}")
    try:
        value = dagcbor.decode(bytes(data[3:]))
    except ValueError as exc:
        raise _ProtocolError(f"control message is not DAG-CBOR: {exc}") from None
    if not isinstance(value, dict):
        raise _ProtocolError("control message is not a map")
    return value


def _split_data(data: bytes) -> tuple[bytes, int, memoryview]:
    """(session, seq, chunk view) of a data message."""
    view = memoryview(data)
    try:
        size, pos = read_varint(view, 3)
        if not 0 < size <= _MAX_SESSION_ID or pos + size > len(view):
            raise _ProtocolError(f"data message with an impossible session id length {size}")
        session = bytes(view[pos : pos + size])
        seq, pos = read_varint(view, pos + size)
    except _ProtocolError:
        raise
    except ValueError as exc:
        raise _ProtocolError(f"truncated data message: {exc}") from None
    return session, seq, view[pos:]


def _text(body: Mapping[str, dagcbor.Value], key: str, default: str = "") -> str:
    value = body.get(key, default)
    if not isinstance(value, str):
        raise _ProtocolError(f"'{key}' must be a string")
    return value


def _count(body: Mapping[str, dagcbor.Value], key: str) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise _ProtocolError(f"'{key}' must be a non-negative integer")
    return value


def _session_of(body: Mapping[str, dagcbor.Value]) -> bytes:
    value = body.get("session")
    if not isinstance(value, bytes) or not 0 < len(value) <= _MAX_SESSION_ID:
        raise _ProtocolError("'session' must be a session id (bytes)")
    return value


# -- the pipe between the NATS handler and the importer thread -----------------------------------


class _End:
    pass


@dataclass(frozen=True, slots=True)
class _Stop:
    code: str
    message: str


_Item = memoryview | _End | _Stop


class ChunkPipe:
    """A file-like stream fed with chunks by the event loop and read by an importer thread.

    ``feed``/``finish``/``abort`` never block (the caller bounds what is fed: the window);
    ``read``/``readinto`` block until data, the end (``b""``/0) or an abort (raises
    UploadAborted). ``on_consumed(n)`` is called from the reading thread each time a whole chunk
    has been read, with the number of chunks consumed so far.
    """

    def __init__(self, on_consumed: Callable[[int], None] | None = None) -> None:
        self._queue: queue.SimpleQueue[_Item] = queue.SimpleQueue()
        self._on_consumed = on_consumed
        self._current: memoryview | None = None
        self._pos = 0
        self._ended = False
        self.fed = 0
        self.consumed = 0

    @property
    def pending(self) -> int:
        """Chunks fed and not yet wholly read."""
        return self.fed - self.consumed

    def feed(self, chunk: memoryview | bytes) -> None:
        self.fed += 1
        self._queue.put(memoryview(chunk))

    def finish(self) -> None:
        self._queue.put(_End())

    def abort(self, code: str, message: str) -> None:
        self._queue.put(_Stop(code, message))

    def _chunk(self) -> memoryview | None:
        """The chunk being read (waiting for one if needed); None at the end."""
        while self._current is None:
            if self._ended:
                return None
            item = self._queue.get()
            if isinstance(item, _Stop):
                raise UploadAborted(item.code, item.message)
            if isinstance(item, _End):
                self._ended = True
                return None
            if len(item):
                self._current, self._pos = item, 0
            else:
                self._consumed_one()
        return self._current

    def _consumed_one(self) -> None:
        self.consumed += 1
        if self._on_consumed is not None:
            self._on_consumed(self.consumed)

    def readinto(self, buffer: memoryview | bytearray) -> int:
        target = memoryview(buffer).cast("B")
        filled = 0
        while filled < len(target):
            chunk = self._chunk()
            if chunk is None:
                break
            n = min(len(target) - filled, len(chunk) - self._pos)
            target[filled : filled + n] = chunk[self._pos : self._pos + n]
            filled += n
            self._pos += n
            if self._pos == len(chunk):
                self._current = None
                self._consumed_one()
        return filled

    def read(self, size: int = -1, /) -> bytes:
        if size < 0:
            parts = []
            while piece := self.read(1 << 20):
                parts.append(piece)
            return b"".join(parts)
        # Views of the chunks joined once: one copy, into the fresh bytes the importer keeps.
        pieces: list[memoryview] = []
        wanted = size
        while wanted > 0:
            chunk = self._chunk()
            if chunk is None:
                break
            n = min(wanted, len(chunk) - self._pos)
            pieces.append(chunk[self._pos : self._pos + n])
            wanted -= n
            self._pos += n
            if self._pos == len(chunk):
                self._current = None
                self._consumed_one()
        return b"".join(pieces)


# -- the agent side ------------------------------------------------------------------------------

OnPinned = Callable[[Pin], Awaitable[None] | None]
"""Called on the event loop after an upload is pinned, before the client hears ``done``."""


@dataclass(slots=True)
class UploadStats:
    """Counters of an UploadService, for metrics (monotonic since start)."""

    sessions: int = 0
    """Sessions opened."""
    pinned: int = 0
    bytes_received: int = 0
    chunks_received: int = 0
    duplicates: int = 0
    """Data messages received twice (ignored)."""
    refused: int = 0
    """Open requests refused (busy, full, invalid)."""
    failed: int = 0
    """Sessions ended without a pin (aborted, timed out, lost chunks, full, store errors)."""
    malformed: int = 0
    """Messages ignored or refused as not following the protocol, or for no known session."""
    hook_errors: int = 0
    """``on_pinned`` calls that raised (the pin stands; the event must be repaired later)."""


@dataclass(slots=True)
class _Session:
    id: bytes
    inbox: str
    name: str | None
    owner: str
    metadata: dict[str, str]
    profile: str
    pipe: ChunkPipe
    next_seq: int = 0
    received: int = 0
    finished: bool = False
    ended: bool = False
    last_activity: float = field(default_factory=time.monotonic)
    acked: int = 0
    ack_target: int = 0
    ack_task: asyncio.Task[None] | None = None
    """The task that sends acknowledgements; None or done when none is being sent."""
    task: asyncio.Task[None] | None = None


class UploadService:
    """Takes uploads into ``store`` on ``Subjects.agent_add(node)``.

    Usage::

        service = UploadService(nc, "leaf-a", store, on_pinned=publish_object_stored)
        await service.start()
        ...
        await service.stop()

    ``store`` is the volume that takes new content, or a callable choosing one from the expected
    size (None when the client did not say). At most ``max_sessions`` uploads run at a time,
    each in its own worker thread; each has at most ``window`` chunks buffered (a chunk is at
    most the server's max payload), so memory is bounded by about ``max_sessions x window x
    max_payload``. A session that sees no progress for ``idle_timeout`` seconds is aborted.
    """

    def __init__(
        self,
        nc: Any,
        node: str,
        store: ObjectStore | Callable[[int | None], ObjectStore],
        *,
        subjects: Subjects | None = None,
        on_pinned: OnPinned | None = None,
        max_sessions: int = DEFAULT_MAX_SESSIONS,
        window: int = DEFAULT_WINDOW,
        idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
        headroom: int = DEFAULT_HEADROOM,
        authenticated: bool = False,
        public_uploaders: frozenset[str] = frozenset(),
    ) -> None:
        self.nc = nc
        self.public_uploaders = public_uploaders
        """Users whose uploads without an owner have none (public), as in an open domain."""
        self.node = node
        self._store = store
        self.authenticated = authenticated
        """Owners come from the requester's identity (see the module docstring)."""
        self.subjects = subjects if subjects is not None else Subjects()
        self.subject = self.subjects.agent_add(node)
        self.on_pinned = on_pinned
        self.max_sessions = max(1, max_sessions)
        self.window = max(1, window)
        self.idle_timeout = idle_timeout
        self.headroom = headroom
        self.stats = UploadStats()
        self._sessions: dict[bytes, _Session] = {}
        self._sub: Any = None
        self._watchdog: asyncio.Task[None] | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def active(self) -> int:
        """Sessions open or still importing."""
        return len(self._sessions)

    def _choose(self, size: int | None) -> ObjectStore:
        if isinstance(self._store, ObjectStore):
            return self._store
        return self._store(size)

    def _chunk_limit(self, client_max: int) -> int:
        limit = int(getattr(self.nc, "max_payload", 0) or (1 << 20))
        if client_max:
            limit = min(limit, client_max)
        return max(_MIN_CHUNK, limit - self.headroom)

    async def start(self) -> None:
        """Subscribe; uploads are taken from now until ``stop``. Idempotent."""
        if self._sub is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._executor = ThreadPoolExecutor(self.max_sessions, thread_name_prefix="cim-upload")
        # Bounded by the protocol (window x sessions); a client ignoring its window has its
        # chunks dropped here, which its session sees as a lost chunk.
        limit = self._chunk_limit(0) + self.headroom
        self._sub = await self.nc.subscribe(
            self.subject,
            cb=self._on_message,
            pending_msgs_limit=4 * self.max_sessions * self.window + 1024,
            pending_bytes_limit=2 * self.max_sessions * self.window * limit + (1 << 20),
        )
        await self.nc.flush()
        self._watchdog = asyncio.create_task(self._watch_idle())

    async def stop(self) -> None:
        """Stop taking uploads; sessions in progress fail with ``stopping`` and leave no pin."""
        sub, self._sub = self._sub, None
        if sub is not None:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        if self._watchdog is not None:
            self._watchdog.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watchdog
            self._watchdog = None
        for session in list(self._sessions.values()):
            self._end(session, STOPPING, f"the agent of {self.node} is stopping; upload again")
        tasks = [s.task for s in self._sessions.values() if s.task is not None]
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    # -- messages --

    async def _on_message(self, msg: Any) -> None:
        try:
            kind = _kind(msg.data)
            if kind == _DATA:
                await self._on_data(msg.data)
            elif kind == _OPEN:
                await self._on_open(msg)
            elif kind == _FINISH:
                await self._on_finish(_body(msg.data))
            elif kind == _ABORT:
                self._on_abort(_body(msg.data))
            elif kind == _PING:
                if msg.reply:
                    await self.nc.publish(msg.reply, _control(_PONG, {"node": self.node}))
            else:
                raise _ProtocolError(f"unknown upload message kind 0x{kind:02x}")
        except _ProtocolError as exc:
            self.stats.malformed += 1
            _log.warning("ignoring a malformed upload message on %s: %s", self.subject, exc)
            if msg.reply:
                with contextlib.suppress(Exception):
                    await self.nc.publish(msg.reply, _error(MALFORMED, str(exc)))
        except Exception:
            self.stats.malformed += 1
            _log.exception("upload message on %s failed", self.subject)

    async def _on_open(self, msg: Any) -> None:
        if not msg.reply:
            raise _ProtocolError("open request without a reply subject")
        body = _body(msg.data)
        inbox = _text(body, "inbox")
        if not inbox:
            raise _ProtocolError("open request without an inbox for acknowledgements")
        size = _count(body, "size")
        client_max = _count(body, "max_payload") or 0
        try:
            owner = self._owner(requester_of(msg.reply), _text(body, "owner"))
            store = self._admit(body, size)
        except _Refused as refused:
            self.stats.refused += 1
            await self.nc.publish(msg.reply, _error(refused.code, str(refused)))
            return
        metadata = body.get("metadata") or {}
        assert isinstance(metadata, dict)  # checked by _admit
        name = body.get("name")
        loop = asyncio.get_running_loop()
        session_id = os.urandom(12)

        def consumed(count: int) -> None:  # in the importer's thread
            loop.call_soon_threadsafe(self._consumed, session_id, count)

        session = _Session(
            id=session_id,
            inbox=inbox,
            name=name if isinstance(name, str) else None,
            owner=owner,
            metadata={key: str(value) for key, value in metadata.items()},
            profile=_text(body, "profile", DEFAULT_PROFILE),
            pipe=ChunkPipe(consumed),
        )
        self._sessions[session.id] = session
        self.stats.sessions += 1
        session.task = asyncio.create_task(self._run(session, store))
        await self.nc.publish(
            msg.reply,
            _control(
                _OPENED,
                {
                    "session": session.id,
                    "chunk": self._chunk_limit(client_max),
                    "window": self.window,
                    "idle": float(self.idle_timeout),
                },
            ),
        )

    def _owner(self, requester: str | None, claimed: str) -> str:
        """The owner of the new pin; raises _Refused (see the module docstring)."""
        if not self.authenticated:
            return claimed
        if requester is None:
            raise _Refused(
                NOT_ALLOWED,
                f"not allowed: the agent of {self.node} takes uploads only from authenticated "
                "users; connect with your user's credentials",
            )
        if claimed and claimed != requester:
            raise _Refused(
                NOT_ALLOWED,
                f"not allowed: {requester} may not upload as owner {claimed!r}; leave the "
                f"owner out (it is you) or connect as {claimed}",
            )
        if not claimed and requester in self.public_uploaders:
            return ""
        return requester

    def _admit(self, body: Mapping[str, dagcbor.Value], size: int | None) -> ObjectStore:
        """The volume that takes this upload; raises _Refused when it cannot be served."""
        if len(self._sessions) >= self.max_sessions:
            raise _Refused(
                BUSY,
                f"the agent of {self.node} already runs {len(self._sessions)} uploads (its "
                f"limit is {self.max_sessions}); retry in a moment or raise the agent's limit",
            )
        try:
            get_profile(_text(body, "profile", DEFAULT_PROFILE))
        except StoreError as exc:
            raise _Refused(INVALID, str(exc)) from None
        name = body.get("name")
        if name is not None and (not isinstance(name, str) or not name):
            raise _Refused(INVALID, "the pin name must be a non-empty string")
        metadata = body.get("metadata") or {}
        if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            raise _Refused(INVALID, "metadata must map strings to strings")
        try:
            store = self._choose(size)
            free = store.blocks.free_bytes() if size is not None else 0
        except StoreFullError as exc:
            raise _Refused(FULL, str(exc)) from None
        except (StoreError, OSError) as exc:
            raise _Refused(STORE, f"the agent of {self.node} has no usable volume: {exc}") from None
        if size is not None and size > free:
            raise _Refused(
                FULL,
                f"volume {store.path} of {self.node} has {free} bytes free, the upload "
                f"needs {size}; free space with `cim-place gc`, raise the volume's "
                "capacity, or add a volume",
            )
        return store

    async def _on_data(self, data: bytes) -> None:
        session_id, seq, chunk = _split_data(data)
        session = self._sessions.get(session_id)
        if session is None or session.ended:
            # Chunks still in flight after a session ended: expected, not worth a warning.
            self.stats.malformed += 1
            return
        if seq < session.next_seq:
            self.stats.duplicates += 1
            return
        if session.finished:
            raise _ProtocolError("data after finish")
        if seq > session.next_seq:
            self._end(
                session,
                LOST,
                f"upload chunk {session.next_seq} never reached {self.node} (chunk {seq} did); "
                "the network dropped it: upload again",
            )
            return
        if session.pipe.pending >= self.window:
            self._end(
                session,
                LOST,
                f"the client sent more than {self.window} unacknowledged chunks; "
                "upload again with a client that honours the window",
            )
            return
        session.next_seq += 1
        session.received += len(chunk)
        session.last_activity = time.monotonic()
        self.stats.chunks_received += 1
        self.stats.bytes_received += len(chunk)
        session.pipe.feed(chunk)

    async def _on_finish(self, body: Mapping[str, dagcbor.Value]) -> None:
        session = self._sessions.get(_session_of(body))
        if session is None or session.ended or session.finished:
            self.stats.malformed += 1
            return
        chunks = _count(body, "chunks")
        size = _count(body, "size")
        session.last_activity = time.monotonic()
        if chunks != session.next_seq or size != session.received:
            self._end(
                session,
                LOST,
                f"the client sent {chunks} chunks ({size} bytes) but {self.node} received "
                f"{session.next_seq} ({session.received} bytes); upload again",
            )
            return
        session.finished = True
        session.pipe.finish()

    def _on_abort(self, body: Mapping[str, dagcbor.Value]) -> None:
        session = self._sessions.get(_session_of(body))
        if session is None:
            return
        reason = body.get("reason")
        why = reason if isinstance(reason, str) and reason else "no reason given"
        self._end(session, ABORTED, f"the client aborted the upload: {why}")

    def _end(self, session: _Session, code: str, message: str) -> None:
        """Make the session's importer fail (no pin); its task reports ``code`` to the client."""
        if session.ended:
            return
        session.ended = True
        session.pipe.abort(code, message)

    # -- the import --

    async def _run(self, session: _Session, store: ObjectStore) -> None:
        loop = asyncio.get_running_loop()
        try:
            try:
                pin = await loop.run_in_executor(self._executor, self._import, session, store)
            finally:
                session.ended = True
        except UploadAborted as exc:
            self.stats.failed += 1
            _log.info("upload session on %s ended without a pin: %s", self.node, exc)
            await self._tell(session, _error(exc.code, str(exc)))
        except StoreFullError as exc:
            self.stats.failed += 1
            _log.warning("upload to %s refused: %s", self.node, exc)
            await self._tell(session, _error(FULL, str(exc)))
        except StoreError as exc:
            self.stats.failed += 1
            _log.error("upload to %s failed: %s", self.node, exc)
            await self._tell(session, _error(STORE, str(exc)))
        except Exception as exc:
            self.stats.failed += 1
            _log.exception("upload to %s failed", self.node)
            await self._tell(session, _error(STORE, f"the agent of {self.node} failed: {exc}"))
        else:
            self.stats.pinned += 1
            await self._pinned(pin)
            await self._tell(
                session,
                _control(_DONE, {"cid": to_str(pin.root), "size": pin.size, "blocks": pin.blocks}),
            )
        finally:
            self._sessions.pop(session.id, None)

    @staticmethod
    def _import(session: _Session, store: ObjectStore) -> Pin:
        return store.add(
            session.pipe,  # type: ignore[arg-type]  # file-like: read/readinto
            name=session.name,
            profile=session.profile,
            owner=session.owner,
            metadata=session.metadata,
        )

    async def _pinned(self, pin: Pin) -> None:
        if self.on_pinned is None:
            return
        try:
            result = self.on_pinned(pin)
            if inspect.isawaitable(result):
                await result
        except Exception:
            self.stats.hook_errors += 1
            _log.exception("on_pinned failed for %s (the pin stands)", to_str(pin.root))

    async def _tell(self, session: _Session, message: bytes) -> None:
        try:
            await self.nc.publish(session.inbox, message)
        except Exception as exc:  # the client is gone; nothing else to do
            _log.debug("cannot reach the uploader of session %s: %s", session.id.hex(), exc)

    # -- flow control and timeouts --

    def _consumed(self, session_id: bytes, consumed: int) -> None:
        """On the loop: the importer has read ``consumed`` chunks; acknowledge them."""
        session = self._sessions.get(session_id)
        if session is None:
            return
        session.last_activity = time.monotonic()
        session.ack_target = max(session.ack_target, consumed)
        if not session.ended and (session.ack_task is None or session.ack_task.done()):
            session.ack_task = asyncio.create_task(self._send_acks(session))

    async def _send_acks(self, session: _Session) -> None:
        # One ack covers every chunk consumed by the time it is sent (acks are cumulative).
        while session.acked < session.ack_target and not session.ended:
            session.acked = session.ack_target
            await self._tell(session, _control(_ACK, {"acked": session.acked}))

    async def _watch_idle(self) -> None:
        interval = max(0.05, min(1.0, self.idle_timeout / 4))
        while True:
            await asyncio.sleep(interval)
            now = time.monotonic()
            for session in list(self._sessions.values()):
                # After finish the client waits for the import, which is not idleness.
                if session.finished or session.ended:
                    continue
                if now - session.last_activity > self.idle_timeout:
                    self._end(
                        session,
                        TIMEOUT,
                        f"upload to {self.node} made no progress for {self.idle_timeout:g} s "
                        "and was dropped; upload again",
                    )


def _error(code: str, message: str) -> bytes:
    return _control(_ERROR, {"code": code, "message": message})


# -- the client side -----------------------------------------------------------------------------


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

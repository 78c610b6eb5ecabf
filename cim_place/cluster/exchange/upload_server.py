"""The agent side of uploads: ``UploadService`` takes sessions on ``Subjects.agent_add(node)``.

It owns the sessions: opening (with the access check of ``upload_access`` and the volume
choice), and the messages of a session, numbered chunks fed to an importer thread through a
``ChunkPipe``, finish and abort. What follows, acknowledgements once the importer has consumed
chunks, the pin at the end and idle timeouts, is in ``upload_session``. The protocol itself is
described in ``upload_wire``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from cim_place.cluster.exchange.upload_access import _Refused, upload_owner
from cim_place.cluster.exchange.upload_pipe import ChunkPipe
from cim_place.cluster.exchange.upload_session import (
    OnPinned,
    UploadSession,
    UploadSessions,
    UploadStats,
)
from cim_place.cluster.exchange.upload_wire import (
    _ABORT,
    _DATA,
    _FINISH,
    _MIN_CHUNK,
    _OPEN,
    _OPENED,
    _PING,
    _PONG,
    ABORTED,
    BUSY,
    DEFAULT_HEADROOM,
    FULL,
    INVALID,
    LOST,
    MALFORMED,
    STOPPING,
    STORE,
    _body,
    _control,
    _count,
    _error,
    _kind,
    _ProtocolError,
    _session_of,
    _split_data,
    _text,
)
from cim_place.cluster.nats.connection import flushed
from cim_place.cluster.nats.security import requester_of
from cim_place.cluster.nats.subjects import Subjects
from cim_place.errors import StoreError, StoreFullError
from cim_place.objectstore import dagcbor
from cim_place.objectstore.store import ObjectStore
from cim_place.objectstore.unixfs import DEFAULT_PROFILE, get_profile

__all__ = ["DEFAULT_MAX_SESSIONS", "UploadService"]

_log = logging.getLogger(__name__)

DEFAULT_WINDOW = 8
DEFAULT_MAX_SESSIONS = 4
DEFAULT_IDLE_TIMEOUT = 30.0


class UploadService(UploadSessions):
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
        self._sessions: dict[bytes, UploadSession] = {}
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
        await flushed(self.nc)
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
            owner = upload_owner(
                self.node,
                requester_of(msg.reply),
                _text(body, "owner"),
                authenticated=self.authenticated,
                public_uploaders=self.public_uploaders,
            )
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

        session = UploadSession(
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

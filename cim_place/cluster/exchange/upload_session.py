"""The life of an upload session on the agent, once it is open: import, acks, pin, timeouts.

This module owns what happens to a session of ``UploadService``
(:mod:`cim_place.cluster.exchange.upload_server`) after it was admitted: its record
(``UploadSession``) and the service's counters (``UploadStats``), the import in a worker thread
that reads the chunks from its ``ChunkPipe``, cumulative acknowledgements as the importer
consumes chunks, the pin and the ``on_pinned`` hook at the end, the answer to the client, and
the idle timeout. ``UploadSessions`` is the base of ``UploadService``.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from cim_place.cluster.exchange.upload_pipe import ChunkPipe
from cim_place.cluster.exchange.upload_wire import (
    _ACK,
    _DONE,
    FULL,
    STORE,
    TIMEOUT,
    UploadAborted,
    _control,
    _error,
)
from cim_place.errors import StoreError, StoreFullError
from cim_place.interfaces import Pin
from cim_place.objectstore.cid import to_str
from cim_place.objectstore.store import ObjectStore

__all__ = ["OnPinned", "UploadSession", "UploadSessions", "UploadStats"]

_log = logging.getLogger(__name__)

OnPinned = Callable[[Pin], Awaitable[None] | None]
"""Called on the event loop after an upload is pinned, before the client hears ``done``."""


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
class UploadSession:
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


class UploadSessions:
    """The sessions of an upload service: how each ends, is imported, acknowledged and timed out.

    ``UploadService`` derives from it and sets these attributes in its constructor.
    """

    nc: Any
    node: str
    on_pinned: OnPinned | None
    idle_timeout: float
    stats: UploadStats
    _sessions: dict[bytes, UploadSession]
    _executor: ThreadPoolExecutor | None

    def _end(self, session: UploadSession, code: str, message: str) -> None:
        """Make the session's importer fail (no pin); its task reports ``code`` to the client."""
        if session.ended:
            return
        session.ended = True
        session.pipe.abort(code, message)

    # -- the import --

    async def _run(self, session: UploadSession, store: ObjectStore) -> None:
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
    def _import(session: UploadSession, store: ObjectStore) -> Pin:
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

    async def _tell(self, session: UploadSession, message: bytes) -> None:
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

    async def _send_acks(self, session: UploadSession) -> None:
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

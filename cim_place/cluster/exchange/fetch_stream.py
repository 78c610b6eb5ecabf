"""The block-stream path of a fetch: a grant, one pipelined TCP connection, verification ahead.

This module owns how :mod:`cim_place.cluster.exchange.fetch` moves a holder's batches over that
holder's block stream (:mod:`cim_place.cluster.exchange.stream`): asking for a grant on NATS
(a refusal is ``AccessDeniedError``), opening the connection once per holder, pipelining GETs
and reading their answers in order while blocks are verified and stored in threads, and the
fall-back to NATS (logged once per holder) when a holder has no stream or it breaks.
"""

from __future__ import annotations

import asyncio
import logging

from cim_place.cluster.exchange.block_wire import (
    End,
    Grant,
    Missing,
    Status,
    decode_reply,
    encode_grant_request,
)
from cim_place.cluster.exchange.fetch_model import Holder
from cim_place.cluster.exchange.fetch_state import Batch, FetchState, StreamSession
from cim_place.cluster.exchange.stream_client import StreamClient
from cim_place.cluster.exchange.stream_wire import Block
from cim_place.cluster.nats.security import AccessDeniedError
from cim_place.errors import ProtocolError
from cim_place.objectstore.cid import Cid, to_str

__all__ = ["STREAM_CONNECT_TIMEOUT", "StreamPath"]

_log = logging.getLogger(__name__)

STREAM_CONNECT_TIMEOUT = 3.0
"""Seconds to connect to a holder's block stream and be welcomed: the holder just granted on
NATS, so it is alive; an address a firewall drops costs this long before that holder falls
back to NATS, not the whole fetch timeout."""
# Blocks received on a stream whose verification and write may run in threads at once: enough to
# keep the socket read while hashing, few enough to bound memory (blocks are at most 4 MiB).
_VERIFY_AHEAD = 8


class StreamPath(FetchState):
    """The block-stream half of a fetch."""

    async def _session_for(self, holder: Holder) -> StreamSession | None:
        """The holder's stream session, opened on first use; None: use NATS for this holder."""
        node = holder.node
        if node in self.sessions:
            return self.sessions[node]
        async with self.session_locks.setdefault(node, asyncio.Lock()):
            if node in self.sessions:
                return self.sessions[node]
            session: StreamSession | None = None
            why = ""
            try:
                grant = await self._ask_grant(holder)
                if grant is None:
                    why = "it offers no block stream for this root"
                else:
                    client = await StreamClient.open(
                        grant.address,
                        grant.token,
                        timeout=min(self.timeout, STREAM_CONNECT_TIMEOUT),
                        tls=self.stream_tls,
                    )
                    session = StreamSession(client)
            except AccessDeniedError:
                raise
            except (OSError, TimeoutError, ProtocolError) as exc:
                why = f"its block stream cannot be used: {exc!r}"
            self.sessions[node] = session
            if session is None:
                self._fall_back(node, why)
            return session

    async def _ask_grant(self, holder: Holder) -> Grant | None:
        """A stream grant from ``holder``; None when it has none to give (or does not answer:
        the NATS path then reports that); raises AccessDeniedError when it refuses."""
        subject = self.subjects.block_get(holder.node)
        try:
            msg = await self.nc.request(
                subject, encode_grant_request(self.root), timeout=self.timeout
            )
            _, records = decode_reply(msg.data)
        except Exception as exc:  # timeouts, garbage, no responders: the NATS path says it better
            _log.debug("stream grant from %s: %r", holder.node, exc)
            return None
        grant: Grant | None = None
        for record in records:
            if isinstance(record, Grant):
                grant = record
            elif isinstance(record, End) and record.status == Status.NOT_ALLOWED:
                raise AccessDeniedError(record.reason or "not allowed")
        return grant

    def _fall_back(self, node: str, why: str) -> None:
        stats = self.result.holders[node]
        if stats.fallbacks:
            return
        stats.fallbacks = 1
        stats.fallback = why
        _log.info("fetching %s from %s over NATS: %s", to_str(self.root), node, why)

    async def _request_stream(self, session: StreamSession, batch: Batch) -> bool:
        """Fetch ``batch`` over the stream; False when the stream broke (the caller falls back
        for what was not delivered)."""
        turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        previous, session.last = session.last, turn
        try:
            if not session.broken and not session.corrupt:
                session.client.send_get(batch.cids)
            if previous is not None:
                await asyncio.shield(previous)
            if session.corrupt:
                batch.failed = "holder skipped: it served a corrupt block"
                return True
            if session.broken:
                return False
            return await self._receive_stream(session, batch, turn)
        except asyncio.CancelledError:
            # Its GET was sent but its answer will not be read: the connection is out of step.
            session.broken = session.broken or "a batch was cancelled"
            raise
        finally:
            if not turn.done():
                turn.set_result(None)

    async def _receive_stream(
        self, session: StreamSession, batch: Batch, turn: asyncio.Future[None]
    ) -> bool:
        wanted = set(batch.cids)
        answered: set[Cid] = set()
        checks: list[tuple[Cid, int, asyncio.Future[bytes | None]]] = []
        broken = ""
        try:
            while True:
                record = await session.client.read(self.timeout)
                if isinstance(record, End):
                    if record.status == Status.NOT_ALLOWED:
                        batch.denied = record.reason or "not allowed"
                        batch.failed = f"request refused (NOT_ALLOWED: {record.reason})"
                    elif record.status != Status.OK:
                        broken = f"request refused ({record.status.name}: {record.reason})"
                    break
                assert not isinstance(record, Grant)
                if record.cid not in wanted or record.cid in answered:
                    raise ProtocolError(f"sent block {to_str(record.cid)}, not asked for")
                answered.add(record.cid)
                if isinstance(record, Missing):
                    batch.missing.append(record.cid)
                    continue
                assert isinstance(record, Block)
                if self.bandwidth is not None:
                    await self.bandwidth.take(len(record.data))
                # Hash and write in a thread while the next block is read from the socket.
                check = asyncio.ensure_future(
                    asyncio.to_thread(self._verify_and_put_received, record.cid, record.data)
                )
                checks.append((record.cid, len(record.data), check))
                running = [c[2] for c in checks if not c[2].done()]
                if len(running) >= _VERIFY_AHEAD:
                    await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
        except (ProtocolError, OSError, EOFError, TimeoutError) as exc:
            broken = f"the block stream broke: {exc!r}"
        except asyncio.CancelledError:
            broken = "the fetch was cancelled mid-answer"
            raise
        finally:
            if broken:
                session.broken = broken
                await session.client.close()
            # The next batch may read the connection while these blocks are verified.
            if not turn.done():
                turn.set_result(None)
            corrupt = await self._finish_checks(batch, checks)
        if corrupt:
            session.corrupt = True
            await session.client.close()
        if broken and not corrupt:
            self._fall_back(batch.holder.node, broken)
            return False
        return True

    async def _finish_checks(
        self, batch: Batch, checks: list[tuple[Cid, int, asyncio.Future[bytes | None]]]
    ) -> bool:
        """Wait for the verifications of a stream batch and account for them; True when a
        block did not match its CID. Threads are waited for even when cancelled, so nothing is
        written on the fetch's behalf after it ended."""
        stats = self.result.holders[batch.holder.node]
        cancelled = False
        corrupt = False
        for cid, size, check in checks:
            while not check.done():
                try:
                    await asyncio.shield(check)
                except asyncio.CancelledError:
                    cancelled = True
            if cancelled or check.cancelled():
                continue
            block = check.result()  # StoreFullError and the like propagate
            if block is None:
                if not corrupt:
                    _log.warning(
                        "holder %s served block %s with bytes that do not match it",
                        batch.holder.node,
                        to_str(cid),
                    )
                stats.corrupt += 1
                batch.corrupt = True
                corrupt = True
                continue
            self._stored(batch, cid, block)
            stats.blocks += 1
            stats.bytes += size
            stats.stream_blocks += 1
            stats.stream_bytes += size
        if cancelled:
            raise asyncio.CancelledError
        return corrupt

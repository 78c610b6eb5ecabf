"""The bulk block stream: blocks between agents over a direct TCP connection, authorised on NATS.

This module owns the fast data path of the block exchange. NATS keeps control: a fetcher asks
the holder for a *stream grant* on the holder's block subject
(``cim_place.cluster.exchange.block_wire``, request kind GRANT); the holder checks access
exactly as for a block request and answers with the address of its block stream, a random
single-use token and the token's lifetime. The token is bound to the requester NATS
authenticated and to the root named in the grant request. The bytes then flow over one TCP
connection, without the three nats-server hops of the relay path (``docs/ARCHITECTURE.md``,
"Bulk block stream", says why).

The frames are those of :mod:`cim_place.cluster.exchange.stream_wire`; the fetcher's side is
:mod:`cim_place.cluster.exchange.stream_client`. This module owns the holder's side: the
``BlockStreamServer`` (grants, tokens, connections, answers).

With TLS configured (``tls`` of the server: the agent's ``blocks.tls``), the holder advertises
``tls://host:port`` and speaks the same frames inside TLS; the fetcher then verifies the holder's
certificate against the advertised host name (its CA: the agent's ``blocks.tls.ca``, else the
system's, which ``SSL_CERT_FILE`` sets to the domain CA in the deploy files).

The holder reads blocks in worker threads (a few ahead of the socket) and waits for the socket
buffer to drain (``writer.drain``), so a slow fetcher costs a bounded amount of memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import socket
import ssl
import time
from collections import OrderedDict, deque
from dataclasses import dataclass

from cim_place.cluster.exchange.block_wire import MAX_REQUEST_BYTES, Grant, Status
from cim_place.cluster.exchange.blocks import ServeStats, read_served
from cim_place.cluster.exchange.stream_wire import (
    HEADER,
    MAX_REASON,
    TAG_BLOCK,
    TAG_END,
    TAG_GET,
    TAG_HELLO,
    TAG_MISSING,
    TAG_WELCOME,
    TLS_SCHEME,
    decode_get,
    frame,
    parse_address,
)
from cim_place.cluster.nats.security import ReadAccess, RootMembers
from cim_place.errors import ProtocolError
from cim_place.interfaces import BlockSource
from cim_place.objectstore.cid import Cid

__all__ = ["DEFAULT_LISTEN", "BlockStreamServer", "StreamStats"]

_log = logging.getLogger(__name__)

DEFAULT_LISTEN = "127.0.0.1:0"
"""Where an agent's block stream listens unless configured: loopback, a free port."""

TOKEN_BYTES = 32
GRANT_TTL = 30.0
"""Seconds a granted token may be used to connect (it is used once)."""
HELLO_TIMEOUT = 10.0
IDLE_TIMEOUT = 120.0
"""A connection that sends no request for this long is closed."""
MAX_CONNECTIONS = 64
_READ_AHEAD = 3
"""Blocks read from disk (in threads) ahead of the one being written to the socket."""
_WRITE_HIGH_WATER = 4 << 20
_MAX_GRANTS = 4096
_ROOT_CACHE = 64


@dataclass(slots=True)
class StreamStats:
    """Counters of a block stream server beyond the shared ServeStats (monotonic)."""

    connections: int = 0
    grants: int = 0
    blocks: int = 0
    """Blocks sent on the stream (also counted in the shared ServeStats)."""
    bytes: int = 0
    bad_tokens: int = 0
    """Connections refused: unknown, reused or expired token."""
    malformed: int = 0
    """Connections closed for garbage: bad frames, oversized requests, invalid CIDs."""
    broken: int = 0
    """Connections that ended with an I/O error or a timeout."""


@dataclass(frozen=True, slots=True)
class _Ticket:
    root: Cid
    requester: str | None
    expires: float


class BlockStreamServer:
    """The TCP server of one node's block stream; tokens come from ``grant`` (the BlockServer
    calls it after its access check).

    ``listen`` is ``host:port`` (port 0: a free one); ``advertise`` is the address fetchers
    connect to, ``host`` or ``host:port`` (default: the listen address; its port defaults to
    the bound one). Served blocks and bytes are counted in ``serve_stats`` (share the
    BlockServer's so metrics count both paths), the rest in ``stats``.
    """

    def __init__(
        self,
        store: BlockSource,
        *,
        listen: str = DEFAULT_LISTEN,
        advertise: str | None = None,
        access: ReadAccess | None = None,
        serve_stats: ServeStats | None = None,
        tls: ssl.SSLContext | None = None,
        grant_ttl: float = GRANT_TTL,
        idle_timeout: float = IDLE_TIMEOUT,
        max_connections: int = MAX_CONNECTIONS,
    ) -> None:
        self.store = store
        self.listen = parse_address(listen)
        self.advertise = advertise
        self.access = access
        self.serve_stats = serve_stats if serve_stats is not None else ServeStats()
        self.tls = tls
        self.stats = StreamStats()
        self.grant_ttl = grant_ttl
        self.idle_timeout = idle_timeout
        self.max_connections = max_connections
        self.address = ""
        """The advertised ``host:port`` once started."""
        self._server: asyncio.Server | None = None
        self._tickets: OrderedDict[bytes, _Ticket] = OrderedDict()
        self._members = RootMembers(store, _ROOT_CACHE)
        self._connections: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        """Listen; idempotent. Raises OSError when the address cannot be bound."""
        if self._server is not None:
            return
        host, port = self.listen
        self._server = await asyncio.start_server(
            self._on_connection,
            host,
            port,
            ssl=self.tls,
            ssl_handshake_timeout=HELLO_TIMEOUT if self.tls is not None else None,
        )
        bound = self._server.sockets[0].getsockname()[1]
        self.address = self._advertised(host, int(bound))
        _log.info("block stream listening on %s:%d, advertised as %s", host, bound, self.address)

    def _advertised(self, host: str, port: int) -> str:
        address = self._host_port(host, port)
        return TLS_SCHEME + address if self.tls is not None else address

    def _host_port(self, host: str, port: int) -> str:
        if self.advertise:
            name, sep, given = self.advertise.rpartition(":")
            if sep and given.isdigit() and name:
                return self.advertise
            return f"{self.advertise}:{port}"
        if host in ("", "0.0.0.0", "::"):
            host = socket.gethostname()
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        for task in list(self._connections):
            task.cancel()
        if self._connections:
            await asyncio.gather(*self._connections, return_exceptions=True)
        with contextlib.suppress(Exception):
            await server.wait_closed()

    def grant(self, root: Cid, requester: str | None) -> Grant:
        """A fresh token for ``requester`` to stream blocks of ``root`` (checked by the caller)."""
        now = time.monotonic()
        while self._tickets:
            # Tokens expire in issue order: drop the stale ones, and the oldest beyond the cap.
            token, ticket = next(iter(self._tickets.items()))
            if ticket.expires > now and len(self._tickets) < _MAX_GRANTS:
                break
            del self._tickets[token]
        token = secrets.token_bytes(TOKEN_BYTES)
        self._tickets[token] = _Ticket(root, requester, now + self.grant_ttl)
        self.stats.grants += 1
        return Grant(self.address, token, int(self.grant_ttl * 1000))

    # -- connections --

    async def _on_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        self.stats.connections += 1
        peer = writer.get_extra_info("peername")
        writer.transport.set_write_buffer_limits(high=_WRITE_HIGH_WATER)
        try:
            await self._converse(reader, writer, peer)
        except ProtocolError as exc:
            self.stats.malformed += 1
            self.serve_stats.malformed += 1
            _log.warning("block stream from %s: %s; connection closed", peer, exc)
            with contextlib.suppress(Exception):
                writer.write(frame(TAG_END, Status.MALFORMED, str(exc).encode()[:MAX_REASON]))
        except (asyncio.IncompleteReadError, ConnectionError, TimeoutError) as exc:
            self.stats.broken += 1
            _log.debug("block stream from %s ended: %r", peer, exc)
        except asyncio.CancelledError:
            # Only ``stop`` cancels a connection, and this task ends here either way. Ending it
            # normally matters: asyncio 3.11's stream server logs a traceback for a connection
            # task that ends cancelled.
            self.stats.broken += 1
        except Exception:
            self.serve_stats.errors += 1
            _log.exception("block stream from %s failed", peer)
        finally:
            self._connections.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _converse(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: object
    ) -> None:
        async with asyncio.timeout(HELLO_TIMEOUT):
            tag, _, n = HEADER.unpack(await reader.readexactly(HEADER.size))
            if tag != TAG_HELLO or n != TOKEN_BYTES:
                raise ProtocolError(f"expected a HELLO with a {TOKEN_BYTES}-byte token")
            token = await reader.readexactly(n)
        ticket = self._tickets.pop(token, None)
        refusal = ""
        if ticket is None or ticket.expires < time.monotonic():
            refusal = "unknown, used or expired token; ask the holder for a new grant"
        elif len(self._connections) > self.max_connections:
            refusal = f"more than {self.max_connections} connections; try again later"
        if refusal:
            self.stats.bad_tokens += 1
            _log.warning("block stream from %s refused: %s", peer, refusal)
            writer.write(frame(TAG_WELCOME, Status.NOT_ALLOWED, refusal.encode()))
            await writer.drain()
            return
        assert ticket is not None
        writer.write(frame(TAG_WELCOME, Status.OK))
        while True:
            try:
                async with asyncio.timeout(self.idle_timeout):
                    head = await reader.readexactly(HEADER.size)
            except asyncio.IncompleteReadError as exc:
                if not exc.partial:
                    return  # the fetcher is done and closed the connection
                raise
            tag, _, n = HEADER.unpack(head)
            if tag != TAG_GET:
                raise ProtocolError(f"unknown frame 0x{tag:02x} where a GET was expected")
            if n > MAX_REQUEST_BYTES:
                raise ProtocolError(f"request of {n} bytes; at most {MAX_REQUEST_BYTES}")
            async with asyncio.timeout(HELLO_TIMEOUT):
                body = await reader.readexactly(n)
            await self._answer(ticket, decode_get(body), writer)

    async def _answer(self, ticket: _Ticket, cids: list[Cid], writer: asyncio.StreamWriter) -> None:
        stats = self.serve_stats
        stats.requests += 1
        if self.access is not None:
            # The pin's readers may change while a connection is open: checked per request.
            reason = await asyncio.to_thread(self.access.check, ticket.requester, ticket.root, [])
            if reason is not None:
                stats.refused += 1
                _log.info("block stream refused a request: %s", reason)
                writer.write(frame(TAG_END, Status.NOT_ALLOWED, reason.encode()[:MAX_REASON]))
                await writer.drain()
                return
        members = await self._members_of(ticket.root)
        loop = asyncio.get_running_loop()
        reads: deque[asyncio.Future[tuple[bytes | None, str]]] = deque()
        queue = deque(cid for cid in cids if cid in members)
        for cid in cids:
            while queue and len(reads) < _READ_AHEAD:
                reads.append(loop.run_in_executor(None, read_served, self.store, queue.popleft()))
            if cid not in members:
                stats.missing += 1
                writer.write(HEADER.pack(TAG_MISSING, len(cid), 0) + cid)
                continue
            data, problem = await reads.popleft()
            if data is None:
                stats.count_unservable(cid, problem)
                writer.write(HEADER.pack(TAG_MISSING, len(cid), 0) + cid)
                continue
            writer.write(HEADER.pack(TAG_BLOCK, len(cid), len(data)) + cid)
            writer.write(data)
            stats.blocks_served += 1
            stats.bytes_served += len(data)
            self.stats.blocks += 1
            self.stats.bytes += len(data)
            await writer.drain()
        writer.write(frame(TAG_END, Status.OK))
        await writer.drain()

    async def _members_of(self, root: Cid) -> frozenset[Cid]:
        """The CIDs under ``root`` in the local store; cached once the local DAG is complete."""
        cached = self._members.cached(root)
        if cached is not None:
            return cached
        return self._members.remember(root, *await asyncio.to_thread(self._members.walk, root))

"""The bulk block stream: blocks between agents over a direct TCP connection, authorised on NATS.

This module owns the fast data path of the block exchange. NATS keeps control: a fetcher asks
the holder for a *stream grant* on the holder's block subject
(``cim_place.cluster.exchange.block_wire``,
request kind GRANT); the holder checks access exactly as for a block request and answers with
the address of its block stream, a random single-use token and the token's lifetime. The token
is bound to the requester NATS authenticated and to the root named in the grant request. The
bytes then flow over one TCP connection, without the three nats-server hops of the relay path
(``docs/ARCHITECTURE.md``, "Bulk block stream", says why).

Every frame starts with the same 6-byte header, ``tag u8, a u8, n u32`` (big endian)::

    fetcher -> holder
      0x20 HELLO    a=0            n=len(token)   token          first frame, within 10 s
      0x10 GET      a=0            n=len(body)    body = (u8 len, cid)*   at most 1024 CIDs
    holder -> fetcher
      0x21 WELCOME  a=status       n=len(reason)  reason         answer to HELLO (0: accepted)
      0x01 BLOCK    a=len(cid)     n=len(data)    cid data
      0x02 MISSING  a=len(cid)     n=0            cid
      0x03 END      a=status       n=len(reason)  reason         closes the answer to one GET

GETs may be pipelined; the holder answers them in order, each with one record per CID (in the
order asked) and an END. ``status`` is ``block_wire.Status``. A CID the holder does not have, whose
local copy is corrupt, or that is not part of the granted root is MISSING; a requester that may
no longer read the root gets END NOT_ALLOWED. Any framing error, an unknown or expired token, or
an oversized request closes the connection; the server counts and logs, and never raises.

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
import struct
import time
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass

from cim_place.cluster.exchange.block_wire import (
    MAX_BLOCK_SIZE,
    MAX_REQUEST_BYTES,
    MAX_REQUEST_CIDS,
    End,
    Grant,
    Missing,
    Status,
)
from cim_place.cluster.exchange.blocks import ServeStats, read_served
from cim_place.cluster.nats.security import ReadAccess, RootMembers
from cim_place.errors import InvalidCidError, ProtocolError
from cim_place.interfaces import BlockSource
from cim_place.objectstore.cid import Cid, split

__all__ = [
    "DEFAULT_LISTEN",
    "Block",
    "BlockStreamServer",
    "StreamClient",
    "StreamRefusedError",
    "StreamStats",
    "client_tls",
    "parse_address",
    "server_tls",
]

_log = logging.getLogger(__name__)

DEFAULT_LISTEN = "127.0.0.1:0"
"""Where an agent's block stream listens unless configured: loopback, a free port."""

_HEADER = struct.Struct(">BBI")
TAG_BLOCK = 0x01
TAG_MISSING = 0x02
TAG_END = 0x03
TAG_GET = 0x10
TAG_HELLO = 0x20
TAG_WELCOME = 0x21

TOKEN_BYTES = 32
GRANT_TTL = 30.0
"""Seconds a granted token may be used to connect (it is used once)."""
HELLO_TIMEOUT = 10.0
IDLE_TIMEOUT = 120.0
"""A connection that sends no request for this long is closed."""
MAX_CONNECTIONS = 64
_MAX_CID_BYTES = 128
_MAX_REASON = 512
_READ_AHEAD = 3
"""Blocks read from disk (in threads) ahead of the one being written to the socket."""
_WRITE_HIGH_WATER = 4 << 20
_READ_LIMIT = 16 << 20
"""StreamReader buffer of a fetcher: a few blocks, so reads do not pause the socket per block."""
_MAX_GRANTS = 4096
_ROOT_CACHE = 64


class StreamRefusedError(ProtocolError):
    """The holder refused the connection (bad or expired token, too many connections)."""


@dataclass(frozen=True, slots=True)
class Block:
    """A block received on the stream (not yet verified)."""

    cid: Cid
    data: bytearray
    """Received straight into this buffer (it is not copied again)."""


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


TLS_SCHEME = "tls://"


def server_tls(cert: str, key: str) -> ssl.SSLContext:
    """The holder's TLS context from a PEM certificate (chain) and key; raises OSError or
    ssl.SSLError naming what is wrong."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert, key)
    return context


def client_tls(ca: str | None = None) -> ssl.SSLContext:
    """The fetcher's TLS context: verifies holders against ``ca`` (PEM), else the system's
    trust store (``SSL_CERT_FILE`` included)."""
    context = ssl.create_default_context(cafile=ca)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def parse_address(text: str) -> tuple[str, int]:
    """(host, port) of ``host:port`` (``[v6]:port`` too, and ``tls://`` before either);
    raises ValueError saying why."""
    host, sep, port = text.removeprefix(TLS_SCHEME).rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ValueError(f"{text!r} is not host:port (e.g. 127.0.0.1:0)")
    return host.strip("[]"), int(port)


def _frame(tag: int, a: int, payload: bytes = b"") -> bytes:
    return _HEADER.pack(tag, a, len(payload)) + payload


def encode_get(cids: Sequence[Cid]) -> bytes:
    """The GET frame for ``cids``."""
    if len(cids) > MAX_REQUEST_CIDS:
        raise ValueError(f"{len(cids)} CIDs in one request; at most {MAX_REQUEST_CIDS}")
    body = bytearray()
    for cid in cids:
        body.append(len(cid))
        body += cid
    return _frame(TAG_GET, 0, bytes(body))


def decode_get(body: bytes) -> list[Cid]:
    """The CIDs of a GET body; raises ProtocolError saying what is wrong."""
    cids: list[Cid] = []
    pos = 0
    while pos < len(body):
        size = body[pos]
        pos += 1
        if size == 0 or size > _MAX_CID_BYTES or pos + size > len(body):
            raise ProtocolError(f"CID #{len(cids)} has an impossible length {size}")
        cid = bytes(body[pos : pos + size])
        pos += size
        try:
            split(cid)
        except (ValueError, InvalidCidError) as exc:
            raise ProtocolError(f"request names an invalid CID: {exc}") from None
        cids.append(cid)
        if len(cids) > MAX_REQUEST_CIDS:
            raise ProtocolError(f"request names more than {MAX_REQUEST_CIDS} CIDs")
    return cids


# -- the holder's side ---------------------------------------------------------------------------


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
                writer.write(_frame(TAG_END, Status.MALFORMED, str(exc).encode()[:_MAX_REASON]))
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
            tag, _, n = _HEADER.unpack(await reader.readexactly(_HEADER.size))
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
            writer.write(_frame(TAG_WELCOME, Status.NOT_ALLOWED, refusal.encode()))
            await writer.drain()
            return
        assert ticket is not None
        writer.write(_frame(TAG_WELCOME, Status.OK))
        while True:
            try:
                async with asyncio.timeout(self.idle_timeout):
                    head = await reader.readexactly(_HEADER.size)
            except asyncio.IncompleteReadError as exc:
                if not exc.partial:
                    return  # the fetcher is done and closed the connection
                raise
            tag, _, n = _HEADER.unpack(head)
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
                writer.write(_frame(TAG_END, Status.NOT_ALLOWED, reason.encode()[:_MAX_REASON]))
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
                writer.write(_HEADER.pack(TAG_MISSING, len(cid), 0) + cid)
                continue
            data, problem = await reads.popleft()
            if data is None:
                stats.count_unservable(cid, problem)
                writer.write(_HEADER.pack(TAG_MISSING, len(cid), 0) + cid)
                continue
            writer.write(_HEADER.pack(TAG_BLOCK, len(cid), len(data)) + cid)
            writer.write(data)
            stats.blocks_served += 1
            stats.bytes_served += len(data)
            self.stats.blocks += 1
            self.stats.bytes += len(data)
            await writer.drain()
        writer.write(_frame(TAG_END, Status.OK))
        await writer.drain()

    async def _members_of(self, root: Cid) -> frozenset[Cid]:
        """The CIDs under ``root`` in the local store; cached once the local DAG is complete."""
        cached = self._members.cached(root)
        if cached is not None:
            return cached
        return self._members.remember(root, *await asyncio.to_thread(self._members.walk, root))


# -- the fetcher's side --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Welcome:
    status: int
    reason: str


_Record = Block | Missing | End | _Welcome
_HEAD, _SMALL, _DATA = 0, 1, 2
_SCRATCH = 64 << 10


class _Receiver(asyncio.BufferedProtocol):
    """Parses the holder's frames as they arrive, straight into each block's own buffer.

    Block payloads of 64 KiB and more are received by the socket directly into the block's
    bytearray (no copy at all); the rest goes through a scratch buffer. Measured on loopback,
    this costs a tenth of the CPU of ``StreamReader.readexactly``, whose buffer copies dominated
    the fetcher's profile. Parsed records wait in a queue; past ``limit`` queued bytes the
    socket is paused until the fetcher catches up.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.transport: asyncio.Transport | None = None
        self.records: deque[_Record] = deque()
        self.queued = 0
        self.paused = False
        self.error: BaseException | None = None
        self.waiter: asyncio.Future[None] | None = None
        self.scratch = memoryview(bytearray(_SCRATCH))
        self.direct = False
        self.state = _HEAD
        self.small = bytearray()
        self.want = _HEADER.size
        self.tag = self.a = self.n = 0
        self.cid = b""
        self.data = bytearray()
        self.pos = 0

    # asyncio callbacks
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def get_buffer(self, sizehint: int) -> memoryview:
        if self.state == _DATA and self.n - self.pos >= _SCRATCH:
            self.direct = True
            return memoryview(self.data)[self.pos :]
        self.direct = False
        return self.scratch

    def buffer_updated(self, nbytes: int) -> None:
        try:
            if self.direct:
                self.pos += nbytes
                if self.pos == self.n:
                    self._emit(Block(self.cid, self.data))
            else:
                self._feed(self.scratch[:nbytes])
        except ProtocolError as exc:
            self._fail(exc)
            if self.transport is not None:
                self.transport.abort()

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(exc if exc is not None else EOFError("the holder closed the block stream"))

    # parsing
    def _feed(self, chunk: memoryview) -> None:
        i, end = 0, len(chunk)
        while i < end:
            if self.state == _DATA:
                k = min(end - i, self.n - self.pos)
                self.data[self.pos : self.pos + k] = chunk[i : i + k]
                self.pos += k
                i += k
                if self.pos == self.n:
                    self._emit(Block(self.cid, self.data))
                continue
            k = min(end - i, self.want - len(self.small))
            self.small += chunk[i : i + k]
            i += k
            if len(self.small) == self.want:
                self._step()

    def _step(self) -> None:
        """A header or its small payload (CID, reason) is complete."""
        if self.state == _HEAD:
            self.tag, self.a, self.n = _HEADER.unpack(self.small)
            self.small = bytearray()
            if self.tag in (TAG_END, TAG_WELCOME):
                if self.n > _MAX_REASON:
                    raise ProtocolError(f"frame 0x{self.tag:02x} with a {self.n}-byte reason")
                self.want = self.n
            elif self.tag in (TAG_BLOCK, TAG_MISSING) and 0 < self.a <= _MAX_CID_BYTES:
                if self.n > MAX_BLOCK_SIZE or (self.tag == TAG_MISSING and self.n):
                    raise ProtocolError(f"frame 0x{self.tag:02x} with {self.n} bytes of data")
                self.want = self.a
            else:
                raise ProtocolError(f"unexpected frame 0x{self.tag:02x} (a={self.a})")
            self.state = _SMALL
            if self.want == 0:
                self._step()
            return
        small, self.small = bytes(self.small), bytearray()
        if self.tag == TAG_END:
            try:
                status = Status(self.a)
            except ValueError:
                status = Status.SERVER_ERROR
            self._emit(End(0, status, small.decode("utf-8", "replace")))
        elif self.tag == TAG_WELCOME:
            self._emit(_Welcome(self.a, small.decode("utf-8", "replace")))
        elif self.tag == TAG_MISSING:
            self._emit(Missing(small))
        else:
            self.cid = small
            self.data = bytearray(self.n)
            self.pos = 0
            self.state = _DATA
            if self.n == 0:
                self._emit(Block(self.cid, self.data))

    def _emit(self, record: _Record) -> None:
        self.records.append(record)
        if isinstance(record, Block):
            self.queued += len(record.data)
            self.data = bytearray()
        self.state = _HEAD
        self.want = _HEADER.size
        if self.queued > self.limit and not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()
        self._wake()

    def _fail(self, exc: BaseException) -> None:
        if self.error is None:
            self.error = exc
        self._wake()

    def _wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    async def next(self, timeout: float) -> _Record:
        async with asyncio.timeout(timeout):
            while not self.records:
                if self.error is not None:
                    raise self.error
                self.waiter = asyncio.get_running_loop().create_future()
                await self.waiter
        record = self.records.popleft()
        if isinstance(record, Block):
            self.queued -= len(record.data)
            if self.paused and self.queued <= self.limit // 2 and self.transport is not None:
                self.paused = False
                self.transport.resume_reading()
        return record


class StreamClient:
    """One connection to a holder's block stream: ``open``, ``send_get``, ``read`` records."""

    def __init__(self, transport: asyncio.Transport, receiver: _Receiver) -> None:
        self.transport = transport
        self.receiver = receiver

    @classmethod
    async def open(
        cls, address: str, token: bytes, *, timeout: float, tls: ssl.SSLContext | None = None
    ) -> StreamClient:
        """Connect and present ``token``; raises OSError (ssl.SSLError included), TimeoutError,
        StreamRefusedError. A ``tls://`` address is verified with ``tls`` (default:
        ``client_tls()``)."""
        host, port = parse_address(address)
        context: ssl.SSLContext | None = None
        if address.startswith(TLS_SCHEME):
            context = tls if tls is not None else client_tls()
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(timeout):
            transport, receiver = await loop.create_connection(
                lambda: _Receiver(_READ_LIMIT),
                host,
                port,
                ssl=context,
                server_hostname=host if context is not None else None,
            )
        client = cls(transport, receiver)
        try:
            transport.write(_frame(TAG_HELLO, 0, token))
            welcome = await receiver.next(timeout)
            if not isinstance(welcome, _Welcome):
                raise ProtocolError(f"expected WELCOME, got {type(welcome).__name__}")
            if welcome.status != Status.OK:
                raise StreamRefusedError(f"block stream {address} refused: {welcome.reason}")
        except BaseException:
            await client.close()
            raise
        return client

    def send_get(self, cids: Sequence[Cid]) -> None:
        self.transport.write(encode_get(cids))

    async def read(self, timeout: float) -> Block | Missing | End:
        """The next record; raises ProtocolError, EOFError, OSError, TimeoutError."""
        record = await self.receiver.next(timeout)
        if isinstance(record, _Welcome):
            raise ProtocolError("a second WELCOME")
        return record

    async def close(self) -> None:
        self.transport.close()

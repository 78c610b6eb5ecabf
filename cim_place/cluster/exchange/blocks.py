"""The block exchange wire format, and the BlockServer that answers block requests.

This module owns how blocks travel between agents: a holder serves its blocks by request/reply on
``Subjects.block_get(node)`` (``cim.place.blk.<node>.get``); ``cim_place.cluster.exchange.fetch``
is the
other side. The data path is a compact binary framing, not DAG-CBOR, so that a block's bytes are
copied once into a message and never re-encoded.

Request (one message)::

    0xCB 0x01 0x10  varint(max_reply)  varint(count)  (varint(len) cid)*count
    0xCB 0x01 0x11  varint(len) root  varint(max_reply)  varint(count)  (varint(len) cid)*count

The third form asks for a *stream grant* (``cim_place.cluster.exchange.stream``)::

    0xCB 0x01 0x12  varint(len) root

The second form names the root the blocks are fetched for, so that a holder enforcing object
access (``cim_place.cluster.nats.security.ReadAccess``) can check that the requester may read it and
that every CID lies under it. The requester is who NATS says it is: the user whose inbox prefix
the reply subject carries (``security.requester_of``), never a field of the request.

``max_reply`` is the largest reply message the requester's own server accepts (0: no opinion);
the holder answers with messages no larger than the smaller of that and its own server's
``max_payload``, because a reply crosses both servers.

Reply: a *stream* of messages to the request's reply subject, each::

    0xCB 0x01 varint(seq) record*

with ``seq`` counting the stream's messages from 0, and records::

    0x01 PART     varint(len) cid  varint(total)  varint(offset)  varint(n)  n bytes
    0x02 MISSING  varint(len) cid
    0x03 END      varint(messages)  varint(status)  varint(len) utf-8 reason
    0x04 GRANT    varint(len) address  varint(len) token  varint(lifetime in ms)

A grant request is answered by one message: GRANT then END OK when the holder runs a block
stream and the requester may read the root (checked as for a block request); END OK alone when
it has no stream or does not hold the root pinned (the requester uses the NATS path); END
NOT_ALLOWED with the reason when the requester may not read the root. A holder of a version
without streams answers END MALFORMED (unknown kind), which the requester treats as "no stream".

A block travels as one PART when it fits, else as several PARTs in consecutive messages (a 1 MiB
raw leaf does not fit in a 1 MiB message with its framing). Records are packed back to back, so
every message but the last is filled to the limit: a stream of 1 MiB blocks costs no extra
messages. An unknown CID, and a block whose local copy is corrupt (it is never served), is a
MISSING record, not an error. END closes every stream; ``messages`` lets the requester notice a
lost message (core NATS is at most once), and a non-zero ``status`` says why a request was
refused (malformed, too large, not allowed). The server never raises on bad input: it counts,
logs, answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, Protocol

from cim_place.cluster.nats.security import ReadAccess, requester_of
from cim_place.cluster.nats.subjects import Subjects
from cim_place.errors import BlockNotFoundError, CorruptBlockError, InvalidCidError, ProtocolError
from cim_place.interfaces import BlockSource
from cim_place.objectstore.cid import Cid, read_varint, split, to_str, varint

__all__ = [
    "MAX_BLOCK_SIZE",
    "MAX_REQUEST_BYTES",
    "MAX_REQUEST_CIDS",
    "BlockServer",
    "End",
    "Grant",
    "Missing",
    "Part",
    "ProtocolError",
    "ServeStats",
    "Status",
    "VolumeSet",
    "decode_reply",
    "decode_request",
    "decode_request_for",
    "encode_grant_request",
    "encode_request",
    "read_served",
]

_log = logging.getLogger(__name__)

MAGIC = 0xCB
VERSION = 1
_KIND_GET = 0x10
_KIND_GET_FOR = 0x11
_KIND_GRANT = 0x12
_REC_PART = 0x01
_REC_MISSING = 0x02
_REC_END = 0x03
_REC_GRANT = 0x04

MAX_REQUEST_CIDS = 1024
"""The most CIDs one request may name; a larger request is refused (status TOO_LARGE)."""
MAX_REQUEST_BYTES = 128 * 1024
"""The largest request accepted (1024 CIDs of the longest common form fit easily)."""
MAX_BLOCK_SIZE = 4 << 20
"""The largest block a requester accepts: IPFS limits blocks to 2 MiB, dag-pb roots stay small."""
_MAX_CID_BYTES = 128
_MIN_REPLY = 1024
"""Below this a reply message could not even hold a PART header with a few data bytes."""
# Framing of a PART header at most: record tag, cid length + cid, three 10-byte varints.
_PART_OVERHEAD = 1 + 2 + _MAX_CID_BYTES + 3 * 10


class Status(IntEnum):
    """Outcome of a request, carried in the END record."""

    OK = 0
    MALFORMED = 1
    """The request could not be decoded (garbage, wrong kind, bad CID)."""
    TOO_LARGE = 2
    """The request names more CIDs, or has more bytes, than a holder accepts."""
    SERVER_ERROR = 3
    """The holder failed while answering (its store raised something unexpected)."""
    NOT_ALLOWED = 4
    """The requester may not read the root it names (or named none, or a CID outside it)."""


@dataclass(frozen=True, slots=True)
class Part:
    """Bytes ``[offset, offset + len(data))`` of block ``cid``, which has ``total`` bytes."""

    cid: Cid
    total: int
    offset: int
    data: bytes | memoryview


@dataclass(frozen=True, slots=True)
class Missing:
    """The holder does not have ``cid`` (or only a corrupt copy of it)."""

    cid: Cid


@dataclass(frozen=True, slots=True)
class End:
    """The last record of a reply stream."""

    messages: int
    status: Status
    reason: str = ""


@dataclass(frozen=True, slots=True)
class Grant:
    """Permission to read one root's blocks on the holder's block stream at ``address``.

    ``token`` is presented once, within ``lifetime_ms`` of the grant.
    """

    address: str
    token: bytes
    lifetime_ms: int


class StreamGranter(Protocol):
    """What a BlockServer needs of a block stream server: tokens for checked requesters."""

    def grant(self, root: Cid, requester: str | None) -> Grant: ...


Record = Part | Missing | End | Grant


# -- requests ------------------------------------------------------------------------------------


def encode_request(cids: Sequence[Cid], *, max_reply: int = 0, root: Cid | None = None) -> bytes:
    """The request message for ``cids``; ``max_reply`` is the requester's max payload, ``root``
    the root they are fetched for (needed by holders that enforce object access)."""
    if len(cids) > MAX_REQUEST_CIDS:
        raise ValueError(f"{len(cids)} CIDs in one request; at most {MAX_REQUEST_CIDS}")
    out = bytearray((MAGIC, VERSION, _KIND_GET if root is None else _KIND_GET_FOR))
    if root is not None:
        out += varint(len(root))
        out += root
    out += varint(max_reply)
    out += varint(len(cids))
    for cid in cids:
        out += varint(len(cid))
        out += cid
    return bytes(out)


def encode_grant_request(root: Cid) -> bytes:
    """The request for a stream grant for ``root``."""
    return bytes((MAGIC, VERSION, _KIND_GRANT)) + varint(len(root)) + root


def is_grant_request(data: bytes) -> bool:
    return len(data) >= 3 and data[0] == MAGIC and data[1] == VERSION and data[2] == _KIND_GRANT


def _cid_at(data: bytes, pos: int, what: str) -> tuple[Cid, int]:
    """The length-prefixed CID at ``pos`` and the position after it; raises ProtocolError for an
    impossible length, ValueError for a truncated varint, InvalidCidError for a bad CID."""
    size, pos = read_varint(data, pos)
    if size == 0 or size > _MAX_CID_BYTES or pos + size > len(data):
        raise ProtocolError(f"{what} has an impossible length {size}")
    cid = bytes(data[pos : pos + size])
    split(cid)
    return cid, pos + size


def decode_grant_request(data: bytes) -> Cid:
    """The root of a grant request; raises ProtocolError saying what is wrong."""
    if not is_grant_request(data) or len(data) > MAX_REQUEST_BYTES:
        raise ProtocolError("not a cim-place stream grant request")
    try:
        root, pos = _cid_at(data, 3, "the root CID")
        if pos != len(data):
            raise ProtocolError(f"{len(data) - pos} trailing bytes after the grant request")
    except ProtocolError:
        raise
    except ValueError as exc:
        raise ProtocolError(f"truncated grant request: {exc}") from None
    except InvalidCidError as exc:
        raise ProtocolError(f"grant request names an invalid CID: {exc}") from None
    return root


def decode_request(data: bytes) -> tuple[list[Cid], int]:
    """(cids, max_reply) of a request; raises ProtocolError saying what is wrong."""
    cids, max_reply, _ = decode_request_for(data)
    return cids, max_reply


def decode_request_for(data: bytes) -> tuple[list[Cid], int, Cid | None]:
    """(cids, max_reply, root) of a request (root None: the request names none)."""
    if len(data) > MAX_REQUEST_BYTES:
        raise _TooLarge(f"request of {len(data)} bytes; at most {MAX_REQUEST_BYTES}")
    if len(data) < 3 or data[0] != MAGIC:
        raise ProtocolError("not a cim-place block request (bad magic byte)")
    if data[1] != VERSION:
        raise ProtocolError(f"block request version {data[1]}; this holder speaks {VERSION}")
    if data[2] not in (_KIND_GET, _KIND_GET_FOR):
        raise ProtocolError(f"unknown block request kind 0x{data[2]:02x}")
    root: Cid | None = None
    try:
        pos = 3
        if data[2] == _KIND_GET_FOR:
            root, pos = _cid_at(data, pos, "the root CID")
        max_reply, pos = read_varint(data, pos)
        count, pos = read_varint(data, pos)
        if count > MAX_REQUEST_CIDS:
            raise _TooLarge(f"request names {count} CIDs; at most {MAX_REQUEST_CIDS}")
        cids: list[Cid] = []
        for _ in range(count):
            cid, pos = _cid_at(data, pos, f"CID #{len(cids)}")
            cids.append(cid)
    except ProtocolError:
        raise
    except ValueError as exc:
        raise ProtocolError(f"truncated block request: {exc}") from None
    except InvalidCidError as exc:
        raise ProtocolError(f"block request names an invalid CID: {exc}") from None
    if pos != len(data):
        raise ProtocolError(f"{len(data) - pos} trailing bytes after the request")
    return cids, max_reply, root


class _TooLarge(ProtocolError):
    pass


# -- replies -------------------------------------------------------------------------------------


def decode_reply(data: bytes | memoryview) -> tuple[int, list[Record]]:
    """(seq, records) of one reply message. PART data are views into ``data`` (no copy)."""
    view = memoryview(data)
    if len(view) < 3 or view[0] != MAGIC or view[1] != VERSION:
        raise ProtocolError("not a cim-place block reply (bad magic or version)")
    records: list[Record] = []
    try:
        seq, pos = read_varint(view, 2)
        end = len(view)
        while pos < end:
            tag = view[pos]
            pos += 1
            if tag == _REC_END:
                messages, pos = read_varint(view, pos)
                code, pos = read_varint(view, pos)
                size, pos = read_varint(view, pos)
                reason = bytes(view[pos : pos + size]).decode("utf-8", "replace")
                pos += size
                try:
                    status = Status(code)
                except ValueError:
                    status = Status.SERVER_ERROR
                records.append(End(messages, status, reason))
                continue
            if tag == _REC_GRANT:
                size, pos = read_varint(view, pos)
                address = bytes(view[pos : pos + size]).decode("utf-8", "replace")
                pos += size
                size, pos = read_varint(view, pos)
                token = bytes(view[pos : pos + size])
                pos += size
                lifetime, pos = read_varint(view, pos)
                if pos > end:
                    raise ProtocolError("truncated GRANT record")
                records.append(Grant(address, token, lifetime))
                continue
            size, pos = read_varint(view, pos)
            if size == 0 or size > _MAX_CID_BYTES or pos + size > end:
                raise ProtocolError(f"record with an impossible CID length {size}")
            cid = bytes(view[pos : pos + size])
            pos += size
            if tag == _REC_MISSING:
                records.append(Missing(cid))
            elif tag == _REC_PART:
                total, pos = read_varint(view, pos)
                offset, pos = read_varint(view, pos)
                n, pos = read_varint(view, pos)
                if pos + n > end or offset + n > total:
                    raise ProtocolError(
                        f"part of {to_str(cid)} overruns its message or block "
                        f"(offset {offset}, {n} bytes, block {total}, message {end})"
                    )
                records.append(Part(cid, total, offset, view[pos : pos + n]))
                pos += n
            else:
                raise ProtocolError(f"unknown reply record 0x{tag:02x}")
    except ValueError as exc:
        if isinstance(exc, ProtocolError):
            raise
        raise ProtocolError(f"truncated block reply: {exc}") from None
    return seq, records


class _ReplyWriter:
    """Packs records into messages of at most ``limit`` bytes and yields each full message.

    A message is kept as a list of pieces (block data as views) and joined once when cut, so
    block bytes are copied once here.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.messages = 0
        self._pieces: list[bytes | memoryview] = []
        self._size = 0
        self._start()

    def _start(self) -> None:
        head = bytes((MAGIC, VERSION)) + varint(self.messages)
        self._pieces = [head]
        self._size = len(head)

    def _add(self, piece: bytes | memoryview) -> None:
        self._pieces.append(piece)
        self._size += len(piece)

    def _cut(self) -> bytes:
        message = b"".join(self._pieces)
        self.messages += 1
        self._start()
        return message

    def _room(self) -> int:
        return self.limit - self._size

    def missing(self, cid: Cid) -> Iterator[bytes]:
        record = bytes((_REC_MISSING,)) + varint(len(cid)) + cid
        if len(record) > self._room():
            yield self._cut()
        self._add(record)

    def block(self, cid: Cid, data: bytes) -> Iterator[bytes]:
        total = len(data)
        offset = 0
        head = bytes((_REC_PART,)) + varint(len(cid)) + cid + varint(total)
        view = memoryview(data)
        while True:
            # Header with the largest possible varints, so the data length fits what is left.
            room = self._room() - len(head) - 2 * len(varint(max(total, 1)))
            if room <= 0 or (room < total - offset and room < 64):
                # Not worth starting a part in the last few bytes of a message.
                yield self._cut()
                continue
            n = min(room, total - offset)
            self._add(head + varint(offset) + varint(n))
            self._add(view[offset : offset + n])
            offset += n
            if offset >= total:
                return

    def grant(self, grant: Grant) -> Iterator[bytes]:
        address = grant.address.encode("utf-8")
        record = (
            bytes((_REC_GRANT,))
            + varint(len(address))
            + address
            + varint(len(grant.token))
            + grant.token
            + varint(grant.lifetime_ms)
        )
        if len(record) > self._room():
            yield self._cut()
        self._add(record)

    def end(self, status: Status = Status.OK, reason: str = "") -> Iterator[bytes]:
        text = reason.encode("utf-8")[:512]
        # messages counts this last message too; its varint is at most 10 bytes.
        if len(text) + 1 + 30 > self._room():
            yield self._cut()
        self._add(
            bytes((_REC_END,))
            + varint(self.messages + 1)
            + varint(int(status))
            + varint(len(text))
            + text
        )
        yield self._cut()


# -- the server ----------------------------------------------------------------------------------


class VolumeSet:
    """A BlockSource over all of a node's volumes: each block is read from the first volume
    that has it, so one BlockServer serves every volume of its agent.

    A corrupt copy in one volume does not hide a good copy in another: the next one is tried,
    and the corruption is still raised when no volume has a good copy.
    """

    def __init__(self, volumes: Sequence[BlockSource]) -> None:
        self.volumes = list(volumes)

    def has(self, cid: Cid) -> bool:
        return any(volume.has(cid) for volume in self.volumes)

    def get(self, cid: Cid) -> bytes:
        corrupt: CorruptBlockError | None = None
        for volume in self.volumes:
            if not volume.has(cid):
                continue
            try:
                return volume.get(cid)
            except CorruptBlockError as exc:
                corrupt = exc
            except BlockNotFoundError:
                continue  # removed between has and get
        if corrupt is not None:
            raise corrupt
        raise BlockNotFoundError(to_str(cid))


@dataclass(slots=True)
class ServeStats:
    """Counters of a BlockServer, for metrics (monotonic since start)."""

    requests: int = 0
    blocks_served: int = 0
    bytes_served: int = 0
    messages_sent: int = 0
    missing: int = 0
    """CIDs asked for that this holder does not have (corrupt ones included)."""
    corrupt: int = 0
    """Local blocks that failed verification when read (reported as missing, never served)."""
    malformed: int = 0
    """Requests refused as garbage, oversized or of the wrong kind, or without a reply subject."""
    errors: int = 0
    """Requests that failed on the holder's side, and blocks it could not read (I/O errors)."""
    refused: int = 0
    """Requests refused by object access control (the requester may not read the root)."""
    corrupt_cids: list[Cid] = field(default_factory=list)
    """The most recent corrupt local blocks (the last 100), for a repair task."""
    on_corrupt: Callable[[Cid], None] | None = field(default=None, repr=False, compare=False)
    """Called (on the event loop) with each corrupt local block refused: the agent reports the
    replicas it damages."""

    def count_unservable(self, cid: Cid, problem: str) -> None:
        """Count (and log) a block ``read_served`` could not serve, with its ``problem``."""
        self.missing += 1
        if problem.startswith("corrupt"):
            self.corrupt += 1
            self.corrupt_cids = [*self.corrupt_cids[-99:], cid]
            _log.error("not serving block %s: %s", to_str(cid), problem)
            if self.on_corrupt is not None:
                self.on_corrupt(cid)
        elif problem != "absent":
            self.errors += 1
            _log.error("cannot read block %s to serve it: %s", to_str(cid), problem)


def read_served(store: BlockSource, cid: Cid) -> tuple[bytes | None, str]:
    """(block, "") or (None, why) for a block about to be served, on either path.

    Runs in a worker thread, so it only reads; a verified read (every BlockStore verifies) means
    a corrupt copy is never served.
    """
    try:
        return store.get(cid), ""
    except BlockNotFoundError:
        return None, "absent"
    except CorruptBlockError as exc:
        return None, f"corrupt: {exc}"
    except Exception as exc:
        # One unreadable block (I/O error, permissions) must not fail the whole request.
        return None, f"unreadable: {exc}"


class BlockServer:
    """Serves the blocks of one node's store on ``Subjects.block_get(node)``.

    Usage::

        server = BlockServer(nc, node="leaf-a", store=volume_store)
        await server.start()
        ...
        await server.stop()

    ``store.get`` must verify (every BlockStore does): a corrupt block is reported as missing
    to the requester, counted in ``stats.corrupt`` and logged. Requests are answered
    concurrently, at most ``concurrency`` at a time; reads run in a worker thread so that disk
    and hashing overlap with sending. Blocking reads of a large store never stall the event loop.
    """

    def __init__(
        self,
        nc: Any,
        node: str,
        store: BlockSource,
        *,
        subjects: Subjects | None = None,
        concurrency: int = 8,
        queue: str | None = None,
        access: ReadAccess | None = None,
        stream: StreamGranter | None = None,
    ) -> None:
        self.nc = nc
        self.node = node
        self.store = store
        self.subjects = subjects if subjects is not None else Subjects()
        self.subject = self.subjects.block_get(node)
        self.queue = queue
        # None: every block is served to anyone who can reach the subject (an open domain).
        self.access = access
        # None: no block stream; grant requests are answered "use NATS".
        self.stream = stream
        self.stats = ServeStats()
        # Told once per object read (a request that asks for the root itself, or a stream
        # grant) with the requester: demand counting, docs/DEMAND.md.
        self.on_read: Callable[[Cid, str | None], None] | None = None
        self._slots = asyncio.Semaphore(max(1, concurrency))
        self._tasks: set[asyncio.Task[None]] = set()
        self._sub: Any = None

    @property
    def active(self) -> int:
        """Requests being answered right now."""
        return len(self._tasks)

    async def start(self) -> None:
        """Subscribe; blocks are served from now until ``stop``. Idempotent."""
        if self._sub is not None:
            return
        kwargs: dict[str, Any] = {"cb": self._on_request}
        if self.queue:
            kwargs["queue"] = self.queue
        self._sub = await self.nc.subscribe(self.subject, **kwargs)
        # The local server knows the interest when this returns; other leaves learn it through
        # the hub a moment later (``fetch.wait_for_holder`` waits for that).
        await self.nc.flush()

    async def stop(self) -> None:
        """Stop taking requests and wait for those being answered."""
        sub, self._sub = self._sub, None
        if sub is not None:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _on_request(self, msg: Any) -> None:
        # The subscription delivers one message at a time: take a slot, answer in a task.
        await self._slots.acquire()
        task = asyncio.create_task(self._answer(msg))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _answer(self, msg: Any) -> None:
        try:
            await self._serve(msg)
        except Exception:
            self.stats.errors += 1
            _log.exception("block request on %s failed", self.subject)
        finally:
            self._slots.release()

    def _reply_limit(self, asked: int) -> int:
        limit = int(getattr(self.nc, "max_payload", 0) or (1 << 20))
        if asked:
            limit = min(limit, asked)
        return max(limit, _MIN_REPLY)

    async def _serve(self, msg: Any) -> None:
        self.stats.requests += 1
        reply = msg.reply
        if not reply:
            self.stats.malformed += 1
            _log.warning("block request on %s without a reply subject: ignored", self.subject)
            return
        if is_grant_request(msg.data):
            await self._serve_grant(msg)
            return
        try:
            cids, asked, root = decode_request_for(msg.data)
        except ProtocolError as exc:
            self.stats.malformed += 1
            status = Status.TOO_LARGE if isinstance(exc, _TooLarge) else Status.MALFORMED
            _log.warning("malformed block request on %s: %s", self.subject, exc)
            await self._send(reply, _ReplyWriter(self._reply_limit(0)).end(status, str(exc)))
            return
        writer = _ReplyWriter(self._reply_limit(asked))
        if self.access is not None and await self._refused(msg.reply, root, cids, writer):
            return
        if self.on_read is not None and root is not None and root in cids:
            self.on_read(root, requester_of(reply))
        # Read ahead one block in a thread while the previous one is being sent.
        loop = asyncio.get_running_loop()
        pending: asyncio.Future[tuple[bytes | None, str]] | None = None
        for index, cid in enumerate(cids):
            if pending is None:
                pending = loop.run_in_executor(None, read_served, self.store, cid)
            data, problem = await pending
            pending = None
            if index + 1 < len(cids):
                pending = loop.run_in_executor(None, read_served, self.store, cids[index + 1])
            if data is None:
                self.stats.count_unservable(cid, problem)
                await self._send(reply, writer.missing(cid))
                continue
            await self._send(reply, writer.block(cid, data))
            self.stats.blocks_served += 1
            self.stats.bytes_served += len(data)
        await self._send(reply, writer.end())

    async def _serve_grant(self, msg: Any) -> None:
        writer = _ReplyWriter(self._reply_limit(0))
        try:
            root = decode_grant_request(msg.data)
        except ProtocolError as exc:
            self.stats.malformed += 1
            _log.warning("malformed grant request on %s: %s", self.subject, exc)
            await self._send(msg.reply, writer.end(Status.MALFORMED, str(exc)))
            return
        if self.stream is None:
            await self._send(msg.reply, writer.end(Status.OK, "no block stream on this node"))
            return
        requester = requester_of(msg.reply)
        if self.access is not None:
            if self.access.pin_of(root) is None:
                # As for block requests: not pinned here, so its readers are unknown here.
                await self._send(msg.reply, writer.end(Status.OK, "not pinned on this node"))
                return
            reason = await asyncio.to_thread(self.access.check, requester, root, [])
            if reason is not None:
                self.stats.refused += 1
                _log.info("refused stream grant on %s: %s", self.subject, reason)
                await self._send(msg.reply, writer.end(Status.NOT_ALLOWED, reason))
                return
        elif not await asyncio.to_thread(self.store.has, root):
            # The stream serves only what lies under the root in the local DAG; without the
            # root here it would serve nothing, while the NATS path serves what this node has.
            await self._send(msg.reply, writer.end(Status.OK, "the root is not on this node"))
            return
        if self.on_read is not None:
            self.on_read(root, requester)
        await self._send(msg.reply, writer.grant(self.stream.grant(root, requester)))
        await self._send(msg.reply, writer.end())

    async def _refused(
        self, reply: str, root: Cid | None, cids: list[Cid], writer: _ReplyWriter
    ) -> bool:
        """Answer a request that access control refuses; False when it is allowed."""
        assert self.access is not None
        requester = requester_of(reply)
        if root is not None and self.access.pin_of(root) is None:
            # Not pinned here: its readers are unknown on this node, so it is not served from
            # here; MISSING sends the requester on to the next holder.
            for cid in cids:
                self.stats.missing += 1
                await self._send(reply, writer.missing(cid))
            await self._send(reply, writer.end())
            return True
        # Checking DAG membership reads blocks: off the event loop.
        reason = await asyncio.to_thread(self.access.check, requester, root, cids)
        if reason is None:
            return False
        self.stats.refused += 1
        _log.info("refused block request on %s: %s", self.subject, reason)
        await self._send(reply, writer.end(Status.NOT_ALLOWED, reason))
        return True

    async def _send(self, reply: str, messages: Iterator[bytes]) -> None:
        for message in messages:
            await self.nc.publish(reply, message)
            self.stats.messages_sent += 1

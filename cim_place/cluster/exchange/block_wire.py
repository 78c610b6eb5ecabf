"""The block exchange wire format: block requests, grant requests and their replies.

This module owns how blocks travel between agents: a holder serves its blocks by request/reply on
``Subjects.block_get(node)`` (``cim.place.blk.<node>.get``) with the ``BlockServer`` of
``cim_place.cluster.exchange.blocks``; ``cim_place.cluster.exchange.fetch`` is the other side.
The data path is a compact binary framing, not DAG-CBOR, so that a block's bytes are copied once
into a message and never re-encoded.

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

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import Protocol

from cim_place.errors import InvalidCidError, ProtocolError
from cim_place.objectstore.cid import Cid, read_varint, split, to_str, varint

__all__ = [
    "MAX_BLOCK_SIZE",
    "MAX_REQUEST_BYTES",
    "MAX_REQUEST_CIDS",
    "MIN_REPLY",
    "End",
    "Grant",
    "Missing",
    "Part",
    "Record",
    "ReplyWriter",
    "RequestTooLargeError",
    "Status",
    "StreamGranter",
    "decode_grant_request",
    "decode_reply",
    "decode_request",
    "decode_request_for",
    "encode_grant_request",
    "encode_request",
    "is_grant_request",
]

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
MIN_REPLY = 1024
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
        raise RequestTooLargeError(f"request of {len(data)} bytes; at most {MAX_REQUEST_BYTES}")
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
            raise RequestTooLargeError(f"request names {count} CIDs; at most {MAX_REQUEST_CIDS}")
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


class RequestTooLargeError(ProtocolError):
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


class ReplyWriter:
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

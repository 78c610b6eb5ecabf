"""The upload protocol: its framing, error codes and the errors both sides raise.

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

Owner: see ``upload_access`` (in a domain that authenticates its users, the owner is the
requester NATS vouches for).

Either side may end a session early: the client with **abort**, the agent with **error** (a full
volume, a lost chunk, an idle timeout, the agent stopping). The importer pins only at the very
end, so a session that ends early leaves no pin; the blocks it wrote are unreferenced and go at
the next garbage collection.

The agent side is ``upload_server`` (with ``upload_pipe`` and ``upload_access``); the client is
``upload_client``. Inside the agent, the NATS handler feeds chunks into a ``ChunkPipe`` that a
worker thread reads as a file; ``ObjectStore.add`` runs there synchronously, unchanged.

Wire format: every message starts with ``0xCA 0x01 kind``. A data message continues with
``varint(len) session varint(seq)`` and the chunk bytes (no re-encoding); every other kind
continues with a DAG-CBOR map (``cim_place.objectstore.dagcbor``).
"""

from __future__ import annotations

from collections.abc import Mapping

from cim_place.errors import ProtocolError, StoreError, TransportError
from cim_place.objectstore import dagcbor
from cim_place.objectstore.cid import read_varint, varint

__all__ = [
    "ABORTED",
    "BUSY",
    "DEFAULT_HEADROOM",
    "FULL",
    "INVALID",
    "LOST",
    "MALFORMED",
    "NOT_ALLOWED",
    "STOPPING",
    "STORE",
    "TIMEOUT",
    "UploadAborted",
    "UploadError",
]

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


def _error(code: str, message: str) -> bytes:
    return _control(_ERROR, {"code": code, "message": message})

"""The block stream's frames: what a fetcher and a holder write on the TCP connection.

This module owns the framing of :mod:`cim_place.cluster.exchange.stream` (the holder's server)
and :mod:`cim_place.cluster.exchange.stream_client` (the fetcher's side): the header, the tags,
the GET body, the ``Block`` a fetcher receives, the ``host:port`` (``tls://``) addresses and the
TLS contexts of both ends.

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
"""

from __future__ import annotations

import ssl
import struct
from collections.abc import Sequence
from dataclasses import dataclass

from cim_place.cluster.exchange.block_wire import MAX_REQUEST_CIDS
from cim_place.errors import InvalidCidError, ProtocolError
from cim_place.objectstore.cid import Cid, split

__all__ = [
    "HEADER",
    "MAX_CID_BYTES",
    "MAX_REASON",
    "TAG_BLOCK",
    "TAG_END",
    "TAG_GET",
    "TAG_HELLO",
    "TAG_MISSING",
    "TAG_WELCOME",
    "TLS_SCHEME",
    "Block",
    "StreamRefusedError",
    "client_tls",
    "decode_get",
    "encode_get",
    "frame",
    "parse_address",
    "server_tls",
]

HEADER = struct.Struct(">BBI")
TAG_BLOCK = 0x01
TAG_MISSING = 0x02
TAG_END = 0x03
TAG_GET = 0x10
TAG_HELLO = 0x20
TAG_WELCOME = 0x21

MAX_CID_BYTES = 128
MAX_REASON = 512


class StreamRefusedError(ProtocolError):
    """The holder refused the connection (bad or expired token, too many connections)."""


@dataclass(frozen=True, slots=True)
class Block:
    """A block received on the stream (not yet verified)."""

    cid: Cid
    data: bytearray
    """Received straight into this buffer (it is not copied again)."""


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


def frame(tag: int, a: int, payload: bytes = b"") -> bytes:
    return HEADER.pack(tag, a, len(payload)) + payload


def encode_get(cids: Sequence[Cid]) -> bytes:
    """The GET frame for ``cids``."""
    if len(cids) > MAX_REQUEST_CIDS:
        raise ValueError(f"{len(cids)} CIDs in one request; at most {MAX_REQUEST_CIDS}")
    body = bytearray()
    for cid in cids:
        body.append(len(cid))
        body += cid
    return frame(TAG_GET, 0, bytes(body))


def decode_get(body: bytes) -> list[Cid]:
    """The CIDs of a GET body; raises ProtocolError saying what is wrong."""
    cids: list[Cid] = []
    pos = 0
    while pos < len(body):
        size = body[pos]
        pos += 1
        if size == 0 or size > MAX_CID_BYTES or pos + size > len(body):
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

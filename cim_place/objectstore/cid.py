"""CIDs as bytes.

Hot paths (importing, verifying, walking DAGs, storing blocks) keep CIDs as their binary form;
text forms are produced and parsed only at the edges (user input, printing, file names). The
binary form is the one IPFS uses inside dag-pb links and CAR files:

* CIDv0: the sha2-256 multihash itself, ``0x12 0x20 <32-byte digest>``;
* CIDv1: ``0x01 <varint codec> <multihash>``.

Text forms: CIDv0 is base58btc (``Qm...``), CIDv1 is multibase base32 lower case (``b...``).
``multiformats`` is accepted as a fallback parser for other multibases on input.
"""

from __future__ import annotations

import base64
import hashlib
from functools import lru_cache

from cim_place.errors import CorruptBlockError, InvalidCidError

Cid = bytes
"""A CID in binary form."""

DAG_PB = 0x70
RAW = 0x55
DAG_CBOR = 0x71
SHA2_256 = 0x12
_SHA2_256_LEN = 32

_B58_ALPHABET = b"123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
_B58_INDEX = {c: i for i, c in enumerate(_B58_ALPHABET)}


def varint(n: int) -> bytes:
    """Unsigned LEB128, as used by multiformats and protobuf."""
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def read_varint(buf: bytes | memoryview, pos: int = 0) -> tuple[int, int]:
    """Decode an unsigned varint at ``pos``; returns (value, next position)."""
    result = 0
    shift = 0
    while True:
        if pos >= len(buf):
            raise ValueError("truncated varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def make_cid(codec: int, data: bytes | memoryview, version: int = 1) -> Cid:
    """The CID of ``data`` under ``codec``: CIDv0 only exists for dag-pb."""
    return cid_of_digest(codec, hashlib.sha256(data).digest(), version)


def cid_of_digest(codec: int, digest: bytes, version: int = 1) -> Cid:
    """The CID of a block under ``codec`` from its sha2-256 ``digest`` (for a caller that hashed
    the block in pieces, never holding it whole)."""
    mh = b"\x12\x20" + digest
    if version == 0:
        if codec != DAG_PB:
            raise InvalidCidError("CIDv0 can only address dag-pb blocks")
        return mh
    return b"\x01" + varint(codec) + mh


def split(cid: Cid) -> tuple[int, int, int, bytes]:
    """(version, codec, hash code, digest) of a binary CID; raises InvalidCidError."""
    try:
        if len(cid) == 34 and cid[0] == SHA2_256 and cid[1] == _SHA2_256_LEN:
            return 0, DAG_PB, SHA2_256, cid[2:]
        version, pos = read_varint(cid, 0)
        if version != 1:
            raise InvalidCidError(f"unsupported CID version {version}")
        codec, pos = read_varint(cid, pos)
        code, pos = read_varint(cid, pos)
        length, pos = read_varint(cid, pos)
    except ValueError as exc:
        raise InvalidCidError(f"malformed binary CID {cid.hex()}: {exc}") from None
    digest = cid[pos:]
    if len(digest) != length:
        raise InvalidCidError(f"malformed binary CID {cid.hex()}: digest length mismatch")
    return 1, codec, code, digest


def codec_of(cid: Cid) -> int:
    if len(cid) == 34 and cid[0] == SHA2_256:
        return DAG_PB
    return split(cid)[1]


def verify(cid: Cid, data: bytes | memoryview) -> None:
    """Raise CorruptBlockError unless ``data`` hashes to ``cid``."""
    if not matches(cid, data):
        raise CorruptBlockError(to_str(cid))


def matches(cid: Cid, data: bytes | memoryview) -> bool:
    """True when ``data`` hashes to ``cid`` (sha2-256 only, the hash cim-place writes)."""
    _, _, code, digest = split(cid)
    if code != SHA2_256:
        raise InvalidCidError(f"CID {to_str(cid)} uses hash 0x{code:x}; only sha2-256 is supported")
    return hashlib.sha256(data).digest() == digest


def b58encode(data: bytes) -> str:
    n = int.from_bytes(data, "big")
    out = bytearray()
    while n:
        n, rem = divmod(n, 58)
        out.append(_B58_ALPHABET[rem])
    pad = len(data) - len(data.lstrip(b"\x00"))
    return (b"1" * pad + bytes(reversed(out))).decode("ascii")


def b58decode(text: str) -> bytes:
    n = 0
    for ch in text.encode("ascii"):
        if ch not in _B58_INDEX:
            raise ValueError(f"invalid base58 character {chr(ch)!r}")
        n = n * 58 + _B58_INDEX[ch]
    pad = len(text) - len(text.lstrip("1"))
    body = n.to_bytes((n.bit_length() + 7) // 8, "big") if n else b""
    return b"\x00" * pad + body


def b32encode(data: bytes) -> str:
    """RFC 4648 base32, lower case, without padding (multibase ``b`` without its prefix)."""
    return base64.b32encode(data).decode("ascii").rstrip("=").lower()


def b32decode(text: str) -> bytes:
    """The inverse of :func:`b32encode`; raises ValueError on anything else."""
    body = text.upper()
    return base64.b32decode(body + "=" * (-len(body) % 8))


def to_str(cid: Cid) -> str:
    """The canonical text form: base58btc for CIDv0, base32 lower case for CIDv1."""
    if type(cid) is bytes:  # hashable (not a bytearray or a view): look in the recent ones
        return _recent_text(cid)
    return _text(cid)


@lru_cache(maxsize=1024)
def _recent_text(cid: bytes) -> str:
    """:func:`_text`, remembered for the last CIDs: the controller names one CID several times
    while it reconciles it (its status, its KV key, its policy's selectors), and base32 in
    Python costs about 3 us a time."""
    return _text(cid)


def _text(cid: Cid) -> str:
    if len(cid) == 34 and cid[0] == SHA2_256 and cid[1] == _SHA2_256_LEN:
        return b58encode(cid)
    return "b" + b32encode(cid)


def parse(text: str) -> Cid:
    """Parse a CID string given by a user; raises InvalidCidError with a hint."""
    text = text.strip()
    hint = "a CID looks like Qm... (v0) or bafy.../bafk... (v1)"
    if not text:
        raise InvalidCidError(f"empty CID: {hint}")
    try:
        if len(text) == 46 and text.startswith("Qm"):
            cid = b58decode(text)
        elif text[0] == "b":
            cid = b32decode(text[1:])
        else:
            from multiformats import CID

            cid = bytes(CID.decode(text))
        split(cid)
    except (ValueError, InvalidCidError, KeyError, IndexError) as exc:
        # IndexError: multiformats on a one-character multibase string such as "0".
        raise InvalidCidError(f"{text!r} is not a valid CID ({exc}); {hint}") from None
    return cid

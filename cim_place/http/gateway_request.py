"""What a gateway request asks for, parsed and checked before any block is read (pure).

Owns the request side of the IPFS path and trustless gateway specs as cim-place implements
them: the content path (``/ipfs/{cid}[/path]``), the response format (``?format=`` or
``Accept``), CAR parameters (``dag-scope``, ``entity-bytes``, the CAR content-type parameters),
byte ranges and ``If-None-Match``. Every malformed input raises :class:`BadRequest` with a
one-line reason and the status to answer; nothing here touches the network or a disk.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from urllib.parse import unquote

from cim_place.errors import CimPlaceError, InvalidCidError
from cim_place.objectstore.cid import SHA2_256, Cid, parse, split

CAR_TYPE = "application/vnd.ipld.car"
RAW_TYPE = "application/vnd.ipld.raw"
MAX_SEGMENTS = 256
MAX_SEGMENT_BYTES = 255 * 4


class BadRequest(CimPlaceError):
    """A request the gateway refuses before reading content: ``status`` and a one-line reason."""

    def __init__(self, reason: str, status: int = 400) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class Format(enum.Enum):
    FILE = "file"
    """The UnixFS file's bytes (or a directory's index)."""
    RAW = "raw"
    """The one block of the terminal CID."""
    CAR = "car"
    """A CAR v1 of the DAG (scoped)."""


class Scope(enum.Enum):
    ALL = "all"
    ENTITY = "entity"
    BLOCK = "block"


@dataclass(frozen=True, slots=True)
class EntityBytes:
    """``entity-bytes=from:to`` of the spec: ``start`` may be negative (from the end); ``end``
    is inclusive, None for ``*``, and may be negative too."""

    start: int
    end: int | None

    def resolve(self, size: int) -> tuple[int, int] | None:
        """[first, last] inclusive within a file of ``size`` bytes; None when empty."""
        first = self.start if self.start >= 0 else max(0, size + self.start)
        if self.end is None:
            last = size - 1
        elif self.end >= 0:
            last = min(self.end, size - 1)
        else:
            last = size + self.end
        if size == 0 or first > last or first >= size:
            return None
        return first, last


@dataclass(frozen=True, slots=True)
class ContentPath:
    root: Cid
    segments: tuple[str, ...]

    def text(self, root_text: str) -> str:
        return "/ipfs/" + "/".join((root_text, *self.segments))


@dataclass(frozen=True, slots=True)
class Wanted:
    format: Format
    scope: Scope = Scope.ALL
    entity_bytes: EntityBytes | None = None


def parse_content_path(raw_cid: str, raw_rest: str) -> ContentPath:
    """The CID and the decoded path segments of ``/ipfs/{raw_cid}{raw_rest}`` (both still
    percent-encoded, as on the wire)."""
    try:
        text = unquote(raw_cid, errors="strict")
    except UnicodeDecodeError:
        raise BadRequest(f"invalid CID {raw_cid[:100]!r}: not UTF-8") from None
    if not text:
        raise BadRequest("no CID in the path: ask for /ipfs/{cid}")
    try:
        root = parse(text)
        _, _, code, _ = split(root)
    except (InvalidCidError, UnicodeDecodeError) as exc:
        raise BadRequest(f"invalid CID {text[:100]!r}: {_first_line(exc)}") from None
    if code != SHA2_256:
        raise BadRequest(
            f"CID {text[:100]!r} uses hash 0x{code:x}: this gateway verifies sha2-256 only"
        )
    segments: list[str] = []
    for raw in raw_rest.split("/"):
        if not raw:
            continue  # a trailing or doubled slash names nothing
        try:
            segment = unquote(raw, errors="strict")
        except UnicodeDecodeError:
            raise BadRequest(f"path segment {raw[:100]!r} is not UTF-8") from None
        if segment in (".", "..") or "/" in segment or "\x00" in segment:
            raise BadRequest(f"path segment {raw[:100]!r} is not allowed in a content path")
        if len(segment.encode()) > MAX_SEGMENT_BYTES:
            raise BadRequest(f"path segment of {len(segment.encode())} bytes is too long")
        segments.append(segment)
    if len(segments) > MAX_SEGMENTS:
        raise BadRequest(f"content path of {len(segments)} segments is too deep")
    return ContentPath(root, tuple(segments))


def _first_line(exc: BaseException) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def _media_types(accept: str) -> list[tuple[str, dict[str, str]]]:
    """(type, parameters) of each entry of an Accept header, in order."""
    out: list[tuple[str, dict[str, str]]] = []
    for entry in accept.split(","):
        parts = [part.strip() for part in entry.split(";")]
        if not parts[0]:
            continue
        params: dict[str, str] = {}
        for param in parts[1:]:
            key, _, value = param.partition("=")
            params[key.strip().lower()] = value.strip().strip('"')
        out.append((parts[0].lower(), params))
    return out


def wanted(query: dict[str, str], accept: str) -> Wanted:
    """The response format and CAR scope asked for by ``?format=``, ``Accept`` and the
    ``dag-scope`` / ``entity-bytes`` parameters. ``?format`` wins over ``Accept``."""
    fmt: Format | None = None
    car_params: dict[str, str] = {}
    by_query = query.get("format")
    if by_query is not None:
        try:
            fmt = {"raw": Format.RAW, "car": Format.CAR}[by_query]
        except KeyError:
            raise BadRequest(
                f"unsupported format={by_query[:40]!r}: this gateway serves format=raw or car"
            ) from None
    else:
        for media, params in _media_types(accept):
            if media == RAW_TYPE:
                fmt = Format.RAW
                break
            if media == CAR_TYPE:
                fmt, car_params = Format.CAR, params
                break
    if fmt is None:
        if "dag-scope" in query or "entity-bytes" in query:
            raise BadRequest("dag-scope and entity-bytes apply to CAR responses (format=car)")
        return Wanted(Format.FILE)
    if fmt is Format.RAW:
        return Wanted(Format.RAW)
    version = car_params.get("version", query.get("car-version", "1"))
    if version != "1":
        raise BadRequest(f"CAR version {version[:10]!r} is not served: ask for version=1")
    scope_text = query.get("dag-scope", "all")
    try:
        scope = Scope(scope_text)
    except ValueError:
        raise BadRequest(
            f"dag-scope={scope_text[:40]!r} is not one of all, entity, block"
        ) from None
    entity_bytes = None
    if "entity-bytes" in query:
        if scope is not Scope.ENTITY:
            raise BadRequest("entity-bytes needs dag-scope=entity")
        entity_bytes = parse_entity_bytes(query["entity-bytes"])
    return Wanted(Format.CAR, scope, entity_bytes)


def parse_entity_bytes(text: str) -> EntityBytes:
    """``from:to`` with integers (negative counts from the end) and ``to`` possibly ``*``."""
    start_text, sep, end_text = text.partition(":")
    try:
        if not sep:
            raise ValueError
        start = _bounded_int(start_text)
        end = None if end_text == "*" else _bounded_int(end_text)
    except ValueError:
        raise BadRequest(
            f"entity-bytes={text[:40]!r} must be from:to (integers, to may be *)"
        ) from None
    if end is not None and start >= 0 and end >= 0 and end < start:
        raise BadRequest(f"entity-bytes={text[:40]!r}: to is before from")
    return EntityBytes(start, end)


def _bounded_int(text: str) -> int:
    body = text[1:] if text.startswith("-") else text
    if not body.isdigit() or not body.isascii() or len(body) > 19:
        raise ValueError(text)
    return int(text)


def parse_range(header: str, size: int) -> tuple[int, int] | None:
    """The byte range [first, last] (inclusive) of a ``Range`` header within ``size`` bytes.

    None means "answer with the whole content" (no header, a unit other than bytes, or a
    multi-range request, which the spec allows a server to ignore). A syntactically valid range
    that starts past the end raises BadRequest with status 416.
    """
    unit, sep, spec = header.strip().partition("=")
    if not sep or unit.strip().lower() != "bytes" or "," in spec:
        return None
    first_text, dash, last_text = spec.strip().partition("-")
    try:
        if not dash:
            raise ValueError
        if not first_text:
            suffix = _bounded_int(last_text)
            if suffix <= 0:
                raise BadRequest(f"Range {header[:60]!r} asks for no bytes", 416)
            return (max(0, size - suffix), size - 1) if size else _unsatisfiable(header, size)
        first = _bounded_int(first_text)
        last = _bounded_int(last_text) if last_text else size - 1
    except ValueError:
        raise BadRequest(f"Range {header[:60]!r} is not bytes=first-last") from None
    if first < 0 or last < first:
        raise BadRequest(f"Range {header[:60]!r} is not bytes=first-last")
    if first >= size:
        return _unsatisfiable(header, size)
    return first, min(last, size - 1)


def _unsatisfiable(header: str, size: int) -> tuple[int, int]:
    raise BadRequest(f"Range {header[:60]!r} starts past the end ({size} bytes)", 416)


def etag_matches(if_none_match: str, etag: str) -> bool:
    """True when ``If-None-Match`` names ``etag`` (weak comparison) or is ``*``."""
    for candidate in if_none_match.split(","):
        tag = candidate.strip()
        if tag == "*":
            return True
        if tag.startswith("W/"):
            tag = tag[2:]
        if tag == etag:
            return True
    return False

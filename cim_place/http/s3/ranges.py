"""HTTP Range and conditional headers for GET/HEAD of an object (pure)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from email.utils import parsedate_to_datetime

from cim_place.http.s3.errors import S3Error

_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """(first, last) inclusive of a single ``bytes=`` range, None for the whole object.

    A header S3 would ignore (another unit, several ranges, garbage) gives None; a range that
    starts past the end is InvalidRange (416), as S3 answers.
    """
    if header is None:
        return None
    match = _RANGE.match(header.strip())
    if match is None:
        return None
    first, last = match.groups()
    if not first and not last:
        return None
    if not first:
        suffix = int(last)
        if suffix == 0 or size == 0:
            raise S3Error("InvalidRange", f"the range {header!r} is not satisfiable")
        return max(0, size - suffix), size - 1
    start = int(first)
    end = int(last) if last else size - 1
    if last and end < start:
        return None
    if start >= size:
        raise S3Error("InvalidRange", f"the range {header!r} starts past the end ({size} bytes)")
    return start, min(end, size - 1)


def _when(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError, IndexError):
        return None


def _etags(value: str) -> list[str]:
    return [part.strip().removeprefix("W/").strip('"') for part in value.split(",")]


def check_conditions(headers: Mapping[str, str], etag: str, mtime: float) -> int | None:
    """None to proceed, 304 (Not Modified) or 412 (PreconditionFailed), as S3 decides:
    If-Match beats If-Unmodified-Since, If-None-Match beats If-Modified-Since."""
    modified = int(mtime)
    if_match = headers.get("if-match")
    if if_match is not None:
        if "*" not in if_match and etag not in _etags(if_match):
            return 412
    else:
        since = _when(headers.get("if-unmodified-since"))
        if since is not None and modified > since:
            return 412
    if_none = headers.get("if-none-match")
    if if_none is not None:
        if "*" in if_none or etag in _etags(if_none):
            return 304
    else:
        since = _when(headers.get("if-modified-since"))
        if since is not None and modified <= since:
            return 304
    return None

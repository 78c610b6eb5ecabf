"""One page of a bucket listing: prefix, delimiter, a resume point, max-keys (pure)."""

from __future__ import annotations

import base64
import binascii
import bisect
from collections.abc import Sequence
from dataclasses import dataclass

from cim_place.http.s3.errors import S3Error

MAX_KEYS = 1000


@dataclass(frozen=True, slots=True)
class Page:
    keys: tuple[str, ...]
    """Object keys on the page (indices into the caller's list are not kept: keys are unique)."""
    prefixes: tuple[str, ...]
    truncated: bool
    last: str
    """The last key or common prefix on the page (where the next page resumes)."""


def page(keys: Sequence[str], *, prefix: str, delimiter: str, after: str, max_keys: int) -> Page:
    """``keys`` sorted; entries after ``after`` (a key, or a common prefix already returned).

    Binary searches find where the page starts and skip the keys under a common prefix, so a
    page costs O(log n + page) whatever the number of keys.
    """
    out: list[str] = []
    prefixes: list[str] = []
    last = ""
    if max_keys == 0:  # an empty page, not truncated (as S3 answers max-keys=0)
        return Page((), (), False, "")
    start = bisect.bisect_left(keys, prefix)
    if after:
        start = max(start, bisect.bisect_right(keys, after))
        if delimiter and after.endswith(delimiter):
            start = max(start, _past(keys, after, start))
    i = start
    while i < len(keys):
        key = keys[i]
        if not key.startswith(prefix):
            break
        entry = key
        cut = key.find(delimiter, len(prefix)) if delimiter else -1
        if cut >= 0:
            entry = key[: cut + len(delimiter)]
        if len(out) + len(prefixes) >= max_keys:
            return Page(tuple(out), tuple(prefixes), True, last)
        (prefixes if cut >= 0 else out).append(entry)
        last = entry
        i = _past(keys, entry, i) if cut >= 0 else i + 1
    return Page(tuple(out), tuple(prefixes), False, last)


def _past(keys: Sequence[str], head: str, lo: int) -> int:
    """The index after the last key that starts with ``head`` (keys from ``lo`` on)."""
    size = len(head)
    return bisect.bisect_right(keys, head, lo=lo, key=lambda k: k[:size])


def max_keys_of(text: str | None) -> int:
    if text is None:
        return MAX_KEYS
    try:
        value = int(text)
    except ValueError:
        raise S3Error("InvalidArgument", f"max-keys {text[:20]!r} is not a number") from None
    if value < 0:
        raise S3Error("InvalidArgument", "max-keys must not be negative")
    return min(value, MAX_KEYS)


def token_of(last: str) -> str:
    return base64.urlsafe_b64encode(last.encode()).decode()


def after_token(token: str) -> str:
    try:
        return base64.urlsafe_b64decode(token.encode()).decode()
    except (binascii.Error, ValueError, UnicodeDecodeError):
        raise S3Error("InvalidArgument", "the continuation token is not valid") from None

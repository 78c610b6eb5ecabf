"""One page of a bucket listing: prefix, delimiter, a resume point, max-keys (pure)."""

from __future__ import annotations

import base64
import binascii
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
    """``keys`` sorted; entries after ``after`` (a key, or a common prefix already returned)."""
    out: list[str] = []
    prefixes: list[str] = []
    last = ""
    skip_under = after if delimiter and after.endswith(delimiter) else ""
    for key in keys:
        if not key.startswith(prefix) or (after and key <= after):
            continue
        if skip_under and key.startswith(skip_under):
            continue
        entry = key
        is_prefix = False
        if delimiter:
            cut = key.find(delimiter, len(prefix))
            if cut >= 0:
                entry = key[: cut + len(delimiter)]
                is_prefix = True
        if is_prefix and prefixes and prefixes[-1] == entry:
            continue
        if len(out) + len(prefixes) >= max_keys:
            return Page(tuple(out), tuple(prefixes), True, last)
        (prefixes if is_prefix else out).append(entry)
        last = entry
        if is_prefix:
            skip_under = entry
    return Page(tuple(out), tuple(prefixes), False, last)


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

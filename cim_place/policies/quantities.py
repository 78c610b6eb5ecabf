"""Durations and byte sizes as operators write them (``7d``, ``1h30m``, ``50MiB``), and back.

Parsing raises ValueError with a message fit for a problem report; callers add the position.
"""

from __future__ import annotations

import re

_DURATION_UNITS = {"w": 7 * 86400, "d": 86400, "h": 3600, "m": 60, "s": 1}
_DURATION_RE = re.compile(r"^(?:\d+[wdhms])+$")
_DURATION_PART = re.compile(r"(\d+)([wdhms])")

_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 10**3,
    "kb": 10**3,
    "m": 10**6,
    "mb": 10**6,
    "g": 10**9,
    "gb": 10**9,
    "t": 10**12,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
_SIZE_RE = re.compile(r"^(\d+(?:\.\d+)?)\s*([a-zA-Z]*)$")

MAX_SECONDS = 100 * 365 * 86400
MAX_BYTES = 2**62

DURATION_HINT = "write whole seconds or a duration such as 90s, 15m, 12h, 7d, 2w or 1h30m"
SIZE_HINT = "write bytes or a size such as 500KB, 10MiB, 1.5GB"


def parse_duration(value: object) -> int:
    """Seconds from an int or a string such as ``7d`` or ``1h30m``."""
    if isinstance(value, bool):
        raise ValueError("expected a duration, got a boolean")
    if isinstance(value, int):
        seconds = value
    elif isinstance(value, str):
        text = value.strip().replace(" ", "")
        if text.isdigit():
            seconds = int(text)
        elif _DURATION_RE.match(text):
            seconds = sum(int(n) * _DURATION_UNITS[u] for n, u in _DURATION_PART.findall(text))
        else:
            raise ValueError(f"{value!r} is not a duration")
    else:
        raise ValueError(f"expected a duration, got {type_name(value)}")
    if seconds < 0:
        raise ValueError(f"a duration cannot be negative, got {seconds}")
    if seconds > MAX_SECONDS:
        raise ValueError(f"duration {value!r} is longer than 100 years")
    return seconds


def parse_size(value: object, *, per_second: bool = False) -> int:
    """Bytes from an int or a string such as ``10MiB``; ``/s`` allowed when ``per_second``."""
    if isinstance(value, bool):
        raise ValueError("expected a size, got a boolean")
    if isinstance(value, int):
        size = value
    elif isinstance(value, str):
        text = value.strip()
        if per_second and text.endswith("/s"):
            text = text[:-2].strip()
        m = _SIZE_RE.match(text)
        unit = m.group(2).lower() if m else ""
        if not m or unit not in _SIZE_UNITS:
            raise ValueError(f"{value!r} is not a size")
        size = round(float(m.group(1)) * _SIZE_UNITS[unit])
    else:
        raise ValueError(f"expected a size, got {type_name(value)}")
    if size < 0:
        raise ValueError(f"a size cannot be negative, got {size}")
    if size > MAX_BYTES:
        raise ValueError(f"size {value!r} is too large")
    return size


def format_duration(seconds: int) -> str:
    """``604800`` -> ``7d``; ``5400`` -> ``1h30m``."""
    if seconds == 0:
        return "0s"
    parts = []
    for unit in ("d", "h", "m", "s"):
        count, seconds = divmod(seconds, _DURATION_UNITS[unit])
        if count:
            parts.append(f"{count}{unit}")
    return "".join(parts)


def format_size(size: int) -> str:
    """``52428800`` -> ``50MiB``; exact when a binary unit divides, else bytes."""
    for unit, factor in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if size and size % factor == 0:
            return f"{size // factor}{unit}"
    return f"{size}B"


def type_name(value: object) -> str:
    """How a YAML author would name the type of ``value``."""
    if value is None:
        return "nothing (null)"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return type(value).__name__

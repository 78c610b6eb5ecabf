"""The `demand:` section of a policy: its rules, its canonical form and its one-line summary.

Kept apart from :mod:`cim_place.policies.validate` (which calls :func:`read_demand`) so the rules
of demand-driven copies are read in one place; docs/DEMAND.md describes them for people.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from cim_place.policies import quantities
from cim_place.policies.loader import INVALID, Path
from cim_place.policies.model import Demand

if TYPE_CHECKING:
    from cim_place.policies.policy_reader import PolicyReader

DEMAND_KEYS = ("follow", "min_reads", "window", "max_extra", "keep", "budget")
FOLLOW_VALUES = ("readers", "zone")
MAX_MIN_READS = 1_000_000
MAX_EXTRA = 100
SERVICE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,127}$")
SERVICE_HINT = "a service identity (its NATS or HTTP user): letters, digits, _ . @ -, up to 128"
_PERCENT_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*%\s*$")
BUDGET_HINT = "a share of each node's capacity such as 20%, or a size such as 500GiB"


def read_demand(reader: PolicyReader, value: object, path: Path) -> Demand | None:
    """The Demand of a policy's `demand:` mapping, or None after reporting every problem."""
    m = reader.mapping(value, path, DEMAND_KEYS, "demand")
    if m is None:
        return None
    default = Demand()
    ok = True
    follow = default.follow
    if "follow" in m:
        got = reader.string(m["follow"], (*path, "follow"), "demand.follow")
        if got == "readers":
            follow = "readers"
        elif got == "zone":
            follow = "zone"
        else:
            if got is not None:
                reader.problem(
                    (*path, "follow"),
                    f"unknown demand.follow {got!r}",
                    "readers (a copy on the reading node) or zone (a copy in the reading zone)",
                )
            ok = False
    min_reads = _integer(reader, m, path, "min_reads", default.min_reads, MAX_MIN_READS)
    max_extra = _integer(reader, m, path, "max_extra", default.max_extra, MAX_EXTRA)
    window = _duration(reader, m, path, "window", default.window_seconds)
    keep = _duration(reader, m, path, "keep", default.keep_seconds)
    budget = _budget(reader, m["budget"], (*path, "budget")) if "budget" in m else None
    if "budget" in m and budget is None:
        ok = False
    if window is not None and keep is not None and keep < window:
        reader.problem(
            (*path, "keep"),
            f"demand.keep ({quantities.format_duration(keep)}) is shorter than demand.window "
            f"({quantities.format_duration(window)}): a copy could be dropped while its reads "
            "still count, and come straight back",
            "make keep at least as long as window",
        )
        ok = False
    if not ok or min_reads is None or max_extra is None or window is None or keep is None:
        return None
    percent, size = budget if budget is not None else (default.budget_percent, None)
    return Demand(
        follow=follow,
        min_reads=min_reads,
        window_seconds=window,
        max_extra=max_extra,
        keep_seconds=keep,
        budget_percent=percent,
        budget_bytes=size,
    )


def _integer(
    reader: PolicyReader, m: dict[str, object], path: Path, key: str, default: int, high: int
) -> int | None:
    if key not in m:
        return default
    return reader.integer(m[key], (*path, key), f"demand.{key}", 1, high)


def _duration(
    reader: PolicyReader, m: dict[str, object], path: Path, key: str, default: int
) -> int | None:
    if key not in m:
        return default
    seconds = reader.duration(m[key], (*path, key), f"demand.{key}")
    if seconds == 0:
        reader.problem(
            (*path, key), f"demand.{key} must be longer than 0", quantities.DURATION_HINT
        )
        return None
    return seconds


def _budget(
    reader: PolicyReader, value: object, path: Path
) -> tuple[float | None, int | None] | None:
    """(percent, None) or (None, bytes); None after a problem."""
    if value is INVALID:
        return None
    if isinstance(value, str) and (m := _PERCENT_RE.match(value)):
        percent = float(m.group(1))
        if not 0 < percent <= 100:
            reader.problem(
                path,
                f"demand.budget must be more than 0% and at most 100%, got {value}",
                BUDGET_HINT,
            )
            return None
        return (percent, None)
    # A bare number is refused: `budget: 20` is far more likely a forgotten % than 20 bytes.
    if isinstance(value, int | float) and not isinstance(value, bool):
        reader.problem(
            path,
            f"demand.budget {value} has no unit",
            f"write {value}% for a share of capacity, or a size such as {value}GiB",
        )
        return None
    try:
        size = quantities.parse_size(value)
    except ValueError as exc:
        reader.problem(path, f"demand.budget: {exc}", BUDGET_HINT)
        return None
    if size == 0:
        reader.problem(path, "demand.budget must be more than 0", "remove `demand` for no copies")
        return None
    return (None, size)


def demand_to_dict(demand: Demand) -> dict[str, Any]:
    """The canonical form (a valid `demand:` mapping; seconds as integers, budget with a unit)."""
    budget = (
        f"{demand.budget_bytes}B"
        if demand.budget_bytes is not None
        else f"{_number(demand.budget_percent or 0.0)}%"
    )
    return {
        "follow": demand.follow,
        "min_reads": demand.min_reads,
        "window": demand.window_seconds,
        "max_extra": demand.max_extra,
        "keep": demand.keep_seconds,
        "budget": budget,
    }


def summarize_demand(demand: Demand) -> str:
    """One line for `policy explain`, e.g. ``up to 2 cached copies near readers of >= 5 reads``."""
    where = "on each reading node" if demand.follow == "readers" else "in each reading zone"
    budget = (
        quantities.format_size(demand.budget_bytes)
        if demand.budget_bytes is not None
        else f"{_number(demand.budget_percent or 0.0)}% of capacity"
    )
    return (
        f"up to {demand.max_extra} cached {'copy' if demand.max_extra == 1 else 'copies'} "
        f"{where} after {demand.min_reads} reads in "
        f"{quantities.format_duration(demand.window_seconds)}, dropped after "
        f"{quantities.format_duration(demand.keep_seconds)} unread, node budget {budget}"
    )


def _number(x: float) -> str:
    return str(int(x)) if x == int(x) else repr(x)

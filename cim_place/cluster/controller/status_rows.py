"""Rows of ``cim-place status`` listings, the query of one page and its checks (pure, light).

Shared by the controller's index (:mod:`cim_place.cluster.controller.status_index`), its API
(:mod:`cim_place.cluster.controller.status_api`) and the CLI, which checks its flags with the
controller's own :func:`parse_request` before it connects (so a bad flag is a usage error with
the same words) and filters rows the same way when it has to read them without a controller.
Imports neither numpy nor NATS: it is on the CLI's cold start.

A request is JSON, checked as hostile input: at most :data:`MAX_REQUEST` bytes, an object with
only these keys, each optional: ``{"state": str, "node": str, "policy": str, "name": str
(glob), "after": str (cursor), "limit": int (1..1000, default 100)}``, or ``{"cid": str}``
alone for one row.
"""

from __future__ import annotations

import fnmatch
import json
import re
from dataclasses import dataclass
from typing import Any

from cim_place.cluster.nats.subjects import check_node_id
from cim_place.errors import CimPlaceError
from cim_place.placement.status import OBJECT_STATES, ObjectStatus

__all__ = [
    "MAX_LIMIT",
    "MAX_REQUEST",
    "STATUS_API",
    "BadStatusQuery",
    "Page",
    "Query",
    "Row",
    "glob_regex",
    "name_matches",
    "parse_request",
    "row_of",
]

STATUS_API = "status"
"""``<prefix>.api.status``: the subject of status listings."""
MAX_LIMIT = 1000
"""Most rows one page may ask for (a reply stays far below NATS' 1 MiB payload limit)."""
MAX_REQUEST = 4096
_MAX_TEXT = {"name": 1024, "policy": 128, "after": 256, "cid": 256}
_KEYS = ("state", "node", "policy", "name", "after", "limit", "cid")


@dataclass(frozen=True, slots=True)
class Row:
    """One object as a listing shows it."""

    cid: str
    name: str | None
    state: str
    policy: str
    pinned: int
    desired: int
    damaged: int
    size: int
    nodes: tuple[str, ...]

    def to_dict(self) -> dict[str, object]:
        return {
            "cid": self.cid,
            "name": self.name,
            "state": self.state,
            "policy": self.policy,
            "pinned": self.pinned,
            "desired": self.desired,
            "damaged": self.damaged,
            "size": self.size,
            "nodes": list(self.nodes),
        }


def row_of(status: ObjectStatus) -> Row:
    """The row of a materialised status (also what a listing without a controller shows)."""
    return Row(
        cid=status.cid,
        name=status.name,
        state=status.state,
        policy=status.policy,
        pinned=status.pinned,
        desired=status.desired,
        damaged=status.damaged,
        size=status.size,
        nodes=tuple(dict.fromkeys(loc.node for loc in status.locations)),
    )


@dataclass(frozen=True, slots=True)
class Query:
    """Filters of one page (each None: any), the cursor and the page size (already checked)."""

    state: str | None = None
    node: str | None = None
    policy: str | None = None
    name: str | None = None
    """A glob over the object's name (``fnmatch`` rules, case-sensitive; ``*`` crosses ``/``)."""
    after: str | None = None
    limit: int = 100

    def matches(self, row: Row) -> bool:
        """The same filters over one row (for listings read without the index)."""
        return (
            (self.state is None or row.state == self.state)
            and (self.policy is None or row.policy == self.policy)
            and (self.node is None or self.node in row.nodes)
            and (self.name is None or (row.name is not None and name_matches(self.name, row.name)))
            and (self.after is None or row.cid > self.after)
        )


@dataclass(frozen=True, slots=True)
class Page:
    rows: list[Row]
    next: str | None
    """The cursor of the following page (the last CID here), None on the last page."""


_STAR = object()


def glob_regex(glob: str) -> str:
    """A regular expression matching what ``fnmatch.fnmatchcase(name, glob)`` matches, for names
    without a newline, that never matches a newline (so it stays inside one line of the blob).

    As ``fnmatch`` does, the text between two stars is an atomic group that takes its first
    occurrence (``(?>[^\\n]*?X)``): without it ``*a*a*a*b`` backtracks exponentially, and the
    glob comes from whoever asks."""
    tokens: list[object] = []
    i, n = 0, len(glob)
    while i < n:
        char = glob[i]
        i += 1
        if char == "*":
            if not tokens or tokens[-1] is not _STAR:
                tokens.append(_STAR)
        elif char == "?":
            tokens.append("[^\n]")
        elif char == "[":
            j = i
            if j < n and glob[j] == "!":
                j += 1
            if j < n and glob[j] == "]":
                j += 1
            while j < n and glob[j] != "]":
                j += 1
            if j >= n:
                tokens.append(re.escape(char))
                continue
            # fnmatch's own translation of the bracket expression keeps its rules (ranges,
            # negation, empty ranges); the lookahead keeps a negated class off the separator.
            inner = fnmatch.translate(glob[i - 1 : j + 1])
            tokens.append("(?!\n)" + inner[len("(?s:") : -len(")\\Z")])
            i = j + 1
        else:
            tokens.append(re.escape(char))
    segments: list[list[str]] = [[]]
    for token in tokens:
        if token is _STAR:
            segments.append([])
        else:
            assert isinstance(token, str)
            segments[-1].append(token)
    if len(segments) == 1:
        return "".join(segments[0])
    first, *middle, last = ("".join(segment) for segment in segments)
    atomic = "".join(f"(?>[^\n]*?{segment})" for segment in middle)
    return f"{first}{atomic}[^\n]*{last}"


_single: dict[str, re.Pattern[str]] = {}


def name_matches(glob: str, name: str) -> bool:
    """``fnmatch.fnmatchcase`` with the index's translation (names with a newline never match)."""
    pattern = _single.get(glob)
    if pattern is None:
        if len(_single) > 64:
            _single.clear()
        pattern = _single[glob] = re.compile(f"(?:{glob_regex(glob)})\\Z")
    return "\n" not in name and pattern.match(name) is not None


class BadStatusQuery(CimPlaceError):
    """A status request the controller refuses; the message names the field and the problem,
    ``field`` is that field ("" when the request as a whole is wrong)."""

    def __init__(self, message: str, field: str = "") -> None:
        super().__init__(message)
        self.field = field


def _text(doc: dict[str, Any], key: str) -> str | None:
    value = doc.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise BadStatusQuery(f"{key} must be a string, got {type(value).__name__}", key)
    if len(value) > _MAX_TEXT.get(key, 128):
        raise BadStatusQuery(f"{key} is longer than {_MAX_TEXT.get(key, 128)} characters", key)
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in value):
        raise BadStatusQuery(f"{key} holds control characters", key)
    return value


def parse_request(data: bytes) -> Query | str:
    """The query of a request (or the CID text of a one-row request); BadStatusQuery else."""
    if len(data) > MAX_REQUEST:
        raise BadStatusQuery(f"a status request is at most {MAX_REQUEST} bytes, got {len(data)}")
    try:
        doc = json.loads(data) if data else {}
    except ValueError:
        raise BadStatusQuery("a status request is JSON") from None
    if not isinstance(doc, dict):
        raise BadStatusQuery("a status request is a JSON object")
    unknown = sorted(str(key) for key in doc if key not in _KEYS)
    if unknown:
        raise BadStatusQuery(f"unknown field {unknown[0][:40]!r}; fields: {', '.join(_KEYS)}")
    cid = _text(doc, "cid")
    if cid is not None:
        if len(doc) > 1:
            raise BadStatusQuery("cid asks for one object: give it alone", "cid")
        return cid
    state = _text(doc, "state")
    if state is not None and state not in OBJECT_STATES:
        raise BadStatusQuery(
            f"state {state[:40]!r} is not an object state; use one of {', '.join(OBJECT_STATES)}",
            "state",
        )
    node = _text(doc, "node")
    if node is not None:
        try:
            check_node_id(node)
        except CimPlaceError as exc:
            raise BadStatusQuery(str(exc), "node") from None
    limit = doc.get("limit", 100)
    if type(limit) is not int or not 1 <= limit <= MAX_LIMIT:
        raise BadStatusQuery(
            f"limit must be a whole number from 1 to {MAX_LIMIT}, got {limit!r}", "limit"
        )
    return Query(
        state=state,
        node=node,
        policy=_text(doc, "policy"),
        name=_text(doc, "name"),
        after=_text(doc, "after"),
        limit=limit,
    )

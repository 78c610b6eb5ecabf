"""The controller's status queries: ``<prefix>.api.status``, answered from the status index.

``cim-place status --state/--node/--policy/--name/--after/--limit`` asks here (request/reply on
core NATS; the operator's read-only user may publish on ``<prefix>.api.>``,
cluster/nats/security.py), and only the **leading** controller answers: it alone reconciles, so
it alone keeps the index (:mod:`cim_place.cluster.controller.status_index`) current.

A request is JSON, checked as hostile input (:func:`parse_request`): at most
:data:`MAX_REQUEST` bytes, an object with only these keys, each optional:
``{"state": str, "node": str, "policy": str, "name": str (glob), "after": str (cursor),
"limit": int (1..1000, default 100)}``, or ``{"cid": str}`` alone for one row. The answer:
``{"objects": [row, ...], "next": str | null, "indexed": int, "tracked": int}``, ``{"object":
row | null, ...}`` for a CID, or ``{"error": str, "code": "bad_request"}`` naming the problem.
``indexed`` < ``tracked`` while a new leader is still reconciling every object once.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Callable, Collection
from typing import Any

import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from cim_place.cluster.controller.status_index import MAX_LIMIT, Query, StatusIndex
from cim_place.cluster.nats.subjects import Subjects, check_node_id
from cim_place.errors import CimPlaceError
from cim_place.placement.status import OBJECT_STATES

__all__ = [
    "MAX_REQUEST",
    "STATUS_API",
    "BadStatusQuery",
    "StatusQueries",
    "answer",
    "parse_request",
]

STATUS_API = "status"
"""``<prefix>.api.status``: the subject of status listings."""
MAX_REQUEST = 4096
_MAX_TEXT = {"name": 1024, "policy": 128, "after": 256, "cid": 256}
_KEYS = ("state", "node", "policy", "name", "after", "limit", "cid")
_log = logging.getLogger(__name__)


class BadStatusQuery(CimPlaceError):
    """A status request the controller refuses; the message names the field and the problem."""


def _text(doc: dict[str, Any], key: str) -> str | None:
    value = doc.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise BadStatusQuery(f"{key} must be a string, got {type(value).__name__}")
    if len(value) > _MAX_TEXT.get(key, 128):
        raise BadStatusQuery(f"{key} is longer than {_MAX_TEXT.get(key, 128)} characters")
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in value):
        raise BadStatusQuery(f"{key} holds control characters")
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
            raise BadStatusQuery("cid asks for one object: give it alone")
        return cid
    state = _text(doc, "state")
    if state is not None and state not in OBJECT_STATES:
        raise BadStatusQuery(
            f"state {state[:40]!r} is not an object state; use one of {', '.join(OBJECT_STATES)}"
        )
    node = _text(doc, "node")
    if node is not None:
        try:
            check_node_id(node)
        except CimPlaceError as exc:
            raise BadStatusQuery(str(exc)) from None
    limit = doc.get("limit", 100)
    if type(limit) is not int or not 1 <= limit <= MAX_LIMIT:
        raise BadStatusQuery(f"limit must be a whole number from 1 to {MAX_LIMIT}, got {limit!r}")
    return Query(
        state=state,
        node=node,
        policy=_text(doc, "policy"),
        name=_text(doc, "name"),
        after=_text(doc, "after"),
        limit=limit,
    )


def answer(index: StatusIndex, data: bytes, tracked: int = 0) -> dict[str, Any]:
    """The answer to one request (pure: what :class:`StatusQueries` sends back)."""
    try:
        query = parse_request(data)
    except BadStatusQuery as exc:
        return {"error": str(exc), "code": "bad_request"}
    counts = {"indexed": len(index), "tracked": max(tracked, len(index))}
    if isinstance(query, str):
        row = index.get(query.strip())
        return {"object": None if row is None else row.to_dict(), **counts}
    page = index.page(query)
    return {"objects": [row.to_dict() for row in page.rows], "next": page.next, **counts}


class StatusQueries:
    """Answers ``<prefix>.api.status`` while ``is_leader()``; :meth:`start` ... :meth:`stop`."""

    def __init__(
        self,
        nc: Client,
        subjects: Subjects,
        index: StatusIndex,
        *,
        is_leader: Callable[[], bool],
        tracked: Callable[[], int] = lambda: 0,
    ) -> None:
        self.nc = nc
        self.subjects = subjects
        self.index = index
        self.is_leader = is_leader
        self.tracked = tracked
        self._sub: Subscription | None = None

    async def start(self) -> None:
        self._sub = await self.nc.subscribe(self.subjects.api(STATUS_API), cb=self._on_request)

    async def stop(self) -> None:
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
            self._sub = None

    async def _on_request(self, msg: Msg) -> None:
        if not msg.reply or not self.is_leader():
            return  # a standby's index is empty or stale: the leader answers
        try:
            doc = answer(self.index, msg.data, self.tracked())
        except Exception:  # a bug costs this answer, never the subscription
            _log.exception("status query failed")
            doc = {"error": "the controller failed to answer; see its log", "code": "failed"}
        with contextlib.suppress(nats.errors.Error):
            await msg.respond(json.dumps(doc, separators=(",", ":")).encode())


def known(values: Collection[str]) -> str:
    """``a, b, c`` (for error messages)."""
    return ", ".join(sorted(values)) or "none"

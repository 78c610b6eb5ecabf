"""The dashboard's JSON API: ``/ui/api/summary``, ``nodes``, ``objects``, ``object/{ref}`` and
``tasks``, read-only, from the hub's materialised state (the same readers as the CLI).

``objects?state=&q=&after=&limit=`` pages through the object records ordered by CID: ``state``
one of the object states, ``q`` a name glob (``reports/*``) or a CID prefix, ``after`` the last
CID of the previous page, ``limit`` 1-500. The records come from a scan of the location shards,
kept for :data:`LISTING_TTL` seconds so that every open dashboard polling costs one scan.
Bad parameters answer 400 with a one-line reason.
"""

from __future__ import annotations

import asyncio
import fnmatch
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from aiohttp import web
from nats.js import JetStreamContext

from cim_place.cluster.state import overview
from cim_place.errors import CimPlaceError, TransportError

if TYPE_CHECKING:
    from cim_place.placement.status import ObjectStatus

LISTING_TTL = 2.0
"""Seconds a scan of the object records is reused (the dashboard polls every 2 s)."""
MAX_LIMIT = 500
MAX_QUERY = 256
HISTORY = 50
"""Task events shown for one object."""
HISTORY_TTL = 5.0
"""Seconds one object's task history is reused: reading it scans the task events."""
JetStreamOf = Callable[[], Awaitable[JetStreamContext]]


class BadParameter(CimPlaceError):
    """A query parameter the API cannot use (answered 400)."""


def _int_param(request: web.Request, name: str, default: int, low: int, high: int) -> int:
    text = request.query.get(name, "")
    if not text:
        return default
    try:
        value = int(text)
    except ValueError:
        raise BadParameter(f"{name} must be a whole number, got {text[:40]!r}") from None
    if not low <= value <= high:
        raise BadParameter(f"{name} must be between {low} and {high}, got {value}")
    return value


def _text_param(request: web.Request, name: str) -> str:
    text = request.query.get(name, "")
    if len(text) > MAX_QUERY:
        raise BadParameter(f"{name} is longer than {MAX_QUERY} characters")
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in text):
        raise BadParameter(f"{name} holds control characters")
    return text.strip()


def matches(status: ObjectStatus, query: str) -> bool:
    """A CID prefix, or a glob over the name (a plain word matches names containing it)."""
    if not query:
        return True
    if status.cid.startswith(query):
        return True
    name = status.name or ""
    if any(ch in query for ch in "*?["):
        return fnmatch.fnmatchcase(name, query)
    return query in name


def brief(status: ObjectStatus) -> dict[str, Any]:
    """One row of the object list."""
    return {
        "cid": status.cid,
        "name": status.name,
        "state": status.state,
        "pinned": status.pinned,
        "desired": status.desired,
        "policy": status.policy,
        "size": status.size,
        "updated_at": status.updated_at,
    }


class DashboardApi:
    """The handlers; ``js`` gives the hub's JetStream context (opened lazily by the agent)."""

    def __init__(self, js: JetStreamOf) -> None:
        self._js = js
        self._listing: tuple[float, list[ObjectStatus]] | None = None
        self._listing_lock = asyncio.Lock()
        self._history: dict[str, tuple[float, list[dict[str, Any]], str | None]] = {}

    async def _records(self) -> list[ObjectStatus]:
        async with self._listing_lock:
            now = time.monotonic()
            if self._listing is None or now - self._listing[0] > LISTING_TTL:
                records = await overview.listing(await self._js(), None)
                records.sort(key=lambda status: status.cid)
                self._listing = (time.monotonic(), records)
            return self._listing[1]

    async def _answer(self, read: Callable[[], Awaitable[Any]]) -> web.Response:
        try:
            doc = await read()
        except BadParameter as exc:
            return error(400, str(exc))
        except TransportError as exc:
            return error(502, str(exc).splitlines()[0])
        except CimPlaceError as exc:
            return error(404, str(exc).splitlines()[0])
        return web.json_response(doc, headers={"Cache-Control": "no-store"})

    async def summary(self, request: web.Request) -> web.Response:
        async def read() -> dict[str, Any]:
            return await overview.summary(await self._js())

        return await self._answer(read)

    async def nodes(self, request: web.Request) -> web.Response:
        async def read() -> list[dict[str, Any]]:
            return await overview.nodes(await self._js())

        return await self._answer(read)

    async def tasks(self, request: web.Request) -> web.Response:
        async def read() -> dict[str, Any]:
            limit = _int_param(request, "limit", 20, 1, MAX_LIMIT)
            doc = await overview.tasks(await self._js(), limit)
            try:
                records = await self._records()
            except TransportError as exc:
                doc["notes"].append(str(exc).splitlines()[0])
                records = []
            # Replicas being made or dropped: what the queue counts, named by object.
            doc["in_flight"] = [
                {
                    "cid": s.cid,
                    "name": s.name,
                    "node": loc.node,
                    "volume": loc.volume,
                    "state": loc.state,
                }
                for s in records
                for loc in s.locations
                if loc.state in ("fetching", "dropping", "repairing")
            ][:MAX_LIMIT]
            return doc

        return await self._answer(read)

    async def objects(self, request: web.Request) -> web.Response:
        async def read() -> dict[str, Any]:
            state = _text_param(request, "state")
            if state and state not in overview.STATES:
                raise BadParameter(
                    f"state {state[:40]!r} is not one of {', '.join(overview.STATES)}"
                )
            query = _text_param(request, "q")
            after = _text_param(request, "after")
            limit = _int_param(request, "limit", 50, 1, MAX_LIMIT)
            records = await self._records()
            chosen = [s for s in records if (not state or s.state == state) and matches(s, query)]
            page = [s for s in chosen if s.cid > after] if after else chosen
            shown = page[:limit]
            return {
                "objects": [brief(s) for s in shown],
                "matched": len(chosen),
                "next": shown[-1].cid if len(page) > limit else None,
                "by_state": {
                    st: sum(1 for s in records if s.state == st) for st in overview.STATES
                },
            }

        return await self._answer(read)

    async def object(self, request: web.Request) -> web.Response:
        async def read() -> dict[str, Any]:
            ref = request.match_info["ref"]
            if len(ref) > MAX_QUERY or any(ord(ch) < 32 for ch in ref):
                raise BadParameter("not a CID or a name")
            js = await self._js()
            status = await overview.object_status(js, ref)
            history, note = await overview.task_events(js, HISTORY, root=status.cid, completed=True)
            doc = status.to_dict()
            doc["pinned"] = status.pinned
            doc["tasks"] = history
            doc["notes"] = [note] if note else []
            return doc

        return await self._answer(read)

    async def _task_history(
        self, js: JetStreamContext, cid: str
    ) -> tuple[list[dict[str, Any]], str | None]:
        now = time.monotonic()
        cached = self._history.get(cid)
        if cached is not None and now - cached[0] <= HISTORY_TTL:
            return cached[1], cached[2]
        history, note = await overview.task_events(js, HISTORY, root=cid, completed=True)
        # Only the objects open in a page now are worth keeping.
        self._history = {k: v for k, v in self._history.items() if now - v[0] <= HISTORY_TTL}
        self._history[cid] = (time.monotonic(), history, note)
        return history, note


def error(status: int, reason: str) -> web.Response:
    """A JSON error with a one-line reason."""
    return web.json_response(
        {"error": reason.splitlines()[0] if reason else ""},
        status=status,
        headers={"Cache-Control": "no-store"},
    )

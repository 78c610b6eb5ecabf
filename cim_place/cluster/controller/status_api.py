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

With controller shards (``controller --shards N``) every process leading a shard answers for the
shards it leads, adding ``"shards": [i, ...], "of": N``; the CLI gathers one answer per shard
and merges the pages (cli/_listing.py).
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Callable
from typing import Any

import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from cim_place.cluster.controller.status_index import StatusIndex
from cim_place.cluster.controller.status_rows import STATUS_API, BadStatusQuery, parse_request
from cim_place.cluster.nats.subjects import Subjects

__all__ = ["STATUS_API", "StatusQueries", "answer"]

_log = logging.getLogger(__name__)


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
        layout: Callable[[], dict[str, Any]] | None = None,
    ) -> None:
        self.nc = nc
        self.subjects = subjects
        self.index = index
        self.is_leader = is_leader
        self.tracked = tracked
        self.layout = layout
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
            if self.layout is not None and "error" not in doc:
                doc.update(self.layout())
        except Exception:  # a bug costs this answer, never the subscription
            _log.exception("status query failed")
            doc = {"error": "the controller failed to answer; see its log", "code": "failed"}
        with contextlib.suppress(nats.errors.Error):
            await msg.respond(json.dumps(doc, separators=(",", ":")).encode())

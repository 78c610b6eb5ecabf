"""``<prefix>.api.demand``: what the leading controller knows of an object's demand.

``cim-place policy explain`` asks it (JSON ``{"cid": "<CID>"}``) and prints the answer beside
the placement: the reads counted per node over the policy's window, and the controller's last
demand decision about the object in words (:func:`cim_place.placement.demand.describe`: why each
cached copy is there or goes, which demand got no copy and why). Only the leader answers, as
for ``api.rm``: a standby's window may be behind. Reads only; nothing is changed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Callable
from typing import Any

import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from cim_place.cluster.controller.cached import CachedCopies
from cim_place.cluster.nats.subjects import Subjects
from cim_place.errors import CimPlaceError
from cim_place.objectstore import cid as cids
from cim_place.objectstore.cid import Cid
from cim_place.policies.quantities import format_duration

__all__ = ["DEMAND_API", "DemandQueries", "request_demand"]

DEMAND_API = "demand"
"""``<prefix>.api.demand``: the subject ``policy explain`` asks on."""

_log = logging.getLogger(__name__)


class DemandQueries:
    """The controller's answers on ``api.demand``; :meth:`start` subscribes."""

    def __init__(
        self,
        nc: Client,
        subjects: Subjects,
        cached: CachedCopies,
        *,
        is_leader: Callable[[], bool],
        policy_of: Callable[[Cid], str | None],
        leads: Callable[[Cid], bool] | None = None,
    ) -> None:
        self.nc = nc
        self.subjects = subjects
        self.cached = cached
        self.is_leader = is_leader
        self.policy_of = policy_of
        # With controller shards, only the leader of the CID's shard knows its decisions.
        self.leads = leads
        self._sub: Subscription | None = None

    async def start(self) -> None:
        self._sub = await self.nc.subscribe(self.subjects.api(DEMAND_API), cb=self._on_request)

    async def _on_request(self, msg: Msg) -> None:
        if not self.is_leader() or not msg.reply:
            return
        try:
            request = json.loads(msg.data)
            if not isinstance(request, dict) or not isinstance(request.get("cid"), str):
                raise CimPlaceError("a demand query is JSON with a string `cid`")
            root = cids.parse(request["cid"])
            if self.leads is not None and not self.leads(root):
                return
            answer = self.answer(root, time.time())
        except (ValueError, RecursionError, CimPlaceError) as exc:
            # Requests come from anyone allowed on the API subject: malformed ones get an answer.
            answer = {"error": str(exc) or type(exc).__name__}
        with contextlib.suppress(nats.errors.Error):
            await msg.respond(json.dumps(answer, sort_keys=True).encode())

    def answer(self, root: Cid, now: float) -> dict[str, Any]:
        """The reads and the last decision about ``root``, for explain."""
        policy = self.policy_of(root)
        rule = self.cached.rules.get(policy or "")
        if policy is None:
            return {"cid": cids.to_str(root), "known": False, "lines": []}
        if rule is None:
            return {
                "cid": cids.to_str(root),
                "known": True,
                "policy": policy,
                "lines": [f"policy {policy!r} has no demand section: no cached copies"],
            }
        reads = self.cached.window.by_node(root, now, rule.window)
        counted = sorted(((n, r.count) for n, r in reads.items()), key=lambda x: (-x[1], x[0]))
        lines = []
        if counted:
            per_node = ", ".join(f"{n} {c}" for n, c in counted)
            lines.append(f"reads in the last {format_duration(int(rule.window))}: {per_node}")
        else:
            lines.append(f"no reads in the last {format_duration(int(rule.window))}")
        lines.extend(self.cached.explain(root, policy, now))
        return {
            "cid": cids.to_str(root),
            "known": True,
            "policy": policy,
            "reads": dict(counted),
            "lines": lines,
        }


async def request_demand(nc: Any, cid: str, *, timeout: float = 2.0) -> list[str]:
    """The leading controller's demand lines for ``cid``; [] when none answers in time (an
    older controller, no leader): explain then shows what the status says."""
    try:
        reply = await nc.request(
            Subjects().api(DEMAND_API), json.dumps({"cid": cid}).encode(), timeout=timeout
        )
        answer = json.loads(reply.data)
    except (nats.errors.Error, TimeoutError, ValueError):
        return []
    lines = answer.get("lines") if isinstance(answer, dict) else None
    return [str(line) for line in lines] if isinstance(lines, list) else []

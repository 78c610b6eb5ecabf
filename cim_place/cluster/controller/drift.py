"""Inventory drift: when a node's ``InventoryDigest`` disagrees with the projection, reconcile.

The controller lists the node's pins on that volume (paged, from the agent:
:mod:`cim_place.cluster.agent.inventory`), compares them with the roots the projection places
there, and asks the agent to announce the truth about every root on which they differ: the agent
publishes ``ObjectStored`` for the ones it holds and ``ObjectRemoved`` for the others, and the
projection follows from those events like from any other. The controller never writes a node's
events itself.
"""

from __future__ import annotations

import json
from typing import Any

from cim_place.cluster.nats.subjects import Subjects
from cim_place.errors import TransportError
from cim_place.objectstore.cid import Cid

PAGE = 10_000
TIMEOUT = 30.0


async def _ask(nc: Any, subject: str, request: dict[str, Any]) -> dict[str, Any]:
    try:
        reply = await nc.request(subject, json.dumps(request).encode(), timeout=TIMEOUT)
        answer = json.loads(reply.data)
    except Exception as exc:
        raise TransportError(f"inventory request on {subject} failed: {exc}") from None
    if not isinstance(answer, dict) or "error" in answer:
        raise TransportError(f"inventory request on {subject}: {answer}")
    return answer


async def held_roots(nc: Any, node: str, volume: str, subjects: Subjects) -> set[Cid]:
    """Every root pinned on ``node``'s ``volume``, as the agent lists them."""
    subject = subjects.agent_inventory(node)
    held: set[Cid] = set()
    after = ""
    while True:
        page = await _ask(
            nc, subject, {"op": "list", "volume": volume, "after": after, "limit": PAGE}
        )
        roots = [bytes.fromhex(r) for r in page.get("roots", [])]
        held.update(roots)
        if not page.get("more") or not roots:
            return held
        after = roots[-1].hex()


async def reconcile_drift(
    nc: Any, node: str, volume: str, projected: set[Cid], subjects: Subjects
) -> int:
    """Make ``node`` announce the truth about every root where it and the projection differ;
    the number of such roots."""
    held = await held_roots(nc, node, volume, subjects)
    differ = sorted(held ^ projected)
    subject = subjects.agent_inventory(node)
    for start in range(0, len(differ), PAGE):
        chunk = [root.hex() for root in differ[start : start + PAGE]]
        await _ask(nc, subject, {"op": "announce", "volume": volume, "roots": chunk})
    return len(differ)

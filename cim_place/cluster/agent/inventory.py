"""The agent's answer to inventory drift: list its pins, and announce the truth about roots.

The agent publishes an ``InventoryDigest`` per volume now and then; when the controller's
projection disagrees with it, the controller reconciles instead of only noticing
(:mod:`cim_place.cluster.controller.drift`) through ``<prefix>.agent.<node>.inventory``:

- ``{"op": "list", "volume": V, "after": HEX, "limit": N}`` -> ``{"roots": [HEX...], "more":
  bool}``: the pinned roots of volume V in CID order, a page at a time;
- ``{"op": "announce", "volume": V, "roots": [HEX...]}`` -> ``{"stored": n, "removed": n}``:
  for each root, ``ObjectStored`` when it is pinned on V, ``ObjectRemoved`` when it is not. The
  agent says only what its own pins say, so a controller can ask but never make a node claim
  content it does not hold.

Errors are answered as ``{"error": "..."}``.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from cim_place.cluster.nats.subjects import Subjects
from cim_place.interfaces import Pin
from cim_place.objectstore.store import ObjectStore

_log = logging.getLogger(__name__)

MAX_PAGE = 10_000
"""Roots per page (about 370 KB of hex CIDs: within nats-server's default 1 MiB payload)."""

Announce = Callable[[Pin, str], Awaitable[None]]


class InventoryService:
    def __init__(
        self,
        nc: Any,
        node: str,
        volumes: dict[str, ObjectStore],
        *,
        stored: Announce,
        removed: Announce,
        subjects: Subjects | None = None,
    ) -> None:
        self.nc = nc
        self.node = node
        self.volumes = volumes
        self._stored = stored
        self._removed = removed
        self.subjects = subjects if subjects is not None else Subjects()
        self._sub: Any = None

    async def start(self) -> None:
        self._sub = await self.nc.subscribe(
            self.subjects.agent_inventory(self.node), cb=self._on_request
        )

    async def stop(self) -> None:
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
            self._sub = None

    async def _on_request(self, msg: Any) -> None:
        if not msg.reply:
            return
        try:
            request = json.loads(msg.data)
            answer = await self.answer(request)
        except (ValueError, TypeError, KeyError) as exc:
            answer = {"error": f"malformed inventory request: {exc}"}
        with contextlib.suppress(Exception):
            await self.nc.publish(msg.reply, json.dumps(answer).encode())

    async def answer(self, request: dict[str, Any]) -> dict[str, Any]:
        volume = str(request["volume"])
        store = self.volumes.get(volume)
        if store is None:
            return {"error": f"node {self.node} has no volume {volume!r}"}
        if request.get("op") == "list":
            after = bytes.fromhex(str(request.get("after", "")))
            limit = max(1, min(int(request.get("limit", MAX_PAGE)), MAX_PAGE))
            roots = sorted(r for r in store.pins.roots() if r > after)
            return {"roots": [r.hex() for r in roots[:limit]], "more": len(roots) > limit}
        if request.get("op") == "announce":
            stored = removed = 0
            for text in request["roots"][:MAX_PAGE]:
                root = bytes.fromhex(str(text))
                pin = store.pins.get(root)
                if pin is not None:
                    await self._stored(pin, volume)
                    stored += 1
                else:
                    gone = Pin(root=root, size=0, blocks=0, name=None, owner="", pinned_at=0.0)
                    await self._removed(gone, volume)
                    removed += 1
            _log.info(
                "inventory of %s reconciled: %d announced stored, %d removed",
                volume,
                stored,
                removed,
            )
            return {"stored": stored, "removed": removed}
        return {"error": f"unknown inventory op {request.get('op')!r}"}

"""Inventory checks: a node's claims about content against what it really holds.

This module owns what the controller does when an agent's ``InventoryDigest`` disagrees with the
projection (:meth:`Projection.drift`), and the memory of what it found:

1. A digest applied after the feed caught up (or, at start, every digest replayed) whose volume
   disagrees with the projection makes that ``(node, volume)`` due for a check.
2. The check asks the node, on the who-has subject, which of the roots the projection places on
   it it holds. The answer comes from the agent's pins, not from its events.
3. The answer is believed when it is complete: the node answered (a silent node may be busy or
   away), or the roots it named hash to its digest (so it holds exactly those). Then every root
   the projection places there and the node does not hold is a false claim (a forged or stale
   ``ObjectStored``): its replica is forgotten and the CID marked for reconcile.
4. Each false claim is written to KV ``cim-place-inventory`` (key ``<node>.<volume>``: root ->
   the stream sequence up to which claims are disbelieved). A controller reads the bucket before
   it replays the event store, and :meth:`InventoryCheck.disproved_root` names those claims
   during the replay, which are then dropped, so a restart re-believes no forgery; a later
   ``ObjectStored`` (a real copy made since) is believed as usual. The root of a claim
   dropped so is still marked: a leader that believed the claim may have written a status
   showing the copy, and been stopped before it wrote another (the reconcile of a CID the
   projection does not know removes that status).

Roots the node holds that the projection does not know (an ``ObjectRemoved`` that lied, forged
or stale) are not added back here: who-has answers only for the roots asked about. The same
digest makes the controller list the node's pins and ask it to announce every root where the two
differ (:mod:`cim_place.cluster.controller.drift`); the node's ``ObjectStored`` brings the copy
back into the view. A fetch the controller sends meanwhile finds the copy pinned and the agent
announces it then too.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable, Iterable

import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.js.client import JetStreamContext
from nats.js.kv import KeyValue

from cim_place.cluster.controller.projection import Projection
from cim_place.cluster.events.readers import StoredEvent
from cim_place.cluster.events.types import ObjectStored, inventory_digest, object_fields
from cim_place.cluster.exchange.holders import MAX_QUERY_CIDS, who_has
from cim_place.cluster.nats import kv
from cim_place.cluster.nats.kv_listing import latest_entries
from cim_place.cluster.nats.subjects import Subjects
from cim_place.errors import CimPlaceError
from cim_place.objectstore.cid import Cid, parse, to_str

__all__ = ["INVENTORY_BUCKET", "InventoryCheck"]

_log = logging.getLogger(__name__)

INVENTORY_BUCKET = "cim-place-inventory"
ANSWER_TIMEOUT = 2.0
"""Seconds to wait for the node's who-has answers."""


def _key(node: str, volume: str) -> str:
    return f"{node}.{volume}"


class InventoryCheck:
    """Checks drifting volumes, forgets false claims, and keeps them forgotten across restarts."""

    def __init__(
        self,
        nc: Client,
        js: JetStreamContext,
        projection: Projection,
        mark: Callable[[Iterable[Cid]], None],
        *,
        subjects: Subjects | None = None,
        replicas: int = 1,
    ) -> None:
        self.nc = nc
        self.js = js
        self.projection = projection
        self.mark = mark
        self.subjects = subjects if subjects is not None else Subjects()
        self.replicas = replicas
        self._bucket: KeyValue | None = None
        # (node, volume) -> root -> stream sequence up to which its claims are disbelieved.
        self._disproved: dict[tuple[str, str], dict[Cid, int]] = {}
        self._due: set[tuple[str, str]] = set()
        self._wake = asyncio.Event()
        self.checks = 0
        self.forgotten = 0
        """Replicas forgotten because their node does not hold them."""

    async def open(self) -> None:
        """Open the bucket and read what earlier checks disproved (before the replay)."""
        self._bucket = await kv.ensure_bucket(
            self.js, INVENTORY_BUCKET, history=1, replicas=self.replicas
        )
        for entry in await latest_entries(self._bucket):
            node, _, volume = entry.key.partition(".")
            if entry.value:
                self._disproved[(node, volume)] = _decode(entry.value)

    def disproved_root(self, stored: StoredEvent) -> Cid | None:
        """The root of ``stored`` if it is an ``ObjectStored`` an earlier check disproved (see
        the module's step 4): the event is then not believed."""
        if not self._disproved:
            return None
        content = stored.envelope.content
        if content.type != ObjectStored.TYPE:
            return None
        fields = object_fields(content.body)
        if fields is None:
            return None  # validation rejects it anyway
        upto = self._disproved.get((stored.node, fields[3]), {}).get(fields[0])
        if upto is None or (stored.envelope.sequence or 0) > upto:
            return None
        return fields[0]

    def forget_disproved(self, after_sequence: int) -> int:
        """Drop the replicas disproved at or after ``after_sequence`` from a projection just
        restored from a snapshot of that sequence (the check may have come after the snapshot;
        a replica stored again later has a higher sequence and comes with the tail)."""
        dropped = 0
        for (node, volume), roots in self._disproved.items():
            for root, upto in roots.items():
                if upto >= after_sequence and self.projection.drop_replica(root, node, volume):
                    dropped += 1
        return dropped

    def due(self, node: str, volume: str) -> None:
        """Check ``(node, volume)`` if its last digest disagrees with the projection."""
        if self.projection.drift(node, volume):
            self._due.add((node, volume))
            self._wake.set()

    def due_all(self, places: Iterable[tuple[str, str]]) -> None:
        for node, volume in places:
            self.due(node, volume)

    async def run(self) -> None:
        """Work through the due checks until cancelled."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._due:
                node, volume = self._due.pop()
                try:
                    await self.check(node, volume)
                except (CimPlaceError, nats.errors.Error, TimeoutError) as exc:
                    _log.warning("inventory check of %s/%s: %s", node, volume, exc)

    async def check(self, node: str, volume: str) -> set[Cid]:
        """Ask ``node`` what it holds of what the projection places on ``volume``; forget the
        claims it does not back. Returns the CIDs whose replica was forgotten."""
        digest = self.projection.inventory(node, volume)
        claimed = sorted(self.projection.cids_on(node, volume))
        if digest is None:
            return set()
        self.checks += 1
        held: set[Cid] = set()
        for start in range(0, len(claimed), MAX_QUERY_CIDS):
            batch = claimed[start : start + MAX_QUERY_CIDS]
            found = await who_has(self.nc, batch, timeout=ANSWER_TIMEOUT, subjects=self.subjects)
            held |= {
                root for root, holders in found.items() if any(h.node == node for h in holders)
            }
        complete = bool(held) or digest.pins == 0 or inventory_digest(held) == digest.digest
        false = set(claimed) - held
        if not complete:
            _log.info("inventory check of %s/%s: no answer; trying again later", node, volume)
            return set()
        if not false:
            _log.info(
                "inventory of %s/%s differs from the projection, but every root placed there "
                "is held (the node holds roots the controller does not know of)",
                node,
                volume,
            )
            return set()
        upto = self.projection.last_sequence
        disproved = self._disproved.setdefault((node, volume), {})
        for root in false:
            self.projection.drop_replica(root, node, volume)
            disproved[root] = upto
        self.forgotten += len(false)
        _log.warning(
            "inventory check: %s does not hold %d root(s) it claimed on %s (%s); forgotten",
            node,
            len(false),
            volume,
            ", ".join(to_str(r) for r in sorted(false)[:3]) + (" ..." if len(false) > 3 else ""),
        )
        await self._save(node, volume)
        self.mark(false)
        return false

    async def _save(self, node: str, volume: str) -> None:
        if self._bucket is None:
            return
        await self._bucket.put(_key(node, volume), _encode(self._disproved[(node, volume)]))


def _encode(disproved: dict[Cid, int]) -> bytes:
    return json.dumps({to_str(root): upto for root, upto in disproved.items()}).encode()


def _decode(data: bytes) -> dict[Cid, int]:
    found: dict[Cid, int] = {}
    with contextlib.suppress(ValueError, AttributeError, CimPlaceError):
        for text, upto in json.loads(data).items():
            found[parse(str(text))] = int(upto)
    return found

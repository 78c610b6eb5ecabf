"""Sharded leadership: ``cim-place controller --shards N``, one lease per shard of the CIDs.

This module owns which shards this controller process leads. With N > 1 the domain's CIDs are
split by :func:`~cim_place.cluster.state.cid_shards.shard_of` (contiguous ranges of the digest)
and each shard has its own lease, ``shard.<i>-of-<N>`` in KV ``cim-place-leader``, kept by an
ordinary :class:`~cim_place.cluster.state.leader.LeaderElection`: the same server-side TTL,
compare-and-set renewal, self-deposition before the key can expire and synchronous deposition
as the single lease. Any process can lead any shard; nothing but NATS coordinates them.

Every process keeps the whole projection warm (it reads every event), so taking a shard over
costs no replay: the new leader marks that shard's CIDs and reconciles them, and a task the old
leader enqueued has the same deterministic id, so the stream's duplicate window drops it.

How the shards are shared, kept simple:

1. Each process writes ``member.<identity>`` every renewal period; the key expires with the
   bucket's TTL (the lease), so the keys present are the live processes.
2. A process campaigns for a free shard only while it leads fewer than its share,
   ``ceil(N / live processes)``, or when the shard has stayed free for longer than one lease
   (nobody took it: a safety net while membership is stale).
3. A process leading more than its share (it started first, or a peer just joined) resigns its
   highest shard, one per period: it is deposed first, then it deletes the key, and a peer under
   its share takes it at its next try.
4. A starting process waits one period after announcing itself before campaigning, so processes
   started together see each other and split the shards instead of one taking all.

5. Every controller of a domain must run with the same N. A process that sees the unsharded
   lease (``controller``: a controller without ``--shards``) or a lease of another shard count
   held leads nothing (it resigns what it leads) and logs why, until that lease is gone: two
   layouts leading at once would act on the same CIDs.

A process that dies stops renewing: its leases and its member key expire within the TTL, the
survivors' share grows, and they take its shards at their next try (at most one renewal period
after the key expired).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace
from functools import partial

import nats.errors
import nats.js.errors
import numpy as np
import numpy.typing as npt
from nats.js.client import JetStreamContext
from nats.js.kv import KeyValue

from cim_place.cluster.controller.object_states import ObjectStates
from cim_place.cluster.controller.status_index import StatusIndex
from cim_place.cluster.nats import kv
from cim_place.cluster.nats.kv_listing import live_keys
from cim_place.cluster.state.cid_shards import (
    MEMBER_PREFIX,
    MemberRecord,
    shard_key,
    shard_of,
    summary_key,
)
from cim_place.cluster.state.leader import LEADER_KEY, LeaderElection
from cim_place.errors import TransportError
from cim_place.objectstore.cid import Cid, to_str
from cim_place.placement.status import Summary

__all__ = ["ShardLeadership", "forget_shard", "shard_summaries", "write_shard_summaries"]

_log = logging.getLogger(__name__)


class ShardLeadership:
    """The leases of ``shards`` shards, shared with peer processes (rules: module docstring).

    ``on_elected(i)`` / ``on_deposed(i)`` run synchronously right after :meth:`leads` changed
    for shard ``i``, like the callbacks of a single :class:`LeaderElection`.
    """

    def __init__(
        self,
        js_hub: JetStreamContext,
        identity: str,
        shards: int,
        *,
        lease: float,
        replicas: int = 1,
        on_elected: Callable[[int], None],
        on_deposed: Callable[[int], None],
    ) -> None:
        if shards < 2:
            raise ValueError(f"sharded leadership needs at least 2 shards, got {shards}")
        self.js = js_hub
        self.identity = identity
        self.shards = shards
        self.led: set[int] = set()
        self._on_elected = on_elected
        self._on_deposed = on_deposed
        self.elections = [
            LeaderElection(
                js_hub,
                identity,
                lease=lease,
                replicas=replicas,
                key=shard_key(i, shards),
                on_elected=partial(self._elected, i),
                on_deposed=partial(self._deposed, i),
                may_campaign=partial(self.may_campaign, i),
            )
            for i in range(shards)
        ]
        self.members = 1
        self._ready = False
        self.conflict = ""
        """Why this process leads nothing now (another layout's lease is held), or empty."""
        self._free_since: dict[int, float] = {}
        self._bucket: KeyValue | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    # -- what the controller reads ----------------------------------------------------------------
    @property
    def is_leader(self) -> bool:
        """True while this process leads at least one shard."""
        return bool(self.led)

    def leads(self, cid: Cid) -> bool:
        """True while this process leads the shard of ``cid``."""
        led = self.led
        if not led:
            return False
        return len(led) == self.shards or shard_of(cid, self.shards) in led

    def leads_shard(self, index: int) -> bool:
        return index in self.led

    def share(self) -> int:
        """How many shards this process may lead: ``ceil(shards / live processes)``."""
        return math.ceil(self.shards / max(1, self.members))

    def may_campaign(self, index: int) -> bool:
        """Asked by shard ``index``'s election before each try for its free lease."""
        if not self._ready or self.conflict or self.elections[index].is_leader:
            return False
        if len(self.led) < self.share():
            return True
        free = self._free_since.get(index)
        return free is not None and time.monotonic() - free > self.elections[index].lease

    def cids_of(self, index: int, cids: Iterable[Cid]) -> list[Cid]:
        return [cid for cid in cids if shard_of(cid, self.shards) == index]

    # -- lifecycle --------------------------------------------------------------------------------
    async def start(self) -> None:
        for election in self.elections:
            await election.start()
        # The elections opened (or created, with the lease as TTL) the bucket: members go there.
        self._bucket = await self.js.key_value(kv.LEADER)
        self._stopping = False
        self._task = asyncio.create_task(self._run(), name=f"cim-place-shards-{self.identity}")

    async def stop(self, *, release: bool = True) -> None:
        """Stop competing; every led shard is deposed first, then (``release``) freed."""
        # The flag too, not only the cancellation: on Python 3.11 a cancellation that meets an
        # expiring asyncio.timeout in the round becomes a TimeoutError, which the loop survives.
        self._stopping = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for election in self.elections:
            await election.stop(release=release)
        if release and self._bucket is not None:
            with contextlib.suppress(nats.errors.Error, TimeoutError):
                async with asyncio.timeout(self.elections[0].lease):
                    await self._bucket.delete(MEMBER_PREFIX + self.identity)

    async def _run(self) -> None:
        period = self.elections[0].renew_every
        announced = False
        while not self._stopping:
            try:
                await self._round()
                if announced and not self._ready:
                    self._ready = True  # peers started with us have announced themselves too
                    for election in self.elections:
                        election.nudge()
                announced = True
            except (nats.errors.Error, TransportError, TimeoutError, OSError) as exc:
                _log.debug("%s: shard membership round failed: %s", self.identity, exc)
            except Exception:
                _log.exception("%s: shard membership round failed", self.identity)
            await asyncio.sleep(period)

    async def _round(self) -> None:
        assert self._bucket is not None
        bucket = self._bucket
        record = MemberRecord(self.identity, self.shards, tuple(sorted(self.led)), time.time())
        # A round may take up to a lease (a loaded hub): the member key is written first.
        async with asyncio.timeout(self.elections[0].lease):
            await bucket.put(MEMBER_PREFIX + self.identity, record.encode())
            keys = set(await live_keys(bucket))
        share = self.share()
        self.members = max(1, sum(1 for key in keys if key.startswith(MEMBER_PREFIX)))
        if self._ready and self.share() > share:
            for election in self.elections:  # a peer left: try for its shards now
                election.nudge()
        others = sorted(
            key
            for key in keys
            if key == LEADER_KEY
            or (key.startswith("shard.") and not key.endswith(f"-of-{self.shards}"))
        )
        conflict = f"lease {others[0]} is held by a controller of another layout" if others else ""
        if conflict != self.conflict:
            if conflict:
                _log.error(
                    "%s leads no shard while %s: every controller of a domain must run with the "
                    "same --shards (%d here)",
                    self.identity,
                    conflict,
                    self.shards,
                )
            else:
                _log.info("%s: no other layout's lease is held any more", self.identity)
            self.conflict = conflict
        if conflict:
            for index in sorted(self.led):
                await self.elections[index].resign(conflict)
            return
        now = time.monotonic()
        for index in range(self.shards):
            if shard_key(index, self.shards) in keys:
                self._free_since.pop(index, None)
            else:
                self._free_since.setdefault(index, now)
        if len(self.led) > self.share():
            index = max(self.led)
            await self.elections[index].resign(
                f"{self.members} controllers share {self.shards} shards: "
                f"leading {len(self.led)}, more than its share of {self.share()}"
            )

    # -- callbacks --------------------------------------------------------------------------------
    def _elected(self, index: int) -> None:
        self.led.add(index)
        _log.info("%s leads shard %d of %d", self.identity, index, self.shards)
        self._on_elected(index)

    def _deposed(self, index: int) -> None:
        self.led.discard(index)
        self._on_deposed(index)


FORGET_CHUNK = 4096
"""Objects of a shard no longer led forgotten between two turns of the event loop."""


async def forget_shard(
    index: int,
    states: ObjectStates,
    keys_at: Callable[[npt.NDArray[np.intp]], list[Cid]],
    sets: Iterable[set[Cid]],
    status_index: StatusIndex,
    *,
    won_back: Callable[[], bool],
) -> int:
    """Forget what this process noted about shard ``index``'s objects (it no longer leads it):
    their states, their membership of ``sets`` and their status-index rows; returns how many
    objects were forgotten. ``keys_at``: the projection's CIDs of slots.

    :data:`FORGET_CHUNK` objects at a time, with the event loop's turn between: at 14-26 us an
    object, a shard of 5 million objects forgotten in one go would hold the loop for one to two
    minutes, past the leases of the shards still led, which would expire too. Stops
    when ``won_back()`` (the shard is led again: its walk notes every object afresh). Until the
    last chunk, status listings of this process may still show rows of the shard beside its new
    leader's (the CLI keeps one row per CID).
    """
    slots = states.slots_of_shard(index)
    others = list(sets)
    forgotten = 0
    for first in range(0, len(slots), FORGET_CHUNK):
        if won_back():
            break
        # Still noted and still of that shard (a slot freed and given to another object since
        # is that object's now).
        part = states.of_shard(slots[first : first + FORGET_CHUNK], index)
        gone = keys_at(part)
        states.clear_slots(part)
        for cid in gone:
            for noted in others:
                noted.discard(cid)
            status_index.remove(to_str(cid))
        forgotten += len(gone)
        await asyncio.sleep(0)
    return forgotten


def shard_summaries(
    base: Summary,
    states: ObjectStates,
    under: set[Cid],
    sizes_at: Callable[[npt.NDArray[np.intp]], npt.NDArray[np.uint64]],
    shards: int,
    led: Iterable[int],
) -> dict[int, Summary]:
    """``base`` (the process's whole summary) split into one summary per led shard.

    Objects are counted from ``states`` (what this process last reconciled; a shard it no
    longer leads was forgotten by :func:`forget_shard`); what every process sees whole (nodes,
    damaged replicas, warnings) stays as in ``base``.
    """
    wanted = set(led)
    noted = states.noted_slots()
    of_shard = states.shards_of(noted)
    sizes = sizes_at(noted)
    by_shard = states.counts_by_shard(noted, shards)
    unders = dict.fromkeys(wanted, 0)
    for cid in under:
        index = shard_of(cid, shards)
        if index in wanted:
            unders[index] += 1
    parts = {}
    for i in wanted:
        counts = by_shard[i]
        parts[i] = replace(
            base,
            objects=sum(counts.values()),
            by_state=counts,
            under_replicated=unders[i],
            total_bytes=int(sizes[of_shard == i].sum()),
        )
    return parts


async def write_shard_summaries(
    bucket: KeyValue, summaries: Mapping[int, Summary], shards: int
) -> None:
    """Write each shard's summary under its key in the locations base ``bucket``."""
    for index, summary in summaries.items():
        await bucket.put(summary_key(index, shards), summary.encode())

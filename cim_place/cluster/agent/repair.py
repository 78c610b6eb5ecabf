"""Repair of a damaged replica, and the sweep of failed writes' leftovers: the agent's side of
durability beside the scrub (:mod:`cim_place.cluster.agent.scrubbing`).

A repair re-checks the replica, deletes its corrupt blocks (so they count as absent), and lets a
verified fetch bring back exactly what is absent from the holders the controller named (nodes
with a verified copy); the fetch keeps whatever is present and valid, so only the bad blocks
move. The replica is then checked whole once more before the agent announces it stored again.

A repair task may carry a rate limit (its policy's ``repair.bandwidth``): :class:`RepairLimits`
keeps one shared limit per rate, so the repairs of one policy on this node share it, on top of
the agent's own ``tasks.bandwidth``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Mapping

from cim_place.cluster.agent.metrics import AgentMetrics
from cim_place.cluster.agent.scrubbing import ScrubService
from cim_place.cluster.exchange.fetch_model import FetchResult, Holder
from cim_place.cluster.exchange.ratelimit import BandwidthLimit, Throttle, combined
from cim_place.cluster.tasks.model import Task
from cim_place.errors import StoreError
from cim_place.objectstore import leftovers
from cim_place.objectstore.cid import Cid, to_str
from cim_place.objectstore.store import ObjectStore

_log = logging.getLogger(__name__)

FetchInto = Callable[[ObjectStore, leftovers.JournaledBlocks, list[Holder]], Awaitable[FetchResult]]


class RepairLimits:
    """The throttle of each task's fetch: the agent's own limit, and for a task with a rate
    limit one limit shared by every task with that rate (in practice: one policy's repairs)."""

    def __init__(self, agent_limit: BandwidthLimit | None) -> None:
        self.agent_limit = agent_limit
        self._by_rate: dict[int, BandwidthLimit] = {}

    def for_task(self, task: Task) -> Throttle | None:
        rate = task.rate_limit
        if not rate:
            return self.agent_limit
        limit = self._by_rate.get(rate)
        if limit is None:
            limit = self._by_rate[rate] = BandwidthLimit(rate)
        return combined(self.agent_limit, limit)


async def repair_replica(
    root: Cid,
    volume: str,
    store: ObjectStore,
    *,
    scrub: ScrubService,
    holders: Callable[[], Awaitable[list[Holder]]],
    fetch: FetchInto,
    metrics: AgentMetrics,
) -> tuple[str | None, int, FetchResult | None]:
    """``(None, blocks repaired, fetch)`` once the replica on ``volume`` is whole (0 and None:
    it already was), or ``(why, 0, None)`` when it is not and the repair should be retried."""
    scrubber = scrub.scrubbers[volume]
    _, _, damage = await asyncio.to_thread(scrubber.check_root, root)
    if not damage:
        return None, 0, None
    for item in damage:
        if item.problem == "corrupt":  # absent now, so the fetch brings a good copy
            await asyncio.to_thread(store.blocks.delete, item.block)
    found = await holders()
    if not found:
        metrics.repairs.labels("failed").inc()
        return f"no verified holder of {to_str(root)} answers", 0, None
    with scrub.busy(volume), leftovers.journaled(store) as journaled:
        result = await fetch(store, journaled, found)
    metrics.blocks_fetched.inc(result.blocks_fetched)
    metrics.bytes_fetched.inc(result.bytes_fetched)
    _, _, still = await asyncio.to_thread(scrubber.check_root, root)
    if still:
        metrics.repairs.labels("failed").inc()
        return f"{len(still)} block(s) of {to_str(root)} still damaged after repair", 0, None
    metrics.repairs.labels("done").inc()
    return None, len(damage), result


def refresh_damaged_gauge(scrub: ScrubService | None, metrics: AgentMetrics) -> None:
    """Set the damaged-replicas gauge of each volume from its scrub records."""
    if scrub is None:
        return
    for name, scrubber in scrub.scrubbers.items():
        with contextlib.suppress(StoreError):
            metrics.damaged_replicas.labels(name).set(len(scrubber.state.damaged()))


async def sweep_leftovers_forever(volumes: Mapping[str, ObjectStore], every: float) -> None:
    """Every ``every`` seconds, remove the leftover blocks of failed writes on each volume."""
    while True:
        await asyncio.sleep(every)
        for name, store in volumes.items():
            try:
                swept = await asyncio.to_thread(leftovers.sweep, store)
            except StoreError as exc:
                _log.warning("leftover sweep of volume %s: %s", name, exc)
                continue
            if swept.journals:
                _log.info(
                    "volume %s: removed %d leftover block(s) (%d bytes) of %d failed write(s)",
                    name,
                    swept.blocks_removed,
                    swept.bytes_freed,
                    swept.journals,
                )

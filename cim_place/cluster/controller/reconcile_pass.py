"""The reconcile of one object: read from the projection, reconciled, its tasks enqueued.

This module owns :class:`ControllerReconcile`: the input the pure reconciler reads for one object
(its policy, the node map, liveness, tasks in flight and failures),
:meth:`ControllerReconcile.reconcile_one` (enqueue within the rate limits of :class:`_Budget` and
the repair slots, write the status, requeue when a grace or back-off ends) and the per-object
states the summary counts. Which objects are reconciled when (the dirty CIDs, walks of every
object) is :mod:`cim_place.cluster.controller.reconcile_loop`.
"""

from __future__ import annotations

import asyncio
import logging
import time

from cim_place.cluster.controller.config import ControllerConfig, limit_part
from cim_place.cluster.controller.feeds import ControllerFeeds
from cim_place.cluster.controller.projection import ObjectView
from cim_place.cluster.controller.repairs import RepairSlots
from cim_place.cluster.events.types import ObjectDeleted
from cim_place.cluster.state.cid_shards import shard_of
from cim_place.cluster.tasks.model import Task
from cim_place.objectstore.cid import Cid, to_str
from cim_place.placement.demand_reconcile import required_input
from cim_place.placement.reconcile_model import (
    FailedTask,
    InFlightTask,
    ObjectInfo,
    ReconcileInput,
    ReconcileResult,
    is_repair,
)
from cim_place.placement.reconciler import reconcile
from cim_place.placement.rules import CompiledPolicy
from cim_place.placement.status import ObjectStatus
from cim_place.policies.model import Policy
from cim_place.policies.selectors import ObjectFacts, match_policy

__all__ = ["DEGRADED_RETRY", "ControllerReconcile"]

_log = logging.getLogger(__name__)

DEGRADED_RETRY = 5.0
"""Seconds after which a degraded or lost object is reconciled again without any event."""


class ControllerReconcile(ControllerFeeds):
    """The controller's reconcile pass (see :class:`ControllerState`)."""

    # -- reconciling ----------------------------------------------------------------------------

    def _requeue(self, cid: Cid, after: float) -> None:
        asyncio.get_running_loop().call_later(after, self.mark, (cid,))

    def _policy(self, cid: Cid) -> str | None:
        view = self.projection.object(cid)
        return None if view is None else self.policy_for(_facts(cid, view)).name

    def policy_for(self, facts: ObjectFacts) -> CompiledPolicy:
        policies = self.projection.policies.policies
        chosen: Policy = match_policy(policies, facts)[0]
        return self._compiled.get(chosen.name, self._fallback)

    def reconcile_input(
        self,
        cid: Cid,
        now: float,
        *,
        rebalance: bool = False,
        previous: ObjectStatus | None = None,
    ) -> ReconcileInput | None:
        view = self.projection.object(cid)
        if view is None:
            return None
        facts = _facts(cid, view)
        in_flight = [
            InFlightTask(
                kind=task.kind,  # type: ignore[arg-type]
                node=task.node,
                volume=task.volume,
                task_id=task.id,
                since=task.enqueued_at,
            )
            for task in self.projection.tasks_for(cid)
        ]
        failed = []
        for (kind, node, volume), count in self.projection.failures(cid).items():
            last = self.projection.last_failure(cid, (kind, node, volume))
            failed.append(
                FailedTask(
                    kind=kind,  # type: ignore[arg-type]
                    node=node,
                    volume=volume,
                    generation=self.projection.generation(cid, kind, node, volume) - 1,
                    failed_at=last.at if last else now,
                    failures=count,
                    permanent=last.permanent if last else False,
                    reason=last.reason if last else "",
                )
            )
        return ReconcileInput(
            obj=ObjectInfo(
                cid=cid,
                size=view.size,
                first_seen=view.first_seen,
                owner=view.owner,
                name=view.name,
                metadata=view.metadata,
            ),
            policy=self.policy_for(facts),
            node_map=self.node_map(now),
            confirmed=view.replicas,
            damaged=frozenset(self.projection.damaged(cid)),
            verified_at=self.projection.verified_at(cid),
            liveness=self.liveness(now),
            now=now,
            in_flight=in_flight,
            failed=failed,
            generation=view.sequence,
            rebalance=rebalance,
            removed=_removed_note(self.projection.removal(cid)),
            previous=previous,
        )

    async def _forget_status(self, cid: Cid) -> None:
        """Remove the status of a CID the caught-up projection does not track. Its only claims
        were disproved (a forgery an inventory check caught, replayed after a restart): a
        leader that believed them may have written a status showing the copy, then been
        stopped before it wrote the next; nothing else would ever correct it."""
        assert self.locations is not None
        if self.leads(cid) and await self.locations.get(cid) is not None:
            await self.locations.delete(cid)
            self.status_index.remove(to_str(cid))
            _log.info("status of %s removed: no believed event tracks it", to_str(cid))

    async def reconcile_one(self, cid: Cid, *, rebalance: bool = False) -> ReconcileResult | None:
        assert self.locations is not None and self._queue is not None
        started = time.perf_counter()
        # The status last written is read first: from the projection's snapshot below to
        # ``cached.volumes`` nothing may await. ``volumes`` also asks the projection whether a
        # demand task still runs; events let in between would end a fetch whose copy the
        # snapshot does not have yet (taken as failed: its copy then shows as an ordinary
        # surplus replica, fetching, pinned, dropped) or a drop whose copy it still has.
        if cid not in self.projection:
            await self._forget_status(cid)
            return None
        previous = await self.locations.get(cid)
        now = time.time()
        inp = self.reconcile_input(cid, now, rebalance=rebalance, previous=previous)
        if inp is None:
            return None
        # Cached copies and demand tasks are invisible to the reconciler (cached.py).
        cached = self.cached.volumes(cid, inp)
        result = reconcile(required_input(inp, cached))
        # The limits are read only when there is something to issue (in the loop): most
        # reconciles (an event about a placed object) issue nothing.
        postponed = False
        obj = inp.obj
        policy = inp.policy
        for action in result.actions:
            if not self.leads(cid):
                return result  # deposed: not one more task
            # Read for each action: another reconcile may have taken from (or a report may
            # have renewed) the limits while this one awaited its previous enqueue.
            _, budget, slots = self._limits()
            repair = is_repair(action)
            if not budget.allows(action.node, action.kind, obj.size) or (
                repair and not slots.allows(policy)
            ):
                postponed = True
                continue
            task = Task.create(
                action.kind,
                action.node,
                cid,
                generation=action.generation,
                volume=action.volume,
                holders=getattr(action, "holders", ()),
                reason=action.reason,
                created_by=self.identity,
                name=obj.name,
                owner=obj.owner,
                metadata=obj.metadata,
                rate_limit=policy.repair_bandwidth if repair else None,
            )
            if self.projection.task(task.id) is not None:
                continue
            # Counted before the enqueue is awaited, so reconciles running meanwhile see it
            # against the limits; withdrawn if the hub did not take it.
            before = self.projection.task_changes
            self.projection.task_enqueued(task, now, repair_policy=policy.name if repair else None)
            if repair:
                slots.take(policy)
            budget.take(action.node, action.kind, obj.size)
            if self._budget_cache == (before, budget, slots):
                self._budget_cache = (before + 1, budget, slots)  # this task, counted by take
            try:
                await self._queue.enqueue(task)
            except BaseException:
                self.projection.task_withdrawn(task.id)  # the limits are recounted next time
                raise
            self.metrics.tasks_queued.labels(action.kind).inc()
        if self.leads(cid) and not result.gone:
            await self.cached.act(self._queue, cid, inp, result, now, lambda: self.leads(cid))
            result = self.cached.status(cid, result, inp.node_map)
        if result.gone:
            # Expired and every copy dropped: it leaves the listing and the projection.
            if self.leads(cid):
                await self.locations.delete(cid)
            slot = self.projection.slot(cid)
            if slot is not None:
                self.object_states.clear(slot)
            self.projection.forget(cid)
            self.status_index.remove(result.status.cid)
            self._under.discard(cid)
            self.reconciled += 1
            return result
        if self.leads(cid):
            await self._write_status(cid, result.status)
        self._note_state(cid, result)
        if result.status.state != "removed" and result.status.pinned < inp.policy.min_copies:
            self._below_min.add(cid)
        else:
            self._below_min.discard(cid)
        self.reconciled += 1
        self.metrics.reconcile_seconds.observe(time.perf_counter() - started)
        self.metrics.tasks_in_flight.set(self.projection.tasks_in_flight)
        if postponed:
            self._requeue(cid, 1.0)
        elif result.requeue_after is not None:
            self._requeue(cid, max(0.05, result.requeue_after))
        elif result.status.state in ("degraded", "lost"):
            # Level-triggered: what kept it short (a node not yet placeable, a heartbeat not yet
            # seen) may pass without any event about this object; look again soon, not at the
            # next full pass.
            self._requeue(cid, DEGRADED_RETRY)
        return result

    def _budget(self) -> _Budget:
        return self._limits()[1]

    def _limits(self) -> tuple[int, _Budget, RepairSlots]:
        # The walk over every task in flight made a backlog's ingest quadratic; the budget and
        # repair slots are reused until a task starts or ends other than through their own
        # ``take`` (reconcile_one).
        cached = self._budget_cache
        if cached is not None and cached[0] == self.projection.task_changes:
            return cached
        part = self._shards_led()
        budget = _Budget(self.config, part)
        for task in self.projection.in_flight():
            budget.take(task.node, task.kind, self.projection.size(task.root))
        slots = RepairSlots(self.projection.in_flight(), part)
        self._budget_cache = (self.projection.task_changes, budget, slots)
        return self._budget_cache

    async def _write_status(self, cid: Cid, status: ObjectStatus) -> None:
        """Write ``status`` to KV unless it is what this process last wrote for ``cid``."""
        assert self.locations is not None
        written = status.fingerprint() or 1  # 0 marks "nothing written"
        slot = self.projection.slot(cid)
        if slot is not None and self.object_states.written(slot) == written:
            return
        await self.locations.write(status.cid, status.encode())
        slot = self.projection.slot(cid)  # looked up again: the write awaited
        if slot is not None:
            self.object_states.set_written(slot, written)

    def _note_state(self, cid: Cid, result: ReconcileResult) -> None:
        slot = self.projection.slot(cid)
        if slot is not None:
            shard = shard_of(cid, self.config.shards) if self.sharding is not None else 0
            self.object_states.note(slot, result.status.state, shard)
        self.status_index.update(result.status)
        if result.status.state != "removed" and result.status.pinned < result.status.desired:
            self._under.add(cid)
        else:
            self._under.discard(cid)


class _Budget:
    """Tasks in flight per node and in the domain, and bytes of fetches per node: what the
    rate limits of :class:`ControllerConfig` allow next (this process's ``part`` of them:
    :func:`~cim_place.cluster.controller.config.limit_part`)."""

    def __init__(self, config: ControllerConfig, part: tuple[int, int] = (1, 1)) -> None:
        self.max_tasks = limit_part(config.max_tasks, *part)
        self.max_tasks_per_node = limit_part(config.max_tasks_per_node, *part)
        self.max_bytes_per_node = limit_part(config.max_bytes_per_node, *part)
        self.tasks: dict[str, int] = {}
        self.fetch_bytes: dict[str, int] = {}
        self.total = 0

    def allows(self, node: str, kind: str, size: int) -> bool:
        if self.total >= self.max_tasks:
            return False
        if self.tasks.get(node, 0) >= self.max_tasks_per_node:
            return False
        pending = self.fetch_bytes.get(node, 0)
        return kind != "fetch" or pending == 0 or pending + size <= self.max_bytes_per_node

    def take(self, node: str, kind: str, size: int) -> None:
        self.total += 1
        self.tasks[node] = self.tasks.get(node, 0) + 1
        if kind == "fetch":
            self.fetch_bytes[node] = self.fetch_bytes.get(node, 0) + size


def _facts(cid: Cid, view: ObjectView) -> ObjectFacts:
    """What a policy's selectors see of an object (the same in reconcile and rebalance)."""
    return ObjectFacts(
        cid=to_str(cid), name=view.name, owner=view.owner, metadata=view.metadata, size=view.size
    )


def _removed_note(tombstone: ObjectDeleted | None) -> str | None:
    if tombstone is None:
        return None
    why = f" ({tombstone.reason})" if tombstone.reason else ""
    return f"removed by {tombstone.by or 'an operator'}{why}"

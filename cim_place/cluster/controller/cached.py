"""The controller's cached copies: which replicas demand added and why, and the tasks for them.

The pure decision is :func:`cim_place.placement.demand.decide`; this module is its I/O side
(docs/DEMAND.md):

1. **What is cached.** A side table beside the projection: the :class:`CacheLedger` of
   confirmed cached copies (volume, size, last read, cause) and the demand tasks in flight. A
   copy enters the ledger when the projection shows its replica (the agent's ``ObjectStored``),
   and leaves when the replica is gone. The status written for an object lists its cached
   copies with their cause, so a controller that starts again finds them there (on the first
   reconcile of each object) instead of mistaking them for required copies.
2. **Keeping them out of the reconciler's way.** :meth:`CachedCopies.volumes` is every volume
   a cached copy or a demand task occupies; the controller reconciles on
   ``required_input(inp, volumes)``, so a cached copy is never counted towards ``min``, never
   kept as a required copy (the planner is never given it as ``current``) and never dropped as
   surplus by the reconciler.
3. **Deciding.** After each reconcile of an object, :meth:`CachedCopies.act` runs ``decide``
   with the planner's desired volumes and the object's reads over its policy's window, and
   enqueues a ``fetch`` per copy to add and a ``drop`` per copy to drop (generations offset by
   :data:`DEMAND_GENERATION`, so their ids never meet the reconciler's). Copies are added only
   to a ``placed`` object (never while its required copies are being made); drops happen in
   any state.
4. **When.** A demand report marks the objects it names that were read ``min_reads`` times at
   some node, or that hold cached copies; :meth:`CachedCopies.sweep` (every few seconds) marks
   every object with cached copies or demand tasks, so a copy unread for ``keep`` is dropped.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal

from cim_place.cluster.controller.demand import (
    DEFAULT_HORIZON,
    DEFAULT_SLOT,
    window_shape,
)
from cim_place.cluster.controller.metrics import ControllerMetrics
from cim_place.cluster.controller.projection import Projection
from cim_place.cluster.tasks.model import Task
from cim_place.cluster.tasks.queue import TaskQueue
from cim_place.objectstore.cid import Cid
from cim_place.placement.demand import DemandContext, DemandRule, decide, describe
from cim_place.placement.demand_cache import (
    CachedCopy,
    CacheDrop,
    CacheLedger,
    CopyKey,
    DemandDecision,
)
from cim_place.placement.demand_reconcile import with_cached
from cim_place.placement.demand_window import DemandReport, DemandWindow
from cim_place.placement.model import NodeMap, VolumeId
from cim_place.placement.reconcile_model import ReconcileInput, ReconcileResult
from cim_place.placement.status import Location
from cim_place.policies.model import PolicySet

__all__ = ["DEMAND_GENERATION", "CachedCopies"]

_log = logging.getLogger(__name__)

_MAX_EXPLAINED = 10_000
"""Last decisions kept for explain (objects with cached copies or unmet demand)."""

DEMAND_GENERATION = 1 << 48
"""Added to an object's event sequence for the generation of a demand task: the reconciler's
generations stay far below, so the two never derive the same task id."""


@dataclass(frozen=True, slots=True)
class _Pending:
    task_id: str
    kind: Literal["fetch", "drop"]
    copy: CachedCopy
    reason: str = ""


class CachedCopies:
    """The cached copies of the domain and the demand tasks in flight (module docstring)."""

    def __init__(
        self,
        projection: Projection,
        metrics: ControllerMetrics,
        mark: Callable[[Iterable[Cid]], None],
        *,
        identity: str = "",
        max_fetches_per_node: int = 16,
    ) -> None:
        self.projection = projection
        self.metrics = metrics
        self.mark = mark
        self.identity = identity
        self.max_fetches_per_node = max_fetches_per_node
        self.ledger = CacheLedger()
        self.pending: dict[CopyKey, _Pending] = {}
        self.rules: dict[str, DemandRule] = {}
        self.window = DemandWindow(horizon=DEFAULT_HORIZON, slot=DEFAULT_SLOT)
        self.last_decision: dict[Cid, DemandDecision] = {}
        self._contexts: dict[str, tuple[NodeMap, DemandContext]] = {}

    # -- policies and reports ----------------------------------------------------------------

    def set_policies(self, policies: PolicySet) -> bool:
        """Take the applied policies' ``demand:`` rules; True when the window was replaced
        (its shape changed: the reads counted so far are forgotten, which only delays copies)."""
        self.rules = {p.name: DemandRule.of(p.demand) for p in policies.policies if p.demand}
        self._contexts.clear()
        horizon, slot = window_shape(self.rules.values())
        if (horizon, slot) == (self.window.horizon, self.window.slot):
            return False
        self.window = DemandWindow(horizon=horizon, slot=slot)
        return True

    def on_report(self, report: DemandReport) -> None:
        """After a report was folded into the window: mark the objects worth a decision."""
        self.metrics.demand_reports.inc()
        local = report.local_bytes
        remote = report.remote_bytes
        if local:
            self.metrics.read_bytes.labels(report.reporter, "local").inc(local)
        if remote:
            self.metrics.read_bytes.labels(report.reporter, "remote").inc(remote)
        self.metrics.demand_reads.inc(sum(c.reads for c in report.counts))
        if not self.rules:
            return
        least = min(r.min_reads for r in self.rules.values())
        due = []
        for count in report.counts:
            cid = count.cid
            if self.ledger.of_object(cid):
                due.append(cid)  # its last read moves (the window may be shorter than keep)
            elif (
                cid in self.projection
                and self.window.reads_at(cid, count.node) >= least
                # Reads where a copy already is earn nothing.
                and all(node != count.node for node, _ in self.projection.replicas(cid))
            ):
                due.append(cid)
        if due:
            self.mark(due)

    def sweep(self) -> None:
        """Mark every object holding cached copies or demand tasks (``keep`` runs out)."""
        self.mark(self.ledger.objects() | {key[0] for key in self.pending})

    async def sweep_loop(
        self, every: Callable[[], float], also: Callable[[], None] | None = None
    ) -> None:
        # Looks every second whether a sweep is due: the period follows the policies applied
        # (none at start), so sleeping a whole period computed earlier could wait too long.
        last = time.monotonic()
        while True:
            await asyncio.sleep(1.0)
            if time.monotonic() - last >= every():
                last = time.monotonic()
                self.sweep()
                if also is not None:
                    try:
                        also()
                    except Exception:  # a bug must not stop the sweeps
                        _log.exception("after the demand sweep")

    def sweep_every(self) -> float:
        """A quarter of the shortest ``keep``, between 1 s and 60 s (10 s without demand rules:
        the service consumers are looked at on the same beat)."""
        if not self.rules:
            return 10.0
        return min(60.0, max(1.0, min(r.keep for r in self.rules.values()) / 4))

    # -- the reconciler's side ---------------------------------------------------------------

    def volumes(self, cid: Cid, inp: ReconcileInput) -> frozenset[VolumeId]:
        """Every volume of ``cid`` that a cached copy or a demand task occupies, after bringing
        the ledger up to date with the confirmed replicas. The status last written names the
        cached copies: one still a replica but not in the ledger was made by a previous
        controller (a copy leaves the ledger only once its replica is gone, or when adopted,
        and the status written then no longer lists it). A removed or expired object has none:
        the reconciler then drops every copy, cached ones included."""
        policy = inp.policy
        if inp.removed is not None or (
            policy.expire_after is not None and inp.now - inp.obj.first_seen > policy.expire_after
        ):
            for copy in self.ledger.of_object(cid):
                self._gone(cid, copy.volume, "removed")
            for key in [k for k in self.pending if k[0] == cid]:
                del self.pending[key]
            return frozenset()
        replicas = inp.confirmed
        previous_locations = inp.previous.locations if inp.previous is not None else ()
        present = {f"{node}/{volume}" for node, volume in replicas}
        self._recover(cid, present, previous_locations)
        # A task still runs when ``inp`` says so, or the projection (a task enqueued since
        # ``inp`` was taken). Asking the projection alone would mix two moments: a fetch that
        # ended after ``inp`` was taken, its copy not in ``inp.confirmed``, would look failed,
        # and its copy then be an ordinary replica to the reconciler (surplus, dropped).
        running_in_inp = {t.task_id for t in inp.in_flight}
        for volume in {v for c, v in self.pending if c == cid}:
            pending = self.pending[(cid, volume)]
            running = (
                pending.task_id in running_in_inp
                or self.projection.task(pending.task_id) is not None
            )
            if pending.kind == "fetch":
                if volume in present:
                    del self.pending[(cid, volume)]
                    self.ledger.put(pending.copy)
                    self.metrics.cached_added.inc()
                    _log.info(
                        "cached copy of %s on %s: %s", cid.hex()[:16], volume, pending.copy.cause
                    )
                elif not running:
                    del self.pending[(cid, volume)]  # failed or forgotten: decided again later
            elif volume not in present:
                del self.pending[(cid, volume)]
                self._gone(cid, volume, pending.reason or "dropped")
            elif not running:
                del self.pending[(cid, volume)]  # the drop failed: the copy stays cached
        for copy in self.ledger.of_object(cid):
            if copy.volume not in present and (cid, copy.volume) not in self.pending:
                self._gone(cid, copy.volume, "lost")
        self._gauges()
        return self.occupied(cid)

    def occupied(self, cid: Cid) -> frozenset[VolumeId]:
        """The volumes of ``cid``'s cached copies and demand tasks, as last brought up to date."""
        return frozenset({c.volume for c in self.ledger.of_object(cid)}) | {
            v for c, v in self.pending if c == cid
        }

    def _recover(self, cid: Cid, present: set[str], rows: Iterable[Location]) -> None:
        size = self.projection.size(cid)
        now = time.time()
        for row in rows:
            volume = f"{row.node}/{row.volume}"
            if row.state == "cached" and volume in present and not self.ledger.get(cid, volume):
                # The last read is not in the status: count it from now, so it lasts ``keep``.
                self.ledger.put(CachedCopy(cid, volume, size, now, row.cause))

    def _gone(self, cid: Cid, volume: VolumeId, reason: str) -> None:
        if self.ledger.get(cid, volume) is not None:
            self.ledger.remove(cid, volume)
            self.metrics.cached_dropped.labels(_reason_label(reason)).inc()
            _log.info("cached copy of %s on %s gone: %s", cid.hex()[:16], volume, reason)

    def _gauges(self) -> None:
        self.metrics.cached_copies.set(len(self.ledger))
        self.metrics.cached_bytes.set(self.ledger.total())

    def status(self, cid: Cid, result: ReconcileResult, node_map: NodeMap) -> ReconcileResult:
        """``result`` with the object's cached copies in its status (state ``cached``)."""
        return with_cached(result, self.ledger.of_object(cid), node_map)

    # -- deciding and acting ------------------------------------------------------------------

    def decide(
        self, cid: Cid, inp: ReconcileInput, result: ReconcileResult, now: float
    ) -> DemandDecision | None:
        """The demand decision for ``cid`` after its reconcile (None: nothing to decide)."""
        rule = self.rules.get(inp.policy.name)
        copies = self.ledger.of_object(cid)
        if rule is None or result.status.state in ("removed", "expired"):
            if not copies:
                return None
            why = "the object is removed or expired" if rule else "its policy has no demand"
            return DemandDecision(drop=tuple(_drop(c, why) for c in copies))
        known = self._contexts.get(inp.policy.name)
        if known is None or known[0] is not inp.node_map:
            context = DemandContext.of(rule, inp.policy.rule, inp.node_map)
            self._contexts[inp.policy.name] = (inp.node_map, context)
        else:
            context = known[1]
        reads = self.window.by_node(cid, now, rule.window)
        if not reads and not copies:
            return None
        decision = decide(
            cid=cid,
            size=inp.obj.size,
            rule=rule,
            placement_rule=inp.policy.rule,
            node_map=inp.node_map,
            required=result.desired,
            reads=reads,
            ledger=self.ledger,
            now=now,
            context=context,
        )
        if result.status.state != "placed" and decision.add:
            # Required copies first: no cache fill while the policy's copies are being made.
            decision = DemandDecision(
                drop=decision.drop,
                refresh=decision.refresh,
                adopted=decision.adopted,
                skipped=(
                    *decision.skipped,
                    *(f"{a.locus}: waits for placed" for a in decision.add),
                ),
            )
        # Kept for explain while there is something to say; bounded, oldest first out.
        if decision.add or decision.drop or decision.refresh or decision.skipped:
            self.last_decision.pop(cid, None)
            self.last_decision[cid] = decision
            if len(self.last_decision) > _MAX_EXPLAINED:
                del self.last_decision[next(iter(self.last_decision))]
        else:
            self.last_decision.pop(cid, None)
        return decision

    async def act(
        self,
        queue: TaskQueue,
        cid: Cid,
        inp: ReconcileInput,
        result: ReconcileResult,
        now: float,
        acting: Callable[[], bool],
    ) -> int:
        """Decide for ``cid`` and enqueue its demand tasks; the number enqueued."""
        decision = self.decide(cid, inp, result, now)
        if decision is None:
            return 0
        if decision.add or decision.drop:
            self.metrics.demand_decisions.inc()
        for copy in decision.adopted:
            self.ledger.remove(copy.cid, copy.volume)
        for copy in decision.refresh:
            if self.ledger.get(copy.cid, copy.volume) not in (None, copy):
                self.ledger.put(copy)
        holders = tuple(sorted({node for node, _ in inp.confirmed}))
        queued = 0
        for drop in decision.drop:
            held = self.ledger.get(drop.cid, drop.volume)
            if held is None or (drop.cid, drop.volume) in self.pending or not acting():
                continue
            node, volume = drop.volume.split("/", 1)
            task = Task.create(
                "drop",
                node,
                drop.cid,
                generation=DEMAND_GENERATION + self._sequence(drop.cid),
                volume=volume,
                reason=f"cached copy: {drop.reason}",
                created_by=self.identity,
            )
            pending = _Pending(task.id, "drop", held, drop.reason)
            if await self._enqueue(queue, task, now, (drop.cid, drop.volume), pending):
                queued += 1
        for add in decision.add:
            node, volume = add.volume.split("/", 1)
            if (cid, add.volume) in self.pending or not holders or not acting():
                continue
            # Counted for each: reconciles of other CIDs add theirs while this one awaits.
            fetching = sum(
                1 for p in self.pending.values() if p.kind == "fetch" and p.copy.node == node
            )
            if fetching >= self.max_fetches_per_node:
                continue
            task = Task.create(
                "fetch",
                node,
                cid,
                generation=DEMAND_GENERATION + inp.generation,
                volume=volume,
                holders=holders,
                reason=f"cached copy: {add.cause}",
                created_by=self.identity,
                name=inp.obj.name,
                owner=inp.obj.owner,
                metadata=inp.obj.metadata,
            )
            copy = CachedCopy(cid, add.volume, add.size, add.last_read, add.cause)
            if await self._enqueue(
                queue, task, now, (cid, add.volume), _Pending(task.id, "fetch", copy)
            ):
                queued += 1
        return queued

    async def _enqueue(
        self, queue: TaskQueue, task: Task, now: float, key: tuple[Cid, str], pending: _Pending
    ) -> bool:
        if self.projection.task(task.id) is not None:
            return False
        # Recorded before the enqueue is awaited, so reconciles running meanwhile count it;
        # withdrawn if the hub did not take it.
        self.projection.task_enqueued(task, now)
        self.pending[key] = pending
        try:
            await queue.enqueue(task)
        except BaseException:
            self.projection.task_withdrawn(task.id)
            self.pending.pop(key, None)
            raise
        return True

    def _sequence(self, cid: Cid) -> int:
        view = self.projection.object(cid)
        return view.sequence if view is not None else 0

    def explain(self, cid: Cid, policy: str, now: float) -> list[str]:
        """What ``policy explain`` says of ``cid``'s cached copies: the last decision about it
        under ``policy`` (its cached copies alone when none was taken by this controller)."""
        decision = self.last_decision.get(cid)
        rule = self.rules.get(policy)
        if decision is None or rule is None:
            return [
                f"cached on {c.volume}: {c.cause or 'demand'}" for c in self.ledger.of_object(cid)
            ]
        return describe(decision, rule, now)


def _drop(copy: CachedCopy, reason: str) -> CacheDrop:
    return CacheDrop(copy.cid, copy.volume, reason)


def _reason_label(reason: str) -> str:
    """A bounded label for why a cached copy went (the reasons themselves name volumes)."""
    for prefix, label in (
        ("no reads", "unread"),
        ("evicted", "evicted"),
        ("more than max_extra", "max_extra"),
        ("lost", "lost"),
        ("removed", "removed"),
    ):
        if reason.startswith(prefix):
            return label
    return "other"

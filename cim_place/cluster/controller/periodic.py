"""The controller's periodic work: the full pass, rebalancing, the summary and its warnings.

This module owns :class:`ControllerPeriodic`: the full pass (every CID marked, lost tasks
forgotten, a bounded number of rebalance moves, name versions expired), the summary written
every second (per shard with shards; less often when computing it takes more than
:data:`SUMMARY_SHARE` of that, at millions of objects) with its metrics, and the topology
warnings it carries.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import nats.errors
import nats.js.errors

from cim_place.cluster.controller.reconcile_loop import ControllerLoop
from cim_place.cluster.controller.reconcile_pass import _facts
from cim_place.cluster.controller.removal import expire_name_versions
from cim_place.cluster.controller.shards import shard_summaries, write_shard_summaries
from cim_place.errors import CimPlaceError
from cim_place.objectstore.cid import Cid
from cim_place.placement.eligibility import Eligibility
from cim_place.placement.model import NodeMap, PlacedObject
from cim_place.placement.reconciler import rebalance_candidates
from cim_place.placement.rules import Liveness
from cim_place.placement.status import Summary
from cim_place.placement.topology import topology_warnings
from cim_place.policies.model import BUILTIN_DEFAULT

__all__ = ["REBALANCE_CHUNK", "SUMMARY_SHARE", "ControllerPeriodic", "summary_wait"]

REBALANCE_CHUNK = 256
"""Objects a rebalance scan looks at between two yields to the event loop."""
SUMMARY_SHARE = 0.05
"""The most of the event loop the summary's computation takes. It is a few passes over a column
of every object (states, shards, sizes): at 10M objects and two led shards about 0.2 s here, which
once a second held the loop a fifth of the time; spaced to this share, it runs every 4 s."""


def summary_wait(every: float, took: float) -> float:
    """Seconds until the next summary: ``every`` (``summary_every``), or longer when the last
    one's computation (``took`` seconds, the loop held) came to more than
    :data:`SUMMARY_SHARE` of that."""
    return max(every, took / SUMMARY_SHARE)


_log = logging.getLogger(__name__)


class ControllerPeriodic(ControllerLoop):
    """The controller's full pass and summary (see :class:`ControllerState`)."""

    # -- periodic work --------------------------------------------------------------------------

    async def full_pass(self) -> None:
        """Mark everything (when a walk is due: :meth:`walk_wanted`), forget lost tasks, start
        a bounded number of rebalance moves."""
        now = time.time()
        self.mark(self.projection.expire_tasks(now - self.config.task_timeout))
        if self.walk_wanted(time.monotonic()):
            self.mark_all()
        if self._acting and self.caught_up.is_set():
            await self.rebalance(now)
            policies = self.projection.policies.policies
            # Listing every name costs a scan of the names bucket: only when a policy asks.
            if (
                self._leads_chores()
                and self.js
                and self.removals
                and any(p.keep_versions for p in policies)
            ):
                with contextlib.suppress(CimPlaceError, nats.errors.Error):
                    await expire_name_versions(self.js, self.removals.keep_versions)

    async def rebalance(self, now: float) -> int:
        """Start at most ``rebalance_per_pass`` moves toward the ideal placement, looking at
        about ``rebalance_scan_per_pass`` objects from where the last pass stopped.

        A rebalance check plans each object twice (its ideal, and what the planner keeps), so
        a scan of every object at every full pass held the event loop for seconds per 50,000
        objects (lease renewals and events waited) and listed every CID at once. A bounded scan
        a chunk at a time, yielding between chunks, costs the same every pass at any size; a
        domain's whole balance is checked once every ``objects / rebalance_scan_per_pass``
        full passes (docs/SCALE.md).
        """
        limit = self.config.rebalance_per_pass
        budget = self.config.rebalance_scan_per_pass
        started = scanned = 0
        size = max(1, min(REBALANCE_CHUNK, budget))
        rules: dict[str, Eligibility] = {}  # by policy, for this pass's node map
        for after, chunk in self.projection.cid_chunks(size, start=self._rebalance_cursor):
            if scanned >= budget or started >= limit or not self._acting:
                break
            moves = self._rebalance_moves(chunk, self.node_map(now), limit - started, rules)
            for cid in moves:
                await self.reconcile_one(cid, rebalance=True)
            started += len(moves)
            scanned += len(chunk)
            self.metrics.rebalance_scanned.inc(len(chunk))
            if started < limit:
                # A chunk cut short by the limit is looked at again from its start next pass
                # (the objects moved are skipped then: they have tasks in flight).
                self._rebalance_cursor = after
            await asyncio.sleep(0)  # events, lease renewals and status queries between chunks
        return started

    def _rebalance_moves(
        self, cids: list[Cid], node_map: NodeMap, limit: int, rules: dict[str, Eligibility]
    ) -> list[Cid]:
        """Up to ``limit`` of ``cids`` whose ideal placement differs from what is kept
        (``rules``: each policy's eligibility on ``node_map``, filled as policies are met)."""
        by_policy: dict[str, list[tuple[PlacedObject, frozenset[str]]]] = {}
        for cid in cids:
            view = self.projection.object(cid)
            if view is None or self.projection.tasks_for(cid) or not self.leads(cid):
                continue
            policy = self.policy_for(_facts(cid, view))
            volumes = frozenset(f"{node}/{volume}" for node, volume in view.replicas)
            volumes -= self.cached.occupied(cid)
            by_policy.setdefault(policy.name, []).append((PlacedObject(cid, view.size), volumes))
        moves: list[Cid] = []
        for name, objects in by_policy.items():
            if len(moves) >= limit:
                break
            rule = self._compiled.get(name, self._fallback).rule
            known = rules.get(name)
            if known is None or known.node_map is not node_map or known.rule is not rule:
                rules[name] = Eligibility.of(rule, node_map)
            found = rebalance_candidates(
                objects, rule, node_map, limit=limit - len(moves), eligibility=rules[name]
            )
            moves.extend(placed.cid for placed in found)
        return moves

    async def _summary_loop(self) -> None:
        wait = self.config.summary_every
        while True:
            await asyncio.sleep(wait)
            if not self._acting or self.locations is None:
                continue
            started = time.perf_counter()
            try:
                if self.sharding is not None:
                    by_shard = self._shard_summaries()
                    took = time.perf_counter() - started
                    await write_shard_summaries(
                        self.locations.bucket, by_shard, self.sharding.shards
                    )
                else:
                    summary = self.summary()
                    took = time.perf_counter() - started
                    await self.locations.put_summary(summary)
            except Exception as exc:
                took = time.perf_counter() - started
                _log.debug("writing the summary: %s", exc or type(exc).__name__)
            wait = summary_wait(self.config.summary_every, took)

    def _shard_summaries(self) -> dict[int, Summary]:
        assert self.sharding is not None
        return shard_summaries(
            self.summary(),
            self.object_states,
            self._under,
            self.projection.sizes_at,
            self.sharding.shards,
            self.sharding.led,
        )

    def summary(self) -> Summary:
        counts = self.object_states.counts()
        for state, count in counts.items():
            self.metrics.objects.labels(state).set(count)
        self.metrics.under_replicated.set(len(self._under))
        self.metrics.below_min.set(len(self._below_min))
        self.metrics.damaged_replicas.set(self.projection.damaged_replicas)
        total = self.projection.total_size
        liveness = self._liveness
        up = sum(1 for state in liveness.values() if state.state == Liveness.UP)
        late = sum(1 for state in liveness.values() if state.state == Liveness.LATE)
        for state, count in (
            ("up", up),
            ("late", late),
            ("down", len(liveness) - up - late),
            ("draining", len(self.projection.draining)),
        ):
            self.metrics.nodes.labels(state).set(count)
        return Summary(
            objects=len(self.projection),
            by_state=counts,
            under_replicated=len(self._under),
            total_bytes=total,
            nodes_up=up,
            nodes_down=len(liveness) - up,
            nodes_draining=len(self.projection.draining),
            updated_at=time.time(),
            damaged_replicas=self.projection.damaged_replicas,
            rejected_events=self.rejections.total,
            warnings=self._topology_warnings(),
        )

    def _topology_warnings(self) -> tuple[str, ...]:
        """Policies in use that the node map cannot satisfy (the built-in default only when no
        applied policy is a default); recomputed only when the map or the policies change."""
        if not self._last_records:
            return ()
        policies = dict(self._compiled)
        if any(p.match is None for p in self.projection.policies.policies):
            policies.pop(BUILTIN_DEFAULT.name, None)
        node_map = self.node_map(time.time())
        cached_map, cached_policies, warnings = self._warned
        if cached_map is not node_map or cached_policies != policies:
            warnings = tuple(topology_warnings(policies.values(), node_map))
            self._warned = (node_map, policies, warnings)
        return warnings

"""What the controller reads: events, policies, node heartbeats, drain flags, node liveness.

This module owns :class:`ControllerFeeds`: the projection's event feed (with the drift check of
each inventory digest), the watches of the applied policy set, of the nodes bucket and of the
drain flags (KV ``cim-place-drain``; :func:`set_drain` and :func:`draining_nodes` for the CLI),
and node liveness (late, down, departed) with the node map the planner reads. Each input marks
the CIDs it concerns (:meth:`~cim_place.cluster.controller.controller_state.ControllerState.mark`);
the reconcile loop that follows is :mod:`cim_place.cluster.controller.reconcile_loop`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import nats.errors
import nats.js.errors
from nats.js.client import JetStreamContext

from cim_place.cluster.controller.controller_state import ControllerState
from cim_place.cluster.controller.drift import reconcile_drift
from cim_place.cluster.events.feed import EventFeed
from cim_place.cluster.events.readers import StoredEvent
from cim_place.cluster.events.types import (
    EVENT_TYPES,
    InventoryDigest,
    ObjectDeleted,
    TaskCompleted,
    TaskFailed,
)
from cim_place.cluster.events.validate import check_source
from cim_place.cluster.nats import kv
from cim_place.cluster.nats.envelope import Envelope
from cim_place.cluster.nats.kv_listing import live_keys
from cim_place.cluster.state.nodes import NodeRecord, list_nodes
from cim_place.cluster.state.policies import watch_policies
from cim_place.errors import PolicyError
from cim_place.placement.model import NodeMap
from cim_place.placement.rules import (
    CompiledPolicy,
    NodeLiveness,
    compile_policy,
    liveness_from,
    node_map_from,
)
from cim_place.policies.model import BUILTIN_DEFAULT, PolicySet

__all__ = ["DRAIN_PREFIX", "ControllerFeeds", "draining_nodes", "set_drain"]

_log = logging.getLogger(__name__)

DRAIN_PREFIX = "drain."


class ControllerFeeds(ControllerState):
    """The controller's inputs and node liveness (see :class:`ControllerState`)."""

    # -- inputs ---------------------------------------------------------------------------------

    async def _read_events(self) -> None:
        assert self.js is not None
        # The projection's reader: the hub pushes the whole history, then each new event as it
        # is stored (an ordered push consumer; a pull per batch held the ingest to a third of
        # the publish rate, bench/converge.py). The feed recreates its consumer after a gap or
        # a hub restart by itself; only opening it is retried here.
        feed = EventFeed(
            self.js,
            self._apply_stored,
            start_sequence=self.projection.last_sequence + 1,  # after the snapshot, if any
            # The event types the projection applies: application events share the store.
            filter_subject=[
                # Tombstones only from the hub domain's token, which the leading controller
                # alone may publish (removal.py): a node's ObjectDeleted is never read.
                self.subjects.event(self.config.hub_domain, t)
                if t == ObjectDeleted.TYPE
                else self.subjects.events_of_type(t)
                for t in EVENT_TYPES
            ],
            subjects=self.subjects,
        )
        while True:
            try:
                await feed.start()
                break
            except Exception as exc:
                # The projection is the controller's whole view: keep trying until the hub answers.
                _log.warning("opening the event feed: %s; retrying", exc or type(exc).__name__)
                await asyncio.sleep(1.0)
        try:
            await feed.caught_up.wait()
            self.caught_up.set()
            if self.inventory is not None:
                self.inventory.due_all(self.projection.inventoried())
            await asyncio.Event().wait()  # delivery goes on in the feed until cancelled
        finally:
            await feed.stop()

    def _apply_stored(self, stored: StoredEvent) -> None:
        envelope = stored.envelope
        wrong = check_source(stored.node, stored.source)
        if wrong is not None:
            self.rejections.event(wrong, stored.node, envelope.content.type)
            return
        if self.inventory is not None:
            disproved = self.inventory.disproved_root(stored)
            if disproved is not None:
                # A claim an inventory check disproved (a forgery, replayed): not applied, but
                # its object is reconciled, to remove a status that still shows the copy.
                self.mark((disproved,))
                return
        dirty = self.projection.apply_event(envelope, node=stored.node, at=stored.stored_at)
        if dirty:
            self.mark(dirty)
        kind = envelope.content.type
        if kind == InventoryDigest.TYPE:
            self._check_drift(stored.node or envelope.owner, envelope)
        if kind == InventoryDigest.TYPE and self.caught_up.is_set() and self.inventory is not None:
            volume = envelope.content.body.get("volume")
            if isinstance(volume, str):
                self.inventory.due(stored.node, volume)
        if kind == TaskCompleted.TYPE:
            result = envelope.content.body.get("result")
            if isinstance(result, dict):
                moved = result.get("bytes_fetched")
                if isinstance(moved, int):
                    self.metrics.bytes_moved.inc(moved)
        elif kind == TaskFailed.TYPE:
            self.metrics.tasks_failed.inc()

    def _check_drift(self, node: str, envelope: Envelope) -> None:
        """A digest that disagrees with the projection: reconcile that volume (once at a time)."""
        volume = envelope.content.body.get("volume")
        if not isinstance(volume, str) or not self._leads_chores() or not self.caught_up.is_set():
            return
        if not self.projection.drift(node, volume) or (node, volume) in self._drifting:
            return
        self._drifting.add((node, volume))
        task = asyncio.create_task(self._reconcile_drift(node, volume))
        self._drift_tasks.add(task)
        task.add_done_callback(self._drift_tasks.discard)

    async def _reconcile_drift(self, node: str, volume: str) -> None:
        try:
            assert self.nc is not None
            projected = self.projection.cids_on(node, volume)
            differ = await reconcile_drift(self.nc, node, volume, projected, self.subjects)
            self.metrics.drift_reconciled.inc(differ)
            _log.info("inventory drift of %s/%s: %d root(s) re-announced", node, volume, differ)
        except Exception as exc:
            _log.warning("inventory drift of %s/%s not reconciled: %s", node, volume, exc)
        finally:
            self._drifting.discard((node, volume))

    async def _watch_policies(self) -> None:
        assert self.js is not None
        while True:
            try:
                async for stored in watch_policies(self.js):
                    self._set_policies(stored.policy_set)
            except Exception as exc:
                _log.warning("watching policies: %s; retrying", exc or type(exc).__name__)
            await asyncio.sleep(1.0)

    def _set_policies(self, policies: PolicySet) -> None:
        if self.cached.set_policies(policies) and self.demand is not None:
            self.demand.window = self.cached.window
        now = time.time()
        # Consumers declared by service are where their reads come from (located.py).
        consumers = self.located.consumers(policies, self.demand_window, self.node_map(now), now)
        compiled: dict[str, CompiledPolicy] = {}
        for policy in (*policies.policies, BUILTIN_DEFAULT):
            try:
                compiled[policy.name] = compile_policy(policy, consumers)
            except PolicyError as exc:
                _log.error("policy %s cannot be used: %s", policy.name, exc)
        self._compiled = compiled
        if self.projection.set_policies(policies):
            self.mark_all()

    def _relocate_consumers(self) -> None:
        """A service consumer that moved: compile again and look at every object."""
        policies, now = self.projection.policies, time.time()
        if self.located.moved(policies, self.demand_window, self.node_map(now), now):
            self._set_policies(policies)
            self.mark_all()

    async def _watch_nodes(self) -> None:
        # Heartbeats change every few seconds; polling the bucket costs one keys() + gets and
        # keeps the last record of nodes that expired, which the reconciler needs.
        assert self.js is not None
        while True:
            await asyncio.sleep(1.0)
            try:
                self._sync_nodes(await list_nodes(self.js, on_invalid=self.rejections.node_record))
            except Exception as exc:
                _log.debug("reading nodes: %s", exc or type(exc).__name__)

    def _sync_nodes(self, records: list[NodeRecord]) -> None:
        now = time.time()
        for record in records:
            self._last_records[record.node] = record
            self._departed.pop(record.node, None)
        present = {record.node for record in records}
        for node in self._last_records:
            if node not in present:
                self._departed.setdefault(node, now)
        self.mark(self.projection.sync_nodes(records))
        self._node_map = None

    async def _load_drains(self) -> None:
        assert self._drain is not None
        for key in await live_keys(self._drain):
            if key.startswith(DRAIN_PREFIX):
                self.mark(self.projection.set_draining(key[len(DRAIN_PREFIX) :], True))

    async def _watch_drains(self) -> None:
        assert self._drain is not None
        while True:
            try:
                watcher = await self._drain.watchall()
                async for entry in watcher:
                    if entry is None or not entry.key.startswith(DRAIN_PREFIX):
                        continue
                    node = entry.key[len(DRAIN_PREFIX) :]
                    draining = entry.operation is None
                    self.mark(self.projection.set_draining(node, draining))
                    self._node_map = None
            except Exception as exc:
                _log.debug("watching drains: %s", exc or type(exc).__name__)
            await asyncio.sleep(1.0)

    # -- liveness -------------------------------------------------------------------------------

    def _records(self) -> list[NodeRecord]:
        return list(self._last_records.values())

    def node_map(self, now: float) -> NodeMap:
        if self._node_map is None:
            self._node_map = node_map_from(
                self._records(),
                now=now,
                late_after=self.config.late_after,
                down_after=self.config.down_after,
                draining=set(self.projection.draining),
            )
        return self._node_map

    async def _liveness_loop(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            self._refresh_liveness(time.time())

    def liveness(self, now: float) -> dict[str, NodeLiveness]:
        """Node liveness, recomputed when older than a second (a reconcile may come first)."""
        if now - self._liveness_at > 1.0:
            self._refresh_liveness(now)
        return self._liveness

    def _refresh_liveness(self, now: float) -> None:
        self._liveness_at = now
        liveness = liveness_from(
            self._records(),
            now=now,
            late_after=self.config.late_after,
            down_after=self.config.down_after,
            departed=self._departed,
        )
        changed = [
            node
            for node in set(liveness) | set(self._liveness)
            if (liveness.get(node), self._liveness.get(node)) != (None, None)
            and _state_of(liveness.get(node)) != _state_of(self._liveness.get(node))
        ]
        self._liveness = liveness
        if changed:
            self._node_map = None
            self.mark(self.projection.cids_on_nodes(changed))


def _state_of(liveness: NodeLiveness | None) -> str:
    return "absent" if liveness is None else str(liveness.state)


async def set_drain(js_hub: JetStreamContext, node: str, draining: bool) -> None:
    """Ask the controller to move everything off ``node`` (or stop doing so)."""
    bucket = await kv.ensure_bucket(js_hub, kv.DRAIN, history=1)
    if draining:
        await bucket.put(f"{DRAIN_PREFIX}{node}", str(time.time()).encode())
    else:
        with contextlib.suppress(nats.js.errors.KeyNotFoundError):
            await bucket.delete(f"{DRAIN_PREFIX}{node}")


async def draining_nodes(js_hub: JetStreamContext) -> set[str]:
    bucket = await kv.ensure_bucket(js_hub, kv.DRAIN, history=1)
    # A listed key holds a value (deletes are left out): no read of each one is needed.
    return {
        key[len(DRAIN_PREFIX) :] for key in await live_keys(bucket) if key.startswith(DRAIN_PREFIX)
    }

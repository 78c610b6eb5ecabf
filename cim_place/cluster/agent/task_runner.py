"""The tasks the controller queues for an agent (fetch, drop, verify, repair), and the gc after.

This module owns :class:`AgentTasks`: carrying out one task (``run_task``, idempotent: a task that
already holds completes at once), finding a task's holders (nodes KV and who-has), the verified
fetch into a volume, the repair of a damaged replica, the events and metrics of each outcome, and
the garbage collection that follows drops (the dropped DAGs' blocks soon, a sweep of every volume
now and then). The worker that pulls the tasks is :mod:`cim_place.cluster.tasks.worker`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Mapping

import nats.errors

from cim_place.cluster.agent.node_state import AgentState
from cim_place.cluster.agent.repair import (
    refresh_damaged_gauge,
    repair_replica,
)
from cim_place.cluster.events.types import (
    ObjectStored,
    ReplicaDamaged,
)
from cim_place.cluster.exchange.fetch import fetch_dag
from cim_place.cluster.exchange.fetch_model import FetchResult, Holder
from cim_place.cluster.exchange.holders import find_holders, holder_of
from cim_place.cluster.nats.connection import jetstream
from cim_place.cluster.nats.envelope import Envelope
from cim_place.cluster.state.nodes import (
    list_nodes,
)
from cim_place.cluster.tasks.model import Task
from cim_place.cluster.tasks.outcome import TaskOutcome, TaskResult
from cim_place.errors import CimPlaceError, StoreError
from cim_place.objectstore import dag, leftovers
from cim_place.objectstore.cid import Cid, to_str
from cim_place.objectstore.dagcbor import Value
from cim_place.objectstore.store import ObjectStore

__all__ = ["GC_DELAY", "SWEEP_EVERY", "AgentTasks"]

_log = logging.getLogger(__name__)

GC_DELAY = 5.0
"""Seconds to wait after a drop before collecting garbage, so a burst of drops costs one pass."""
SWEEP_EVERY = 3600.0
"""Seconds between sweeps of every volume. A drop collects only its DAG's blocks; what no drop
names (the gateway's read-through cache, blocks of a fetch that was abandoned) goes here."""


class AgentTasks(AgentState):
    """The agent's task execution and garbage collection (see :class:`Agent`)."""

    # -- tasks ----------------------------------------------------------------------------------

    async def _publish_task_event(self, envelope: Envelope) -> None:
        assert self.publisher is not None
        await self.publisher.publish(envelope)
        self.metrics.events_published.labels(envelope.content.type).inc()

    def _observe_task(self, result: TaskResult) -> None:
        self.metrics.tasks.labels(result.task.kind, result.action).inc()
        self.metrics.task_duration.labels(result.task.kind).observe(result.duration)

    async def run_task(self, task: Task) -> TaskOutcome:
        """Carry out one task. Idempotent: a task that already holds is completed at once."""
        if task.kind == "fetch":
            return await self._fetch(task)
        if task.kind == "drop":
            return await self._drop(task)
        if task.kind == "repair":
            return await self._repair(task)
        return await self._verify(task)

    async def _holders_for(self, task: Task) -> list[Holder]:
        """The task's holders with their labels (nodes KV), plus any found by who-has."""
        assert self.nc is not None
        labels: Mapping[str, Mapping[str, str]] = {}
        with contextlib.suppress(CimPlaceError, nats.errors.Error, TimeoutError):
            nodes = await list_nodes(jetstream(self.nc, self.config.hub_domain))
            labels = {record.node: record.labels for record in nodes}
        holders = {
            node: holder_of(node, labels.get(node, {}))
            for node in task.holders
            if node != self.node
        }
        # Stop listening once every holder the task names has answered: without ``expected``
        # who-has always waits its whole timeout (0.5 s), which dominated the time from `add`
        # to three copies (bench/converge.py). Other holders still count when a named one is
        # silent (then the full timeout runs, as before).
        expected = len(holders) or None
        for found in await find_holders(
            self.nc, task.root, expected=expected, subjects=self.subjects
        ):
            if found.node != self.node:
                holders.setdefault(found.node, found)
        return list(holders.values())

    async def _fetch(self, task: Task) -> TaskOutcome:
        located = self.pinned_on(task.root)
        if located is not None and (task.volume is None or located[0] == task.volume):
            # Asked for a copy the controller does not count (its ObjectStored lost, or a forged
            # ObjectRemoved believed): say again that it is here, or it would ask forever.
            await self._announce(ObjectStored, located[1], located[0])
            return TaskOutcome.completed({"volume": located[0], "already": True})
        volume = self._choose_volume(None, task.volume)
        store = self.volumes[volume]
        holders = await self._holders_for(task)
        if not holders:
            return TaskOutcome.retry(f"no holder of {to_str(task.root)} answers")
        assert self.scrub is not None
        # The fetch holds off gc, makes the scrub yield, and journals the blocks it adds so a
        # failed fetch's leftovers are swept (leftovers.sweep) once a retry is unlikely.
        with self.scrub.busy(volume), leftovers.journaled(store) as journaled:
            result = await self._fetch_into(task, store, journaled, holders)
            pin = await asyncio.to_thread(
                store.pin_complete,
                task.root,
                name=task.name,
                owner=task.owner,
                metadata=task.metadata,
            )
        self.metrics.blocks_fetched.inc(result.blocks_fetched)
        self.metrics.bytes_fetched.inc(result.bytes_fetched)
        for node in result.corrupt_holders:
            self.metrics.verification_failures.inc(result.holders[node].corrupt)
        self.metrics.bytes_stored.inc(pin.size)
        await self._announce_stored(pin, volume)
        corrupt: list[Value] = list(result.corrupt_holders)
        return TaskOutcome.completed(
            {
                "volume": volume,
                "blocks_fetched": result.blocks_fetched,
                "bytes_fetched": result.bytes_fetched,
                "corrupt_holders": corrupt,
            }
        )

    async def _fetch_into(
        self,
        task: Task,
        store: ObjectStore,
        blocks: leftovers.JournaledBlocks,
        holders: list[Holder],
    ) -> FetchResult:
        assert self.nc is not None
        lock = store.writing()
        await asyncio.to_thread(lock.__enter__)
        try:
            return await fetch_dag(
                self.nc,
                task.root,
                holders,
                blocks,
                subjects=self.subjects,
                near=self.near,
                bandwidth=self.limits.for_task(task),
                timeout=self.fetch_timeout,
                stream_tls=self.stream_client_tls,
            )
        finally:
            lock.__exit__(None, None, None)

    async def _repair(self, task: Task) -> TaskOutcome:
        """Re-fetch only the damaged blocks of a pinned replica, verify it whole, announce it."""
        located = self.pinned_on(task.root)
        if located is None:
            return TaskOutcome.failed(f"{to_str(task.root)} is not pinned on {self.node}")
        volume, pin = located
        assert self.scrub is not None
        problem, repaired, fetched = await repair_replica(
            task.root,
            volume,
            self.volumes[volume],
            scrub=self.scrub,
            holders=lambda: self._holders_for(task),
            fetch=lambda store, blocks, holders: self._fetch_into(task, store, blocks, holders),
            metrics=self.metrics,
        )
        if problem is not None:
            return TaskOutcome.retry(problem)
        # Verified whole: ObjectStored tells the controller the replica counts again.
        await self._announce_stored(pin, volume)
        refresh_damaged_gauge(self.scrub, self.metrics)
        outcome: dict[str, Value] = {
            "volume": volume,
            "blocks_repaired": repaired,
            "already": not repaired,
        }
        if fetched is not None:  # what the repair moved, and how fast (repair.bandwidth)
            outcome.update(bytes_fetched=fetched.bytes_fetched, fetch_seconds=fetched.seconds)
        return TaskOutcome.completed(outcome)

    async def _publish_damage(self, event: ReplicaDamaged) -> None:
        assert self.publisher is not None
        await self.publisher.publish_event(event)
        self.metrics.events_published.labels(event.TYPE).inc()
        refresh_damaged_gauge(self.scrub, self.metrics)

    async def _drop(self, task: Task) -> TaskOutcome:
        dropped = []
        for name, store in self.volumes.items():
            if task.volume is not None and name != task.volume:
                continue
            pin = store.pins.get(task.root)
            if pin is None:
                continue
            store.pins.remove(task.root)
            if self.scrub is not None:  # its damage, if any, goes with it
                await asyncio.to_thread(self.scrub.scrubbers[name].state.forget, task.root)
            dropped.append(name)
            self._dropped.setdefault(name, set()).add(task.root)
            await self._announce_removed(pin, name)
        if dropped:
            self._gc_wanted.set()
        volumes: list[Value] = list(dropped)
        return TaskOutcome.completed({"volumes": volumes, "already": not dropped})

    async def _verify(self, task: Task) -> TaskOutcome:
        located = self.pinned_on(task.root)
        if located is None:
            return TaskOutcome.failed(f"{to_str(task.root)} is not pinned on {self.node}")
        store = self.volumes[located[0]]
        try:
            blocks = await asyncio.to_thread(
                lambda: sum(1 for _ in dag.walk(store.blocks, task.root))
            )
        except StoreError as exc:
            self.metrics.verification_failures.inc()
            return TaskOutcome.failed(f"verification of {to_str(task.root)} failed: {exc}")
        return TaskOutcome.completed({"volume": located[0], "blocks": blocks})

    async def _gc_loop(self) -> None:
        last_sweep = time.monotonic()
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._gc_wanted.wait(), timeout=SWEEP_EVERY)
            if self._gc_wanted.is_set():
                await asyncio.sleep(GC_DELAY)
                self._gc_wanted.clear()
                dropped, self._dropped = self._dropped, {}
                for name, roots in dropped.items():
                    # Only the dropped DAGs' blocks: a sweep of the whole volume costs time in
                    # proportion to everything it holds, and a removal must free its space soon.
                    await self._collect(name, "collect", roots)
            if time.monotonic() - last_sweep >= SWEEP_EVERY:
                last_sweep = time.monotonic()
                for name in self.volumes:
                    await self._collect(name, "sweep", None)

    async def _collect(self, name: str, kind: str, roots: set[Cid] | None) -> None:
        store = self.volumes.get(name)
        if store is None:
            return
        try:
            if roots is None:
                result = await asyncio.to_thread(store.gc)
            else:
                result = await asyncio.to_thread(store.collect, roots)
        except StoreError as exc:
            _log.warning("gc (%s) of volume %s: %s", kind, name, exc)
            return
        _log.info(
            "gc (%s) of %s: %d blocks, %d bytes freed",
            kind,
            name,
            result.blocks_removed,
            result.bytes_freed,
        )

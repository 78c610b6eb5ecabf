"""The placement controller: keeps every object where its policy says, in the background.

The loop, level-triggered (a queued CID is a key, not an event):

1. Every controller (leader or standby) keeps a projection of the domain warm: events from
   ``CIM_PLACE_EVENTS`` (on start, from the first one or after the newest valid snapshot:
   :mod:`cim_place.cluster.controller.snapshot`), node heartbeats from KV
   ``cim-place-nodes``, drain flags from KV ``cim-place-drain`` and the applied policy set.
2. Every change marks the CIDs it concerns as dirty. A liveness tick marks the CIDs of nodes that
   turned late or down; a periodic full pass (APScheduler) marks everything, expires tasks whose
   report was lost, and picks a bounded number of rebalance moves.
3. Only the leader (a KV lease, :mod:`cim_place.cluster.state.leader`) reconciles: for each dirty
   CID
   it reads the projection, asks the pure reconciler what to do, enqueues the tasks (with
   deterministic ids: a repeated enqueue is a no-op), writes the status to KV
   ``cim-place-locations``, and requeues the CID when a grace or back-off ends. A deposed leader
   stops before its next enqueue.
4. Tasks are rate-limited per node (in flight) and per pass; a CID whose tasks cannot be queued
   now is looked at again a moment later.

Safety lives in the reconciler (copy before drop, never below the minimum, never the last copy,
a late node is not acted on); this module only wires state and I/O around it.

This module owns :class:`Controller`'s lifecycle: it opens the streams and buckets, starts the
background tasks and leadership, and stops them. Its parts: state and leadership
(controller_state.py), inputs and liveness (feeds.py), one object's reconcile (reconcile_pass.py),
which objects when (reconcile_loop.py), the full pass and summary (periodic.py); the settings are
in config.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import nats.errors
import nats.js.errors
from apscheduler.schedulers.asyncio import AsyncIOScheduler
from nats.aio.client import Client

from cim_place.cluster.controller.config import ControllerConfig
from cim_place.cluster.controller.demand import DemandIntake
from cim_place.cluster.controller.demand_api import DemandQueries
from cim_place.cluster.controller.feeds import DRAIN_PREFIX, draining_nodes, set_drain
from cim_place.cluster.controller.inventory import InventoryCheck
from cim_place.cluster.controller.periodic import ControllerPeriodic
from cim_place.cluster.controller.removal import Removals
from cim_place.cluster.controller.shards import ShardLeadership
from cim_place.cluster.controller.snapshot import RetentionPolicy, SnapshotPolicy, Snapshots
from cim_place.cluster.controller.status_api import StatusQueries
from cim_place.cluster.events.sources import nudge_sources
from cim_place.cluster.events.store import ensure_event_store, hub_size
from cim_place.cluster.nats import kv
from cim_place.cluster.nats.connection import connect, jetstream
from cim_place.cluster.state.leader import LeaderElection
from cim_place.cluster.state.locations import LocationStore
from cim_place.cluster.state.nodes import list_nodes
from cim_place.cluster.tasks.queue import TaskQueue, ensure_task_stream
from cim_place.errors import CimPlaceError, TransportError
from cim_place.runtime.lifecycle import cancel_and_wait

__all__ = [
    "DRAIN_PREFIX",
    "Controller",
    "ControllerConfig",
    "draining_nodes",
    "run_controller",
    "set_drain",
]

_log = logging.getLogger(__name__)
# APScheduler logs every run of the full pass at INFO; the controller logs what matters itself.
logging.getLogger("apscheduler").setLevel(logging.WARNING)


class Controller(ControllerPeriodic):
    """One controller process. ``await start()`` ... ``await stop()``; or ``async with``."""

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        config = self.config
        self.nc = nc = await connect(
            list(config.servers),
            creds=config.creds,
            name=f"cim-place-controller-{self.identity}",
            for_service=True,
        )
        self.js = js = jetstream(nc, config.hub_domain)
        replicas = _hub_replicas(nc, config.hub_domain)
        await ensure_event_store(js, replicas=replicas)
        await ensure_task_stream(js, replicas, subjects=self.subjects)
        self.locations = await LocationStore(js).open(replicas=replicas)
        self._queue = TaskQueue(js, subjects=self.subjects)
        self._drain = await kv.ensure_bucket(js, kv.DRAIN, history=1)
        await self._load_drains()
        self._sync_nodes(await list_nodes(js, on_invalid=self.rejections.node_record))
        self.removals = Removals(self, js)
        await self.removals.start()
        self.status_queries = StatusQueries(
            nc,
            self.subjects,
            self.status_index,
            is_leader=lambda: self.is_leader,
            tracked=lambda: len(self.projection),
            layout=None if config.shards <= 1 else self._shard_layout,
        )
        await self.status_queries.start()
        # Read before the replay: claims earlier inventory checks disproved stay disbelieved.
        self.inventory = InventoryCheck(
            nc, js, self.projection, self.mark, subjects=self.subjects, replicas=replicas
        )
        await self.inventory.open()
        # Start from the newest valid snapshot, if any: the feed then replays only what follows.
        self.snapshots = Snapshots(
            js,
            self.projection,
            policy=SnapshotPolicy(
                config.snapshot_every_events, config.snapshot_every, config.snapshots_kept
            ),
            retention=RetentionPolicy(config.events_max_age, config.events_max_bytes),
            replicas=replicas,
        )
        await self.snapshots.load(self.inventory)

        # Read counts from the agents (docs/DEMAND.md); each report marks objects to decide.
        self.demand = DemandIntake(nc, self.subjects, self.demand_window)
        self.demand.on_report = self.cached.on_report
        await self.demand.start()
        queries = DemandQueries(
            nc,
            self.subjects,
            self.cached,
            is_leader=lambda: self.is_leader,
            policy_of=self._policy,
            leads=self.leads,
        )
        await queries.start()  # `policy explain` asks on api.demand; closed with the connection

        if config.shards > 1:
            self.sharding = ShardLeadership(
                js,
                self.identity,
                config.shards,
                lease=config.lease,
                replicas=replicas,
                on_elected=self._elected_shard,
                on_deposed=self._deposed_shard,
            )
        else:
            self.election = LeaderElection(
                js,
                self.identity,
                lease=config.lease,
                replicas=replicas,
                on_elected=self._elected,
                on_deposed=self._deposed,
            )
        self._tasks = [
            # In the background: a nudge costs the hub a scan of the stream (seconds per million
            # events), which a start need not wait for.
            asyncio.create_task(self._nudge_sources(), name="cim-place-controller-nudge"),
            asyncio.create_task(self._read_events(), name="cim-place-controller-events"),
            asyncio.create_task(self._watch_policies(), name="cim-place-controller-policies"),
            asyncio.create_task(self._watch_nodes(), name="cim-place-controller-nodes"),
            asyncio.create_task(self._watch_drains(), name="cim-place-controller-drains"),
            asyncio.create_task(self._reconcile_loop(), name="cim-place-controller-reconcile"),
            asyncio.create_task(self._liveness_loop(), name="cim-place-controller-liveness"),
            asyncio.create_task(self._summary_loop(), name="cim-place-controller-summary"),
            asyncio.create_task(self.inventory.run(), name="cim-place-controller-inventory"),
            asyncio.create_task(
                self.cached.sweep_loop(self.cached.sweep_every, self._relocate_consumers),
                name="cim-place-controller-cached",
            ),
            asyncio.create_task(
                self.snapshots.run(self._leads_chores, self.caught_up),
                name="cim-place-controller-snapshots",
            ),
        ]
        self._scheduler = AsyncIOScheduler()
        self._scheduler.add_job(
            self.full_pass, "interval", seconds=config.full_pass_every, max_instances=1
        )
        self._scheduler.start()
        if config.metrics:
            self.metrics.serve(config.metrics)
        if self.sharding is not None:
            await self.sharding.start()
        elif self.election is not None:
            await self.election.start()
        _log.info("controller %s started", self.identity)

    async def _nudge_sources(self) -> None:
        """Restart the hub's sourcing of every outbox (a source may be stuck in its back-off)."""
        with contextlib.suppress(CimPlaceError, nats.errors.Error):
            assert self.js is not None
            await nudge_sources(self.js)

    async def stop(self) -> None:
        self._acting = False
        if self._scheduler is not None:
            self._scheduler.shutdown(wait=False)
            self._scheduler = None
        if self.election is not None:
            with contextlib.suppress(Exception):
                await self.election.stop()
        if self.sharding is not None:
            with contextlib.suppress(Exception):
                await self.sharding.stop()
        await cancel_and_wait(list(self._forgetting))
        if self.removals is not None:
            await self.removals.stop()
        if self.status_queries is not None:
            await self.status_queries.stop()
        await cancel_and_wait(self._tasks)
        self._tasks = []
        if self.demand is not None:
            with contextlib.suppress(Exception):
                await self.demand.stop()
            self.demand = None
        if self.nc is not None:
            # Everything that publishes was awaited above; close rather than drain, which waits
            # for subscriptions nobody reads any more (the KV watchers) until its 30 s limit.
            with contextlib.suppress(Exception):
                await self.nc.close()
            self.nc = None

    async def __aenter__(self) -> Controller:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


def _hub_replicas(nc: Client, hub_domain: str) -> int:
    try:
        return min(3, hub_size(nc, hub_domain=hub_domain))
    except TransportError:
        return 1


async def run_controller(config: ControllerConfig, stop: asyncio.Event) -> None:
    """Run a controller until ``stop`` is set."""
    controller = Controller(config)
    try:
        await controller.start()
    except BaseException:
        await controller.stop()
        raise
    try:
        await stop.wait()
    finally:
        await controller.stop()

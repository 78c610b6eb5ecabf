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
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Iterable
from dataclasses import dataclass, replace

import nats.errors
import nats.js.errors
from apscheduler.schedulers.asyncio import AsyncIOScheduler
from nats.aio.client import Client
from nats.js.client import JetStreamContext
from nats.js.kv import KeyValue

from cim_place.cluster.controller.cached import CachedCopies
from cim_place.cluster.controller.demand import DemandIntake
from cim_place.cluster.controller.demand_api import DemandQueries
from cim_place.cluster.controller.drift import reconcile_drift
from cim_place.cluster.controller.inventory import InventoryCheck
from cim_place.cluster.controller.located import LocatedConsumers
from cim_place.cluster.controller.metrics import ControllerMetrics
from cim_place.cluster.controller.projection import ObjectView, Projection
from cim_place.cluster.controller.rejections import Rejections
from cim_place.cluster.controller.removal import Removals, expire_name_versions
from cim_place.cluster.controller.repairs import RepairSlots
from cim_place.cluster.controller.shards import (
    ShardLeadership,
    forget_shard,
    shard_summaries,
    write_shard_summaries,
)
from cim_place.cluster.controller.snapshot import RetentionPolicy, SnapshotPolicy, Snapshots
from cim_place.cluster.controller.status_api import StatusQueries
from cim_place.cluster.controller.status_index import StatusIndex
from cim_place.cluster.events.feed import EventFeed
from cim_place.cluster.events.readers import StoredEvent
from cim_place.cluster.events.sources import nudge_sources
from cim_place.cluster.events.store import ensure_event_store, hub_size
from cim_place.cluster.events.types import (
    EVENT_TYPES,
    InventoryDigest,
    ObjectDeleted,
    TaskCompleted,
    TaskFailed,
)
from cim_place.cluster.events.validate import check_source
from cim_place.cluster.nats import kv
from cim_place.cluster.nats.connection import DEFAULT_SERVER, connect, jetstream
from cim_place.cluster.nats.envelope import Envelope
from cim_place.cluster.nats.subjects import DEFAULT_PREFIX, Subjects
from cim_place.cluster.state.leader import LeaderElection
from cim_place.cluster.state.locations import LocationStore
from cim_place.cluster.state.nodes import NODE_TTL, NodeRecord, list_nodes
from cim_place.cluster.state.policies import watch_policies
from cim_place.cluster.tasks.model import Task
from cim_place.cluster.tasks.queue import TaskQueue, ensure_task_stream
from cim_place.errors import CimPlaceError, PolicyError, TransportError
from cim_place.objectstore.cid import Cid, to_str
from cim_place.placement.demand_reconcile import required_input
from cim_place.placement.demand_window import DemandWindow
from cim_place.placement.model import NodeMap, PlacedObject
from cim_place.placement.reconcile_model import (
    FailedTask,
    InFlightTask,
    ObjectInfo,
    ReconcileInput,
    ReconcileResult,
    is_repair,
)
from cim_place.placement.reconciler import rebalance_candidates, reconcile
from cim_place.placement.rules import (
    CompiledPolicy,
    Liveness,
    NodeLiveness,
    compile_policy,
    liveness_from,
    node_map_from,
)
from cim_place.placement.status import OBJECT_STATES, Summary
from cim_place.placement.topology import topology_warnings
from cim_place.policies.model import BUILTIN_DEFAULT, Policy, PolicySet
from cim_place.policies.selectors import ObjectFacts, match_policy
from cim_place.runtime.lifecycle import cancel_and_wait

_log = logging.getLogger(__name__)
# APScheduler logs every run of the full pass at INFO; the controller logs what matters itself.
logging.getLogger("apscheduler").setLevel(logging.WARNING)

DRAIN_PREFIX = "drain."
DEGRADED_RETRY = 5.0
"""Seconds after which a degraded or lost object is reconciled again without any event."""


def default_identity() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


@dataclass(frozen=True, slots=True)
class ControllerConfig:
    servers: tuple[str, ...] = (DEFAULT_SERVER,)
    creds: str | None = None
    hub_domain: str = "hub"
    prefix: str = DEFAULT_PREFIX
    identity: str = ""
    """Unique per controller process; default host-pid."""
    lease: float = 6.0
    full_pass_every: float = 60.0
    late_after: float = 15.0
    """Seconds without a heartbeat after which a node is late (not acted on)."""
    down_after: float = NODE_TTL
    """Seconds without a heartbeat after which a node is down (its copies are lost once the
    policy's repair grace has passed too)."""
    max_tasks_per_node: int = 16
    max_bytes_per_node: int = 4 << 30
    """Bytes of fetches in flight to one node (the first fetch always passes, whatever its size)."""
    max_tasks: int = 1024
    """Tasks in flight in the whole domain."""
    task_timeout: float = 1800.0
    """Seconds after which a task with no report is forgotten (and its work re-planned)."""
    rebalance_per_pass: int = 100
    summary_every: float = 1.0
    metrics: str | None = None
    snapshot_every_events: int = 100_000
    """The leader snapshots its projection after this many events (controller/snapshot.py) ..."""
    snapshot_every: float = 600.0
    """... or after this many seconds with at least one new event."""
    snapshots_kept: int = 3
    events_max_age: float = 0.0
    """Purge events older than this once a snapshot covers them (0: keep every event)."""
    events_max_bytes: int = 0
    """Purge the oldest events beyond this size once a snapshot covers them (0: no limit)."""
    shards: int = 1
    """Split the CIDs into this many shards, one lease each (controller/shards.py); 1: one
    lease for the whole domain, as always."""


class Controller:
    """One controller process. ``await start()`` ... ``await stop()``; or ``async with``."""

    def __init__(self, config: ControllerConfig) -> None:
        self.config = config
        self.identity = config.identity or default_identity()
        self.subjects = Subjects(config.prefix)
        self.projection = Projection()
        self.metrics = ControllerMetrics()
        # Input that fails validation is counted and logged here, and otherwise ignored.
        self.rejections = Rejections(self.metrics.registry, prefix=config.prefix)
        self.projection.on_reject = self.rejections.event
        self.nc: Client | None = None
        # Demand-driven cached copies (docs/DEMAND.md): the ledger, decisions and their tasks.
        self.cached = CachedCopies(
            self.projection,
            self.metrics,
            self.mark,
            identity=self.identity,
            max_fetches_per_node=config.max_tasks_per_node,
        )
        self.located = LocatedConsumers()
        self.demand: DemandIntake | None = None
        self.js: JetStreamContext | None = None
        self.locations: LocationStore | None = None
        self.election: LeaderElection | None = None
        self.sharding: ShardLeadership | None = None
        """With ``shards`` > 1: the shards this process leads (``election`` stays None)."""
        self._queue: TaskQueue | None = None
        self.inventory: InventoryCheck | None = None
        self._drain: KeyValue | None = None
        self.removals: Removals | None = None
        # Rows of `cim-place status --state/--node/--policy/--name`, written at each reconcile.
        self.status_index = StatusIndex()
        self.status_queries: StatusQueries | None = None
        self.snapshots: Snapshots | None = None
        self._compiled: dict[str, CompiledPolicy] = {}
        # What an object gets while its policy is not compiled (none loaded yet, or it failed).
        self._fallback = compile_policy(BUILTIN_DEFAULT)
        self._dirty: set[Cid] = set()
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._scheduler: AsyncIOScheduler | None = None
        self._liveness: dict[str, NodeLiveness] = {}
        self._liveness_at = 0.0
        self._departed: dict[str, float] = {}
        self._last_records: dict[str, NodeRecord] = {}
        self._node_map: NodeMap | None = None
        self._warned: tuple[NodeMap | None, dict[str, CompiledPolicy], tuple[str, ...]] = (
            None,
            {},
            (),
        )
        self._states: dict[Cid, str] = {}
        self._under: set[Cid] = set()
        self._below_min: set[Cid] = set()
        self._acting = False
        self.reconciled = 0
        self.caught_up = asyncio.Event()
        """Set once the projection has read every event present at start."""
        self._drifting: set[tuple[str, str]] = set()
        self._budget_cache: tuple[int, _Budget, RepairSlots] | None = None
        self._drift_tasks: set[asyncio.Task[None]] = set()

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

    @property
    def demand_window(self) -> DemandWindow:
        return self.cached.window

    @property
    def is_leader(self) -> bool:
        """True while this process leads the domain (with shards: at least one shard)."""
        if self.sharding is not None:
            return self.sharding.is_leader
        return self.election is not None and self.election.is_leader

    def leads(self, cid: Cid) -> bool:
        """True while this process may act on ``cid`` (it leads the domain, or its shard)."""
        return self._acting if self.sharding is None else self.sharding.leads(cid)

    def _leads_chores(self) -> bool:
        """Domain-wide work done once (snapshots, purges, drift, name expiry, status listings):
        the leader's, or shard 0's leader's."""
        return self._acting if self.sharding is None else self.sharding.leads_shard(0)

    def _elected_shard(self, index: int) -> None:
        assert self.sharding is not None
        self._acting = True
        self.metrics.leader.set(1)
        if self.locations is not None:
            self.locations.forget_written()
        self.mark(self.sharding.cids_of(index, self.projection.cids()))

    def _shard_layout(self) -> dict[str, object]:
        led = self.sharding.led if self.sharding is not None else ()
        return {"shards": sorted(led), "of": self.config.shards}

    def _deposed_shard(self, index: int) -> None:
        # Synchronous: ``leads`` is already False for the shard's CIDs, so no enqueue follows.
        assert self.sharding is not None
        self._acting = self.sharding.is_leader
        # Its new leader answers for them now: its rows leave this process's status index.
        forget_shard(
            index,
            self.config.shards,
            self._states,
            (self._under, self._below_min),
            self.status_index,
        )
        self.metrics.leader.set(1 if self._acting else 0)
        _log.warning("controller %s no longer leads shard %d", self.identity, index)

    def _elected(self) -> None:
        self._acting = True
        self.metrics.leader.set(1)
        if self.locations is not None:
            self.locations.forget_written()
        self.mark(self.projection.cids())
        _log.info(
            "controller %s leads (term %s)", self.identity, self.election and self.election.term
        )

    def _deposed(self) -> None:
        # Synchronous, before anything else runs: no enqueue happens after this returns.
        self._acting = False
        self.metrics.leader.set(0)
        _log.warning("controller %s no longer leads", self.identity)

    # -- inputs ---------------------------------------------------------------------------------

    def mark(self, cids: Iterable[Cid]) -> None:
        self._dirty.update(cids)
        if self._dirty:
            # Also when every CID was already marked: a standby keeps marks without acting on
            # them, so the wake-up that matters may come with nothing new.
            self._wake.set()

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
        if self.inventory is not None and not self.inventory.believe(stored):
            return  # a claim an inventory check disproved (a forgery, replayed)
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
        self.mark(self.projection.set_policies(policies))

    def _relocate_consumers(self) -> None:
        """A service consumer that moved: compile again and look at every object."""
        policies, now = self.projection.policies, time.time()
        if self.located.moved(policies, self.demand_window, self.node_map(now), now):
            self._set_policies(policies)
            self.mark(self.projection.cids())

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
        with contextlib.suppress(nats.js.errors.NoKeysError):
            for key in await self._drain.keys():
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

    # -- reconciling ----------------------------------------------------------------------------

    async def _reconcile_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            if not self._acting or not self.caught_up.is_set():
                # A standby (or a leader still reading history) keeps the marks for later.
                if not self.caught_up.is_set():
                    await self.caught_up.wait()
                    self._wake.set()
                continue
            batch, self._dirty = self._dirty, set()
            for cid in batch:
                if not self._acting:
                    self._dirty.update(batch)
                    break
                if self.sharding is not None and not self.sharding.leads(cid):
                    continue  # another shard's: a takeover of that shard marks it again
                try:
                    await self.reconcile_one(cid)
                except (CimPlaceError, nats.errors.Error, TimeoutError) as exc:
                    _log.warning("reconcile of %s: %s; retrying shortly", to_str(cid), exc)
                    self._requeue(cid, 1.0)
                except Exception:
                    # A bug must cost one object a retry, never the whole loop.
                    _log.exception("reconcile of %s failed; retrying shortly", to_str(cid))
                    self._requeue(cid, 5.0)
                # Let events and heartbeats in between objects.
                await asyncio.sleep(0)

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
        self, cid: Cid, now: float, *, rebalance: bool = False
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
        )

    async def reconcile_one(self, cid: Cid, *, rebalance: bool = False) -> ReconcileResult | None:
        assert self.locations is not None and self._queue is not None
        started = time.perf_counter()
        # The status last written is read first: from the projection's snapshot below to
        # ``cached.volumes`` nothing may await. ``volumes`` also asks the projection whether a
        # demand task still runs; events let in between would end a fetch whose copy the
        # snapshot does not have yet (taken as failed: its copy then shows as an ordinary
        # surplus replica, fetching, pinned, dropped) or a drop whose copy it still has.
        if cid not in self.projection:
            return None
        previous = await self.locations.get(cid)
        now = time.time()
        inp = self.reconcile_input(cid, now, rebalance=rebalance)
        if inp is None:
            return None
        inp = replace(inp, previous=previous)
        # Cached copies and demand tasks are invisible to the reconciler (cached.py).
        cached = self.cached.volumes(cid, inp)
        result = reconcile(required_input(inp, cached))
        # Counted only when there is something to issue: the walk over the tasks in flight
        # is bounded by max_tasks, but most reconciles (an event about a placed object) issue
        # nothing, and a backlog ingest would otherwise pay it once per object.
        if result.actions:
            _, budget, slots = self._limits()
        postponed = False
        obj = inp.obj
        policy = inp.policy
        for action in result.actions:
            if not self.leads(cid):
                return result  # deposed: not one more task
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
            await self._queue.enqueue(task)
            before = self.projection.task_changes  # nothing awaited from here to the take
            self.projection.task_enqueued(task, now, repair_policy=policy.name if repair else None)
            if repair:
                slots.take(policy)
            budget.take(action.node, action.kind, obj.size)
            if self._budget_cache == (before, budget, slots):
                self._budget_cache = (before + 1, budget, slots)  # this task, counted by take
            self.metrics.tasks_queued.labels(action.kind).inc()
        if self.leads(cid) and not result.gone:
            await self.cached.act(self._queue, cid, inp, result, now, lambda: self.leads(cid))
            result = self.cached.status(cid, result, inp.node_map)
        if result.gone:
            # Expired and every copy dropped: it leaves the listing and the projection.
            if self.leads(cid):
                await self.locations.delete(cid)
            self.projection.forget(cid)
            self.status_index.remove(result.status.cid)
            self._states.pop(cid, None)
            self._under.discard(cid)
            self.reconciled += 1
            return result
        if self.leads(cid):
            await self.locations.put(result.status)
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
        budget = _Budget(self.config)
        for task in self.projection.in_flight():
            budget.take(task.node, task.kind, self.projection.size(task.root))
        slots = RepairSlots(self.projection.in_flight())
        self._budget_cache = (self.projection.task_changes, budget, slots)
        return self._budget_cache

    def _note_state(self, cid: Cid, result: ReconcileResult) -> None:
        self._states[cid] = result.status.state
        self.status_index.update(result.status)
        if result.status.state != "removed" and result.status.pinned < result.status.desired:
            self._under.add(cid)
        else:
            self._under.discard(cid)

    # -- periodic work --------------------------------------------------------------------------

    async def full_pass(self) -> None:
        """Mark everything, forget lost tasks, start a bounded number of rebalance moves."""
        now = time.time()
        self.mark(self.projection.expire_tasks(now - self.config.task_timeout))
        self.mark(self.projection.cids())
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
        """Start at most ``rebalance_per_pass`` moves toward the ideal placement."""
        node_map = self.node_map(now)
        by_policy: dict[str, list[tuple[PlacedObject, frozenset[str]]]] = {}
        for cid in self.projection.cids():
            view = self.projection.object(cid)
            if view is None or self.projection.tasks_for(cid) or not self.leads(cid):
                continue
            policy = self.policy_for(_facts(cid, view))
            volumes = frozenset(f"{node}/{volume}" for node, volume in view.replicas)
            volumes -= self.cached.occupied(cid)
            by_policy.setdefault(policy.name, []).append((PlacedObject(cid, view.size), volumes))
        started = 0
        for name, objects in by_policy.items():
            budget = self.config.rebalance_per_pass - started
            if budget <= 0:
                break
            policy = self._compiled.get(name, self._fallback)
            for placed in rebalance_candidates(objects, policy.rule, node_map, limit=budget):
                await self.reconcile_one(placed.cid, rebalance=True)
                started += 1
        return started

    async def _summary_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.summary_every)
            if not self._acting or self.locations is None:
                continue
            try:
                if self.sharding is not None:
                    await self._put_shard_summaries(self.locations)
                    continue
                await self.locations.put_summary(self.summary())
            except Exception as exc:
                _log.debug("writing the summary: %s", exc or type(exc).__name__)

    async def _put_shard_summaries(self, locations: LocationStore) -> None:
        assert self.sharding is not None
        by_shard = shard_summaries(
            self.summary(),
            self._states,
            self._under,
            self.projection.size,
            self.sharding.shards,
            self.sharding.led,
        )
        await write_shard_summaries(locations.bucket, by_shard, self.sharding.shards)

    def summary(self) -> Summary:
        counts: dict[str, int] = dict.fromkeys(OBJECT_STATES, 0)
        for state in self._states.values():
            counts[state] = counts.get(state, 0) + 1
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


class _Budget:
    """Tasks in flight per node and in the domain, and bytes of fetches per node: what the
    rate limits of :class:`ControllerConfig` allow next."""

    def __init__(self, config: ControllerConfig) -> None:
        self.config = config
        self.tasks: dict[str, int] = {}
        self.fetch_bytes: dict[str, int] = {}
        self.total = 0

    def allows(self, node: str, kind: str, size: int) -> bool:
        if self.total >= self.config.max_tasks:
            return False
        if self.tasks.get(node, 0) >= self.config.max_tasks_per_node:
            return False
        pending = self.fetch_bytes.get(node, 0)
        return kind != "fetch" or pending == 0 or pending + size <= self.config.max_bytes_per_node

    def take(self, node: str, kind: str, size: int) -> None:
        self.total += 1
        self.tasks[node] = self.tasks.get(node, 0) + 1
        if kind == "fetch":
            self.fetch_bytes[node] = self.fetch_bytes.get(node, 0) + size


def _state_of(liveness: NodeLiveness | None) -> str:
    return "absent" if liveness is None else str(liveness.state)


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


def _hub_replicas(nc: Client, hub_domain: str) -> int:
    try:
        return min(3, hub_size(nc, hub_domain=hub_domain))
    except TransportError:
        return 1


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
    try:
        keys = await bucket.keys()
    except nats.js.errors.NoKeysError:
        return set()
    found = set()
    for key in keys:
        if key.startswith(DRAIN_PREFIX):
            with contextlib.suppress(nats.js.errors.KeyNotFoundError):
                entry = await bucket.get(key)
                if entry.value is not None:
                    found.add(key[len(DRAIN_PREFIX) :])
    return found


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

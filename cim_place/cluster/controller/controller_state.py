"""The controller's state and its leadership: what every other part of the controller reads.

This module owns :class:`ControllerState`: the projection and the handles of the controller's
services once started, the dirty CIDs and their wake-up (:meth:`ControllerState.mark`), the
compiled policies, node liveness, the per-object states the summary counts, and leadership (one
lease, or one per shard: ``is_leader``, ``leads``, the elected and deposed hooks). The inputs
that mark CIDs are in :mod:`cim_place.cluster.controller.feeds`, the reconcile of one object in
:mod:`cim_place.cluster.controller.reconcile_pass`, which objects when in
:mod:`cim_place.cluster.controller.reconcile_loop`, the full pass and the summary in
:mod:`cim_place.cluster.controller.periodic`;
:class:`~cim_place.cluster.controller.service.Controller` starts and stops it all.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import socket
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING

from apscheduler.schedulers.asyncio import AsyncIOScheduler
from nats.aio.client import Client
from nats.js.client import JetStreamContext
from nats.js.kv import KeyValue

from cim_place.cluster.controller.cached import CachedCopies
from cim_place.cluster.controller.config import ControllerConfig, limit_part
from cim_place.cluster.controller.demand import DemandIntake
from cim_place.cluster.controller.inventory import InventoryCheck
from cim_place.cluster.controller.located import LocatedConsumers
from cim_place.cluster.controller.metrics import ControllerMetrics
from cim_place.cluster.controller.object_states import ObjectStates
from cim_place.cluster.controller.projection import Projection
from cim_place.cluster.controller.rejections import Rejections
from cim_place.cluster.controller.removal import Removals
from cim_place.cluster.controller.repairs import RepairSlots
from cim_place.cluster.controller.shards import ShardLeadership, forget_shard
from cim_place.cluster.controller.snapshot import Snapshots
from cim_place.cluster.controller.status_api import StatusQueries
from cim_place.cluster.controller.status_index import StatusIndex
from cim_place.cluster.nats.subjects import Subjects
from cim_place.cluster.state.leader import LeaderElection
from cim_place.cluster.state.locations import LocationStore
from cim_place.cluster.state.nodes import NodeRecord
from cim_place.cluster.tasks.queue import TaskQueue
from cim_place.objectstore.cid import Cid
from cim_place.placement.demand_window import DemandWindow
from cim_place.placement.model import NodeMap
from cim_place.placement.rules import CompiledPolicy, NodeLiveness, compile_policy
from cim_place.policies.model import BUILTIN_DEFAULT

if TYPE_CHECKING:
    from cim_place.cluster.controller.reconcile_pass import _Budget

__all__ = ["ControllerState", "default_identity"]

_log = logging.getLogger(__name__)


def default_identity() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class ControllerState:
    """One controller process as its parts see it (see
    :class:`cim_place.cluster.controller.service.Controller`)."""

    def __init__(self, config: ControllerConfig) -> None:
        self.config = config
        self.identity = config.identity or default_identity()
        self.subjects = Subjects(config.prefix)
        self.projection = Projection()
        self.metrics = ControllerMetrics()
        self.metrics.shards.set(config.shards)
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
        # Every CID due at once (a policy change, an election, the full pass): a flag, not a set
        # of every CID, which at 10M objects would be a gigabyte of bytes objects.
        self._all_dirty = False
        self._walk_cursor = 0
        """The slot where a walk of every CID resumes (``ControllerLoop._walk_all``)."""
        self._walk_warned = -math.inf
        """When (monotonic) a walk longer than the full pass was last warned of."""
        self._walking = False
        self._walk_ended = -math.inf
        """When (monotonic) the last complete walk of every object ended ..."""
        self._walk_took = 0.0
        """... and how long it took (``ControllerLoop.walk_wanted`` spaces walks by it)."""
        self._rebalance_cursor = 0
        """The slot where the next full pass's rebalance scan resumes (periodic.py)."""
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
        self.object_states = ObjectStates()
        """Per projection slot: the state of its last reconcile, its shard, the status hash."""
        self._under: set[Cid] = set()
        self._below_min: set[Cid] = set()
        self._acting = False
        self.reconciled = 0
        self.caught_up = asyncio.Event()
        """Set once the projection has read every event present at start."""
        self._drifting: set[tuple[str, str]] = set()
        self._budget_cache: tuple[int, _Budget, RepairSlots] | None = None
        self._adopt_due = False
        """Set by an election: the tasks in the task stream are counted before a reconcile."""
        self._drift_tasks: set[asyncio.Task[None]] = set()
        self._forgetting: set[asyncio.Task[None]] = set()
        """Shards no longer led being forgotten (``shards.forget_shard``)."""

    # -- leadership -----------------------------------------------------------------------------

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

    def _shards_led(self) -> tuple[int, int]:
        """The shards this process leads and their count: its part of the domain-wide task
        limits (``config.limit_part``); ``(1, 1)`` without shards."""
        if self.sharding is None:
            return (1, 1)
        return (len(self.sharding.led), self.sharding.shards)

    def _shards_changed(self) -> None:
        # The limits' part follows the shards led: the cached budget is rebuilt with it.
        self._budget_cache = None
        led, shards = self._shards_led()
        self.cached.max_fetches_per_node = limit_part(self.config.max_tasks_per_node, led, shards)
        self.metrics.shards_led.set(led)

    def _elected_shard(self, index: int) -> None:
        assert self.sharding is not None
        self._acting = True
        self._adopt_due = True
        self._shards_changed()
        self.metrics.leader.set(1)
        self.object_states.forget_written()
        self.mark_all()  # the reconcile pass skips the CIDs of shards it does not lead

    def _shard_layout(self) -> dict[str, object]:
        led = self.sharding.led if self.sharding is not None else ()
        return {"shards": sorted(led), "of": self.config.shards}

    def _deposed_shard(self, index: int) -> None:
        # Synchronous: ``leads`` is already False for the shard's CIDs, so no enqueue follows.
        assert self.sharding is not None
        self._acting = self.sharding.is_leader
        self._shards_changed()
        # Its new leader answers for them now: its rows leave this process's status index, a
        # chunk at a time (the shards still led must keep renewing their leases meanwhile).
        forgetting = asyncio.create_task(
            self._forget_shard(index), name=f"cim-place-controller-forget-{index}"
        )
        self._forgetting.add(forgetting)
        forgetting.add_done_callback(self._forgetting.discard)
        self.metrics.leader.set(1 if self._acting else 0)
        _log.warning("controller %s no longer leads shard %d", self.identity, index)

    async def _forget_shard(self, index: int) -> None:
        started = time.monotonic()
        forgotten = await forget_shard(
            index,
            self.object_states,
            self.projection.keys_at,
            (self._under, self._below_min),
            self.status_index,
            won_back=lambda: self.sharding is not None and self.sharding.leads_shard(index),
        )
        _log.info(
            "controller %s forgot %d objects of shard %d in %.1f s",
            self.identity,
            forgotten,
            index,
            time.monotonic() - started,
        )

    def _elected(self) -> None:
        self._acting = True
        self._adopt_due = True
        self.metrics.leader.set(1)
        self.metrics.shards_led.set(1)
        self.object_states.forget_written()
        self.mark_all()
        _log.info(
            "controller %s leads (term %s)", self.identity, self.election and self.election.term
        )

    def _deposed(self) -> None:
        # Synchronous, before anything else runs: no enqueue happens after this returns.
        self._acting = False
        self.metrics.leader.set(0)
        self.metrics.shards_led.set(0)
        _log.warning("controller %s no longer leads", self.identity)

    # -- marking --------------------------------------------------------------------------------

    def mark_all(self) -> None:
        """Every tracked CID is due for a reconcile."""
        self._all_dirty = True
        self._wake.set()

    def mark(self, cids: Iterable[Cid]) -> None:
        self._dirty.update(cids)
        if self._dirty:
            # Also when every CID was already marked: a standby keeps marks without acting on
            # them, so the wake-up that matters may come with nothing new.
            self._wake.set()

"""The agent's state: its settings, volumes and services, the heartbeat record, announcements.

This module owns :class:`AgentState`, the part of the leaf agent that every other part reads:
what the agent was configured with, its volumes (which one holds a root, which one has room),
the handles of its services once started, the node record the heartbeat reports (with the
services' counters carried into the metrics), and what it announces to the domain: every pin
and unpin (``ObjectStored`` / ``ObjectRemoved``) and the periodic inventory digest. The tasks
it runs are in :mod:`cim_place.cluster.agent.task_runner`;
:class:`~cim_place.cluster.agent.service.Agent` starts and stops it all.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import nats.errors
from nats.aio.client import Client

from cim_place import __version__
from cim_place.cluster.agent.config import AgentConfig
from cim_place.cluster.agent.demand import DemandReporter
from cim_place.cluster.agent.metrics import AgentMetrics
from cim_place.cluster.agent.repair import (
    RepairLimits,
)
from cim_place.cluster.agent.scrubbing import ScrubService
from cim_place.cluster.events.publisher import EventPublisher
from cim_place.cluster.events.types import (
    InventoryDigest,
    ObjectRemoved,
    ObjectStored,
    inventory_digest,
)
from cim_place.cluster.exchange.blocks import BlockServer
from cim_place.cluster.exchange.fetch_model import Labels, request_timeout
from cim_place.cluster.exchange.holders import HolderResponder
from cim_place.cluster.exchange.ratelimit import BandwidthLimit
from cim_place.cluster.exchange.stream import BlockStreamServer
from cim_place.cluster.exchange.stream_wire import client_tls
from cim_place.cluster.exchange.upload_server import UploadService
from cim_place.cluster.state.nodes import (
    Heartbeat,
    NodeRecord,
    VolumeStatus,
    heartbeat_grace,
)
from cim_place.cluster.tasks.worker import TaskWorker
from cim_place.errors import CimPlaceError, StoreFullError
from cim_place.http.server import HttpServers, Listener
from cim_place.interfaces import Pin, Service
from cim_place.objectstore.cid import Cid
from cim_place.objectstore.store import ObjectStore

if TYPE_CHECKING:
    from cim_place.cluster.agent.service import Agent

__all__ = ["AgentState"]


class AgentState:
    """One node's agent as its parts see it (see :class:`cim_place.cluster.agent.service.Agent`)."""

    def __init__(self, config: AgentConfig, *, fsync: str = "file") -> None:
        self.config = config
        self.node = config.node
        self.subjects = config.subjects
        self.metrics = AgentMetrics(config.node)
        self.started_at = time.time()
        self.volumes: dict[str, ObjectStore] = {}
        for volume in config.volumes:
            self.volumes[volume.name] = ObjectStore(
                volume.path,
                capacity=volume.capacity,
                fsync=fsync,  # type: ignore[arg-type]
            )
        self.near = Labels(
            region=config.labels.get("region", ""),
            zone=config.labels.get("zone", ""),
            host=config.labels.get("host", ""),
        )
        self.bandwidth = BandwidthLimit(config.bandwidth) if config.bandwidth else None
        self.limits = RepairLimits(self.bandwidth)
        # A holder silent for the heartbeat grace is left for another (dead peers are noticed).
        self.fetch_timeout = request_timeout(heartbeat_grace(config.heartbeat))
        # How this agent verifies peers' TLS block streams (plain streams need nothing).
        try:
            self.stream_client_tls = client_tls(config.stream_tls_ca)
        except (OSError, ssl.SSLError) as exc:
            raise CimPlaceError(
                f"cannot load the CA file {config.stream_tls_ca} for peers' block streams: {exc}; "
                "check blocks.tls.ca in the agent configuration"
            ) from None
        self.nc: Client | None = None
        self.publisher: EventPublisher | None = None
        self._services: list[Service] = []
        self._background: list[asyncio.Task[None]] = []
        self._heartbeat: Heartbeat | None = None
        self._worker: TaskWorker | None = None
        self._gc_wanted = asyncio.Event()
        self._dropped: dict[str, set[Cid]] = {}
        """Roots dropped per volume whose blocks are not collected yet."""
        self._reconnected = asyncio.Event()
        self._synced: dict[str, int] = {}
        self._blocks: BlockServer | None = None
        self._stream: BlockStreamServer | None = None
        self._holders: HolderResponder | None = None
        self._uploads: UploadService | None = None
        self.http: HttpServers | None = None
        """The node's HTTP listeners while running (None: ``http`` is off or not started)."""
        self.http_extra: list[Callable[[Agent], Listener]] = []
        """Builders of further HTTP listeners (the S3 API), called once the agent's services run;
        each binds on its own address, beside the gateway if ``http`` is on."""
        self.scrub: ScrubService | None = None
        self.demand: DemandReporter | None = None

    # -- state ----------------------------------------------------------------------------------

    @property
    def block_stream(self) -> BlockStreamServer | None:
        """The node's bulk block stream while running (None: disabled or not started)."""
        return self._stream

    def volume_status(self) -> list[VolumeStatus]:
        statuses = []
        for name, store in self.volumes.items():
            used = store.blocks.used_bytes()
            free = store.blocks.free_bytes()
            statuses.append(VolumeStatus(name, used + free, used, free))
        return statuses

    def _sync_service_metrics(self) -> None:
        """Carry the services' own counters into the Prometheus counters (by difference)."""
        current: dict[str, int] = {}
        if self._blocks is not None:
            stats = self._blocks.stats
            current.update(
                served_blocks=stats.blocks_served,
                served_bytes=stats.bytes_served,
                corrupt=stats.corrupt,
                malformed_blocks=stats.malformed,
            )
        if self._holders is not None:
            current["malformed_has"] = self._holders.stats.malformed
        if self._uploads is not None:
            current["malformed_upload"] = self._uploads.stats.malformed
        if self._worker is not None:
            current["malformed_tasks"] = self._worker.stats.malformed
        if self.demand is not None:
            current.update(
                demand_reads=self.demand.reads_recorded,
                demand_dropped=self.demand.reads_dropped,
                demand_reports=self.demand.reports_sent,
                read_local=self.demand.bytes_local,
                read_remote=self.demand.bytes_remote,
            )
        delta = {key: max(0, value - self._synced.get(key, 0)) for key, value in current.items()}
        self._synced = current
        self.metrics.blocks_served.inc(delta.get("served_blocks", 0))
        self.metrics.bytes_served.inc(delta.get("served_bytes", 0))
        self.metrics.verification_failures.inc(delta.get("corrupt", 0))
        self.metrics.demand_reads.inc(delta.get("demand_reads", 0))
        self.metrics.demand_reads_dropped.inc(delta.get("demand_dropped", 0))
        self.metrics.demand_reports.inc(delta.get("demand_reports", 0))
        self.metrics.read_bytes.labels("local").inc(delta.get("read_local", 0))
        self.metrics.read_bytes.labels("remote").inc(delta.get("read_remote", 0))
        for service in ("blocks", "has", "upload", "tasks"):
            self.metrics.malformed_messages.labels(service).inc(
                delta.get(f"malformed_{service}", 0)
            )

    def record(self) -> NodeRecord:
        """This node as the heartbeat reports it (and refreshes the metrics)."""
        self._sync_service_metrics()
        statuses = self.volume_status()
        for status in statuses:
            self.metrics.observe_volume(status, len(self.volumes[status.name].pins.list()))
        return NodeRecord(
            node=self.node,
            labels=dict(self.config.labels),
            tags=self.config.tags,
            volumes=tuple(statuses),
            version=__version__,
            started_at=self.started_at,
            heartbeat_at=time.time(),
            block_stream=self._stream.address if self._stream is not None else "",
        )

    def pinned_on(self, root: bytes) -> tuple[str, Pin] | None:
        for name, store in self.volumes.items():
            pin = store.pins.get(root)
            if pin is not None:
                return name, pin
        return None

    def _pin_of(self, root: bytes) -> Pin | None:
        located = self.pinned_on(root)
        return located[1] if located is not None else None

    def _volume_for(self, size: int | None) -> ObjectStore:
        """The volume with the most free space; StoreFullError when none has room for ``size``."""
        name = self._choose_volume(size)
        return self.volumes[name]

    def _choose_volume(self, size: int | None, preferred: str | None = None) -> str:
        if preferred is not None and preferred in self.volumes:
            return preferred
        free = {name: store.blocks.free_bytes() for name, store in self.volumes.items()}
        name = max(sorted(free), key=lambda n: free[n])
        if size is not None and free[name] < size:
            raise StoreFullError(
                f"no volume of node {self.node} has room for {size} bytes "
                f"(most free: {name}, {free[name]} bytes); add capacity or drop content"
            )
        return name

    # -- announcing -----------------------------------------------------------------------------

    async def _uploaded(self, pin: Pin) -> None:
        located = self.pinned_on(pin.root)
        volume = located[0] if located else next(iter(self.volumes))
        self.metrics.bytes_stored.inc(pin.size)
        await self._announce_stored(pin, volume)

    async def _announce_stored(self, pin: Pin, volume: str) -> None:
        await self._announce(ObjectStored, pin, volume)
        if self.scrub is not None:
            # Pinned again over a replica known damaged (an upload keeps blocks already present,
            # bad ones too): check it, and report the damage again if it is still there.
            await self.scrub.recheck(pin.root, volume)

    async def _announce_removed(self, pin: Pin, volume: str) -> None:
        await self._announce(ObjectRemoved, pin, volume)

    async def _announce(
        self, event: type[ObjectStored] | type[ObjectRemoved], pin: Pin, volume: str
    ) -> None:
        assert self.publisher is not None
        await self.publisher.publish_event(
            event(
                root=pin.root,
                size=pin.size,
                blocks=pin.blocks,
                volume=volume,
                owner=pin.owner,
                name=pin.name,
                metadata=dict(pin.metadata),
            )
        )
        self.metrics.events_published.labels(event.TYPE).inc()
        if self._heartbeat is not None:
            self._heartbeat.soon()  # the volume's usage changed: tell the domain now

    async def _inventory_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.inventory)
            with contextlib.suppress(CimPlaceError, nats.errors.Error, TimeoutError):
                await self.publish_inventory()

    async def publish_inventory(self) -> None:
        """Announce a digest of every root held per volume, for drift detection."""
        assert self.publisher is not None
        for name, store in self.volumes.items():
            taken_at = time.time()
            pins = store.pins.list()
            await self.publisher.publish_event(
                InventoryDigest(
                    volume=name,
                    pins=len(pins),
                    size=sum(pin.size for pin in pins),
                    digest=inventory_digest(pin.root for pin in pins),
                    taken_at=taken_at,
                )
            )

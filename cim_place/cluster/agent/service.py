"""The leaf agent: the composition root of one node's services.

An agent owns the volumes of its node and, connected to its leaf's nats-server:

1. keeps an outbox stream in the leaf's own JetStream domain and attaches it to the hub's event
   store, so events published while the hub is away arrive later, exactly once;
2. announces every pin and unpin (``ObjectStored`` / ``ObjectRemoved``) and, periodically, an
   inventory digest of what it holds, so a controller can detect drift;
3. heartbeats its labels, tags and volume usage into KV ``cim-place-nodes``;
4. serves blocks to its peers (on NATS, and in bulk on its block stream), answers who-has
   queries, and accepts uploads (``cim-place add --server``);
5. runs the fetch / drop / verify / repair tasks the controller queues for it;
6. scrubs its volumes in the background and reports damaged replicas
   (:mod:`cim_place.cluster.agent.scrubbing`), and removes the leftovers of failed writes.

Everything here is wiring: each service lives in its own module and is tested there.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import nats.errors
from nats.aio.client import Client

from cim_place import __version__
from cim_place.cluster.agent.config import AgentConfig
from cim_place.cluster.agent.demand import DemandReporter
from cim_place.cluster.agent.inventory import InventoryService
from cim_place.cluster.agent.metrics import AgentMetrics
from cim_place.cluster.agent.repair import (
    RepairLimits,
    refresh_damaged_gauge,
    repair_replica,
    sweep_leftovers_forever,
)
from cim_place.cluster.agent.scrubbing import ForegroundReads, ScrubService
from cim_place.cluster.events.publisher import EventPublisher
from cim_place.cluster.events.sources import attach_leaf, nudge_sources
from cim_place.cluster.events.store import ensure_outbox
from cim_place.cluster.events.types import (
    InventoryDigest,
    NodeJoined,
    ObjectRemoved,
    ObjectStored,
    ReplicaDamaged,
    inventory_digest,
)
from cim_place.cluster.exchange.blocks import BlockServer, VolumeSet
from cim_place.cluster.exchange.fetch import fetch_dag
from cim_place.cluster.exchange.fetch_model import FetchResult, Holder, Labels, request_timeout
from cim_place.cluster.exchange.holders import HolderResponder, find_holders, holder_of
from cim_place.cluster.exchange.ratelimit import BandwidthLimit
from cim_place.cluster.exchange.stream import BlockStreamServer
from cim_place.cluster.exchange.stream_wire import client_tls, server_tls
from cim_place.cluster.exchange.upload_server import UploadService
from cim_place.cluster.nats.connection import connect, jetstream
from cim_place.cluster.nats.envelope import Envelope
from cim_place.cluster.nats.security import AGENT_PREFIX, ReadAccess, identity_of
from cim_place.cluster.state.nodes import (
    Heartbeat,
    NodeRecord,
    VolumeStatus,
    heartbeat_grace,
    list_nodes,
)
from cim_place.cluster.tasks.model import Task
from cim_place.cluster.tasks.outcome import TaskOutcome, TaskResult
from cim_place.cluster.tasks.worker import TaskWorker
from cim_place.errors import CimPlaceError, StoreError, StoreFullError, TransportError
from cim_place.http.node import NodeParts, start_node_http
from cim_place.http.server import HttpServers, Listener
from cim_place.interfaces import BlockSource, Pin, Service
from cim_place.objectstore import dag, leftovers
from cim_place.objectstore.cid import Cid, to_str
from cim_place.objectstore.dagcbor import Value
from cim_place.objectstore.store import ObjectStore
from cim_place.runtime.lifecycle import cancel_and_wait
from cim_place.runtime.logs import bound_node

_log = logging.getLogger(__name__)

GC_DELAY = 5.0
"""Seconds to wait after a drop before collecting garbage, so a burst of drops costs one pass."""
SWEEP_EVERY = 3600.0
"""Seconds between sweeps of every volume. A drop collects only its DAG's blocks; what no drop
names (the gateway's read-through cache, blocks of a fetch that was abandoned) goes here."""
LEFTOVER_SWEEP_EVERY = 60.0
"""Seconds between two sweeps of failed writes' leftover blocks (cheap when there are none)."""


class Agent:
    """One node's agent. ``await start()``, then ``await stop()``; or ``async with``."""

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

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        config = self.config
        self.nc = nc = await connect(
            list(config.servers),
            creds=config.creds,
            name=f"cim-place-agent-{self.node}",
            for_service=True,
        )
        js_leaf = nc.jetstream()
        js_hub = jetstream(nc, config.hub_domain)
        await ensure_outbox(js_leaf, self.node, self.subjects)
        self.publisher = EventPublisher(js_leaf, self.node, subjects=self.subjects)
        self.scrub = scrub = ScrubService(
            nc,
            self.node,
            self.volumes,
            self._publish_damage,
            rate=config.scrub_rate,
            interval=config.scrub_interval,
            metrics=self.metrics,
            subjects=self.subjects,
        )

        stores = list(self.volumes.values())
        blocks = VolumeSet([s.blocks for s in stores])
        # Serving peers is foreground work: the scrub yields to it.
        served = ForegroundReads(blocks, scrub.touch)
        # Object access is enforced once the domain authenticates its users (the agent's own
        # server URL names its user); in an open domain every requester is anonymous.
        access = ReadAccess(self._pin_of, blocks) if identity_of(config.servers) else None
        self._blocks = BlockServer(nc, self.node, served, subjects=self.subjects, access=access)
        # A block refused as corrupt damages the replicas that hold it: re-check and report.
        self._blocks.stats.on_corrupt = scrub.suspect
        self._blocks.on_read = self._record_served
        self._stream = None
        if config.stream_listen is not None:
            # Bulk blocks go over a direct TCP stream; grants (and access checks) stay on NATS.
            # Its blocks count in the BlockServer's stats, so metrics cover both paths.
            self._stream = BlockStreamServer(
                served,
                listen=config.stream_listen,
                advertise=config.stream_advertise,
                access=access,
                serve_stats=self._blocks.stats,
                tls=self._stream_server_tls(),
            )
            await self._stream.start()
            self._blocks.stream = self._stream
        self._holders = HolderResponder(
            nc,
            self.node,
            [s.pins for s in stores],
            labels=config.labels,
            subjects=self.subjects,
            blocks=blocks if access is None else None,  # unpinned blocks: served when open
        )
        self._uploads = UploadService(
            nc,
            self.node,
            self._volume_for,
            subjects=self.subjects,
            on_pinned=self._uploaded,
            # Owners come from who NATS says uploads, once the domain authenticates users.
            authenticated=access is not None,
            public_uploaders=frozenset(config.public_uploaders),
        )
        inventory = InventoryService(
            nc,
            self.node,
            self.volumes,
            stored=self._announce_stored,
            removed=self._announce_removed,
            subjects=self.subjects,
        )
        # Read paths call self.demand.record_read; counts leave once per interval.
        self.demand = DemandReporter(nc, self.subjects, self.node)
        self._services = [
            self._blocks,
            self._holders,
            self._uploads,
            scrub,
            inventory,
            self.demand,
        ]
        if self._stream is not None:
            self._services.insert(0, self._stream)
        for service in self._services:
            await service.start()
        builders = list(self.http_extra)
        if config.s3 is not None:
            builders.append(_s3_listener)
        extra = [build(self) for build in builders]
        if config.http is not None or extra:
            # Before the first heartbeat, which is what `cim-place up` waits for: a node that
            # is up answers HTTP.
            self.http = await start_node_http(
                self._http_parts(
                    # Gateway reads yield the scrub too, and report a corrupt local block.
                    ForegroundReads(blocks, scrub.touch, scrub.suspect),
                    access is not None,
                ),
                config.http,
                extra,
            )

        self._heartbeat = Heartbeat(
            js_hub, self.record, interval=config.heartbeat, on_restored=self.hub_link_restored
        )
        await self._heartbeat.start()
        self._worker = TaskWorker(
            nc,
            self.node,
            self.run_task,
            publish_event=self._publish_task_event,
            concurrency=config.task_concurrency,
            max_attempts=config.task_max_attempts,
            subjects=self.subjects,
            hub_domain=config.hub_domain,
            on_result=self._observe_task,
        )
        await self._worker.start()
        if config.metrics:
            self.metrics.serve(config.metrics)
        self._background = [
            asyncio.create_task(self._attach_to_hub(), name="cim-place-attach"),
            asyncio.create_task(self._inventory_loop(), name="cim-place-inventory"),
            asyncio.create_task(self._gc_loop(), name="cim-place-gc"),
            asyncio.create_task(
                sweep_leftovers_forever(self.volumes, LEFTOVER_SWEEP_EVERY),
                name="cim-place-leftovers",
            ),
        ]
        await self.publisher.publish_event(
            NodeJoined(
                node=self.node,
                labels=dict(config.labels),
                tags=tuple(config.tags),
                volumes=tuple(v.name for v in config.volumes),
                version=__version__,
                started_at=self.started_at,
            )
        )
        _log.info("agent %s started with %d volume(s)", self.node, len(self.volumes))

    def _http_parts(self, blocks: BlockSource, secured: bool) -> NodeParts:
        assert self.nc is not None
        return NodeParts(
            nc=self.nc,
            node=self.node,
            subjects=self.subjects,
            hub_domain=self.config.hub_domain,
            blocks=blocks,
            stores=list(self.volumes.values()),
            cache_volume=lambda: self._volume_for(None),
            pin_of=self._pin_of,
            near=self.near,
            stream_tls=self.stream_client_tls,
            secured=secured,
            record_read=self._record_read,
        )

    def _record_read(self, root: Cid, requester: str | None, size: int) -> None:
        """A read served here to a client of this node (the gateway): demand at this node."""
        if self.demand is not None:
            local = self._pin_of(root) is not None
            self.demand.record_read(root, self.node, requester or "", size, local)

    def _record_served(self, root: Cid, requester: str | None) -> None:
        """An object read from this node's blocks by a client (``get``, an application): a
        local read here. Agents' requests are fetches for tasks (cached copies included:
        counting them would make a cache fill look like demand), and an anonymous requester
        (an open domain) cannot be told from an agent: neither is counted."""
        if self.demand is None or requester is None or requester.startswith(AGENT_PREFIX):
            return
        pin = self._pin_of(root)
        self.demand.record_read(root, self.node, requester, pin.size if pin else 0, True)

    def _stream_server_tls(self) -> ssl.SSLContext | None:
        cert, key = self.config.stream_tls_cert, self.config.stream_tls_key
        if cert is None or key is None:
            return None
        try:
            return server_tls(cert, key)
        except (OSError, ssl.SSLError) as exc:
            raise CimPlaceError(
                f"cannot load the block stream's TLS certificate {cert} and key {key}: {exc}; "
                "check blocks.tls in the agent configuration (PEM files readable by the agent)"
            ) from None

    async def stop(self, grace: float = 10.0) -> None:
        if self.http is not None:
            await self.http.stop()
            self.http = None
        if self._worker is not None:
            await self._worker.stop(grace=grace)
            self._worker = None
        await cancel_and_wait(self._background)
        self._background = []
        if self._heartbeat is not None:
            await self._heartbeat.stop()
            self._heartbeat = None
        for service in reversed(self._services):
            with contextlib.suppress(Exception):
                await service.stop()
        self._services = []
        if self.publisher is not None:
            await self.publisher.close()
            self.publisher = None
        if self.nc is not None:
            # Everything that publishes was awaited above; close rather than drain, which waits
            # for subscriptions nobody reads any more (the KV watchers) until its 30 s limit.
            with contextlib.suppress(Exception):
                await self.nc.close()
            self.nc = None
        for store in self.volumes.values():
            store.close()

    async def __aenter__(self) -> Agent:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

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

    async def _attach_to_hub(self) -> None:
        """Attach the outbox to the hub's event store; retried until the hub answers.

        After a reconnection the hub's own retry schedule can delay catch-up by minutes, so a
        reconnect also nudges the source (see eventstore.nudge_sources).
        """
        assert self.nc is not None
        js_hub = jetstream(self.nc, self.config.hub_domain)
        attached = False
        delay = 0.5
        while True:
            try:
                if not attached:
                    await attach_leaf(js_hub, self.node)
                    attached = True
                    delay = 0.5
                await self._reconnected.wait()
                self._reconnected.clear()
                await nudge_sources(js_hub, self.node)
            except (CimPlaceError, nats.errors.Error, TimeoutError) as exc:
                _log.debug("event store attach of %s: %s", self.node, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    def hub_link_restored(self) -> None:
        """The hub answers again after heartbeats failed: nudge the event-store source."""
        self._reconnected.set()

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


def _s3_listener(agent: Agent) -> Listener:
    """The node's S3-compatible API on its own listener (``s3.listen``), over the agent's own
    volumes, pins and events: an S3 put is an upload, a delete an unpin."""
    from cim_place.http.s3.app import S3Node, build_s3_app

    assert agent.nc is not None and agent.publisher is not None and agent.config.s3 is not None
    listen, region = agent.config.s3
    node = S3Node(
        node=agent.node,
        volumes=agent.volumes,
        volume_for=agent._volume_for,
        js_hub=jetstream(agent.nc, agent.config.hub_domain),
        events=agent.publisher,
        on_pinned=agent._uploaded,
        on_unpinned=agent._announce_removed,
        nc=agent.nc,
        subjects=agent.subjects,
        on_read=agent._record_read,
        names_writable=not identity_of(agent.config.servers),  # agents may not write names
    )
    return Listener("s3", build_s3_app(node, region=region), listen=listen)


async def run_agent(config: AgentConfig, stop: asyncio.Event) -> None:
    """Run an agent until ``stop`` is set (the CLI sets it on SIGINT/SIGTERM)."""
    agent = Agent(config)
    try:
        with bound_node(config.node):
            await agent.start()
    except BaseException:
        await agent.stop(grace=0)
        raise
    try:
        await stop.wait()
    finally:
        await agent.stop()


def describe(config: AgentConfig) -> str:
    volumes = ", ".join(f"{v.name}={Path(v.path)}" for v in config.volumes)
    return f"agent {config.node} on {', '.join(config.servers)}; volumes {volumes}"


__all__ = ["Agent", "TransportError", "describe", "run_agent"]

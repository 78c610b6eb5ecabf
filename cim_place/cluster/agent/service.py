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

Its state and announcements are in :mod:`cim_place.cluster.agent.node_state`, the tasks in
:mod:`cim_place.cluster.agent.task_runner`. Everything here is wiring: each service lives in its
own module and is tested there.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from pathlib import Path

import nats.errors

from cim_place import __version__
from cim_place.cluster.agent.config import AgentConfig
from cim_place.cluster.agent.demand import DemandReporter
from cim_place.cluster.agent.inventory import InventoryService
from cim_place.cluster.agent.repair import (
    sweep_leftovers_forever,
)
from cim_place.cluster.agent.scrubbing import ForegroundReads, ScrubService
from cim_place.cluster.agent.task_runner import AgentTasks
from cim_place.cluster.events.publisher import EventPublisher
from cim_place.cluster.events.sources import attach_leaf, nudge_sources
from cim_place.cluster.events.store import ensure_outbox
from cim_place.cluster.events.types import (
    NodeJoined,
)
from cim_place.cluster.exchange.blocks import BlockServer, VolumeSet
from cim_place.cluster.exchange.holders import HolderResponder
from cim_place.cluster.exchange.stream import BlockStreamServer
from cim_place.cluster.exchange.stream_wire import server_tls
from cim_place.cluster.exchange.upload_server import UploadService
from cim_place.cluster.nats.connection import connect, jetstream
from cim_place.cluster.nats.security import AGENT_PREFIX, ReadAccess, identity_of
from cim_place.cluster.state.nodes import (
    Heartbeat,
)
from cim_place.cluster.tasks.worker import TaskWorker
from cim_place.errors import CimPlaceError, TransportError
from cim_place.http.node import NodeParts, start_node_http
from cim_place.http.server import Listener
from cim_place.interfaces import BlockSource
from cim_place.objectstore.cid import Cid
from cim_place.runtime.lifecycle import cancel_and_wait
from cim_place.runtime.logs import bound_node

_log = logging.getLogger(__name__)

LEFTOVER_SWEEP_EVERY = 60.0
"""Seconds between two sweeps of failed writes' leftover blocks (cheap when there are none)."""


class Agent(AgentTasks):
    """One node's agent. ``await start()``, then ``await stop()``; or ``async with``."""

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

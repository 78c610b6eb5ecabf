"""A whole cim-place domain on one machine, as supervised processes: the library behind `up`.

:class:`LocalDomain` owns, under one directory:

- ``hub/``: the hub (JetStream domain ``hub``) with its store: one server, or with
  ``hub_servers=3`` a JetStream cluster of three (cim_place.local.hubs), each member supervised;
- ``nodes/<node>/nats/``: one leaf server per node (JetStream domain = the node id
  ``leaf-1``..``leaf-N``), linked to the hub;
- ``nodes/<node>/v0/``: the node's one volume, served by the node's agent, a process of its own
  (``cim-place agent --config nodes/<node>/agent.yaml``, log ``nodes/<node>/agent.log``),
  labelled ``zone-1``..``zone-Z`` round robin and ``host`` = the node id;
- ``controller-N.log``: the controllers, one process each (the first leads, the others stand by);
- ``domain.json``: the ports it used, so a restart comes back on the same URLs.

Every process is supervised (:class:`cim_place.local.supervisor.Supervisor`): one that exits or
is killed is started again with back-off, and :meth:`LocalDomain.processes` lists what runs now.

Start-up is readiness-driven, never timed: servers answer ``/healthz``, leaves are linked, the
event store and task stream exist, every agent has written a heartbeat, the default policy is
applied when none is, and the controller runs. Stopping reverses it. Starting again over the
same directory resumes the same state: the servers' stores and the volumes are kept, and the
previous ports are reused when free.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

from nats.js import JetStreamContext

from cim_place.cluster.events.store import ensure_event_store
from cim_place.cluster.nats.connection import connect, jetstream
from cim_place.cluster.nats.security import ACCOUNT, CONTROLLER
from cim_place.cluster.nats.subjects import HUB_DOMAIN
from cim_place.cluster.nats.users import render_accounts
from cim_place.cluster.state.lease import LeaderRecord, read_leader
from cim_place.cluster.state.nodes import list_nodes
from cim_place.cluster.state.policies import PolicyStore
from cim_place.cluster.tasks.queue import ensure_task_stream
from cim_place.errors import CimPlaceError, PortTakenError, TransportError
from cim_place.http.s3.keys import ensure_operator_key
from cim_place.local.credentials import plan_local, with_user
from cim_place.local.domain_layout import READY_TIMEOUT, DomainLayout, DomainNode
from cim_place.local.hubs import Ports, start_local_hub
from cim_place.local.link_proxy import LinkProxy
from cim_place.local.server_spec import ServerSpec
from cim_place.local.servers import NatsServer
from cim_place.local.supervisor import Command, Supervisor
from cim_place.local.topologies import Hub
from cim_place.policies.validate import LoadedPolicies, load_paths, load_text

__all__ = ["LocalDomain", "PortTakenError", "default_policy"]

_log = logging.getLogger(__name__)

_POLL = 0.05
_LIST_POLL = 0.25
CONTROLLER_IDENTITY = "cim-place-up"

# The default policy when deploy/policies/default.yaml is not beside the package (an installed
# wheel): the same three copies in different zones.
_DEFAULT_POLICY = """\
name: default
description: Three copies, one per zone while there are enough zones.
replicas: 3
spread:
  domain: host
  max_per_domain: 1
repair:
  grace: 15m
  max_concurrent: 4
  bandwidth: 50MiB/s
"""


def default_policy() -> LoadedPolicies:
    """The policy ``up`` applies when none is: ``deploy/policies/default.yaml`` of the source
    tree when present, else the same policy built in."""
    beside = Path(__file__).resolve().parents[2] / "deploy" / "policies" / "default.yaml"
    if beside.is_file():
        return load_paths([str(beside)])
    return load_text(_DEFAULT_POLICY, "<built-in default policy>")


class LocalDomain(DomainLayout):
    """A hub, ``leaves`` leaf nodes with agents and a controller, under ``directory``.

    ``await start()`` returns once the domain is ready; ``await stop()`` stops everything.
    ``notes`` collects what an operator should know (a port changed, the default policy applied,
    the controller missing). ``hub_port`` asks for a given client port for the hub: if it is
    taken, start raises :class:`PortTakenError` naming it (otherwise ports are chosen freely).
    """

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self, progress: Callable[[str], None] | None = None) -> None:
        """Start everything and wait until it is ready; on any failure stop what started."""
        say = progress or (lambda _message: None)
        self.started_at = time.time()
        with self._spawn_lock:
            self._closing = False
        self.directory.mkdir(parents=True, exist_ok=True)
        ports = self._load_ports()
        self.credentials = plan_local(self.directory, self.node_ids())
        try:
            await asyncio.to_thread(self._adopt_open_stores)
            say("starting the hub")
            self.hub = await asyncio.to_thread(self._start_hub, ports)
            say(f"starting {self.leaves} leaf server(s)")
            self.nodes = list(
                await asyncio.gather(
                    *(
                        asyncio.to_thread(self._start_leaf, index, node, ports)
                        for index, node in enumerate(self.node_ids())
                    )
                )
            )
            for started in self.nodes:
                self._supervise("leaf-server", started.node, started.server)
            self.credentials.write(self.hub_urls, {node.node: node.url for node in self.nodes})
            # `up` itself prepares the streams and the default policy: the controller's rights.
            self._nc = await connect(
                self.credentials.url(CONTROLLER, self.hub_urls), name="cim-place-up"
            )
            js_hub = jetstream(self._nc, HUB_DOMAIN)
            # The agents attach to the event store and consume the task stream: both must exist
            # before them (a controller would create them too; both calls are idempotent).
            replicas = min(3, self.hub_servers)
            await ensure_event_store(js_hub, replicas=replicas)
            await ensure_task_stream(js_hub, replicas)
            self.s3_key = (await ensure_operator_key(js_hub)).to_context()
            say("starting the agents")
            self._start_agents(ports)
            self._save_ports(ports)
            self.supervisor.start()
            await self._wait_heartbeats()
            if self.apply_default_policy:
                await self._ensure_policy()
            await self._start_controllers(say)
        except BaseException:
            await self.stop()
            raise

    @property
    def controller(self) -> bool:
        """True once the controllers were started."""
        return any(s.role == "controller" for s in self.supervisor.children)

    def processes(self) -> list[dict[str, object]]:
        """Every process of the domain as it runs now: role, node, pid (for context.json)."""
        return self.supervisor.processes()

    async def stop(self) -> None:
        """Stop the controllers, the agents, the leaf servers, then the hub. Safe to call twice."""
        with self._spawn_lock:
            self._closing = True
            spawned, self._spawned = self._spawned, []
            supervisor = self.supervisor
            self.supervisor = Supervisor(on_change=self._changed, after_restart=self._ready_again)
        # Our own connection closes first: a server that closes a connection leaves its port in
        # TIME_WAIT, which would keep a resumed domain off the same port.
        if self._nc is not None:
            with contextlib.suppress(Exception):
                await self._nc.close()
            self._nc = None
        await supervisor.stop(timeout=10.0)
        self.nodes = []
        self.hub = None
        # Servers started but not yet supervised when a start was interrupted.
        await asyncio.to_thread(self._stop_servers, spawned)

    @staticmethod
    def _stop_servers(servers: list[NatsServer]) -> None:
        for server in reversed(servers):  # the leaves, then the hub
            server.stop()

    # -- servers --------------------------------------------------------------------------------

    def _adopt_open_stores(self) -> None:
        """Carry a domain started before authentication over to it.

        An open server keeps JetStream state under the global account (``jetstream/$G``); with
        users, the same state belongs to account ``CIM``. The stores are moved once, while no
        server runs; a directory holding both cannot be merged and is refused with what to do.
        """
        stores = [self.directory / "hub" / "jetstream"]
        stores += [self.directory / "nodes" / n / "nats" / "jetstream" for n in self.node_ids()]
        for store in stores:
            old, new = store / "jetstream" / "$G", store / "jetstream" / ACCOUNT
            if not old.is_dir():
                continue
            if new.exists():
                raise CimPlaceError(
                    f"{store} holds state of both the open layout ($G) and the authenticated "
                    f"one ({ACCOUNT}); remove {old} (or the whole directory) and start again"
                )
            shutil.move(str(old), str(new))
            self.notes.append(f"moved {old} to {new} (the domain now runs with users)")

    def _start_hub(self, ports: dict[str, Ports]) -> Hub:
        hub = start_local_hub(
            self.directory / "hub",
            self.hub_servers,
            ports,
            self.notes,
            accounts=render_accounts(self.credentials.plan.hub),
            spawn=self._spawn,
            hub_port=self.hub_port,
            timeout=READY_TIMEOUT,
        )
        for server in hub.servers:
            # A clustered hub's members are told apart by name (hub-1..N) in context.json.
            self._supervise("hub", server.name if self.hub_servers > 1 else None, server)
        return hub

    def _start_leaf(self, index: int, node: str, ports: dict[str, Ports]) -> DomainNode:
        assert self.hub is not None
        hub = self.hub
        saved = ports.setdefault(node, Ports())
        directory = self.directory / "nodes" / node / "nats"

        link_user = self.credentials.plan.leaf_links[node]

        def build() -> NatsServer:
            link = LinkProxy(hub.leaf_targets) if self.link_proxies else None
            remotes = [link.url] if link is not None else hub.leaf_urls
            spec = ServerSpec(
                server_name=node,
                store_dir=directory / "jetstream",
                domain=node,
                port=saved.choose("port", f"{node} client", self.notes),
                http_port=saved.choose("http_port", f"{node} monitoring", self.notes),
                leaf_remotes=[with_user(u, link_user.name, link_user.password) for u in remotes],
                leaf_reconnect=0.25,
                leaf_ignore_discovered=link is not None,
                leaf_account=ACCOUNT,
                extra=render_accounts(self.credentials.plan.leaves[node]),
            )
            server = NatsServer(spec, directory)
            server.link = link
            server = self._spawn(server)
            try:
                server.wait_ready(READY_TIMEOUT).wait_leaf_connected(timeout=READY_TIMEOUT)
                hub.wait_leaf(node, timeout=READY_TIMEOUT)
            except BaseException:
                server.stop()
                raise
            return server

        server = self._with_port_retry(build, saved, f"leaf {node}")
        # Supervised by start() in node order once every leaf is up (they start concurrently).
        return DomainNode(node, self.zone_of(index), server, self.volume_dir(node))

    def _with_port_retry(
        self, build: Callable[[], NatsServer], saved: Ports, what: str
    ) -> NatsServer:
        """Run ``build``; if a port was taken between the check and the bind, retry with new
        ports (the client port too: another process holds it now)."""
        for attempt in range(3):
            try:
                return build()
            except TransportError as error:
                if "address already in use" not in str(error) or attempt == 2:
                    raise
                taken = dict(saved.values)
                saved.values.clear()
                self.notes.append(f"{what}: a port of {sorted(taken.values())} was taken; retrying")
        raise AssertionError("unreachable")

    # -- agents, policy, controller -----------------------------------------------------------

    def _cli(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "cim_place.cli", *args, *self.log_flags]

    def _start_agents(self, ports: dict[str, Ports]) -> None:
        """One agent process per leaf, configured by a file beside its server's directory."""
        for index, node in enumerate(self.nodes):
            path = self._write_agent_config(index, node, ports)
            command = Command(
                self._cli("agent", "--config", str(path)),
                self.directory / "nodes" / node.node / "agent.log",
            )
            self._supervise("agent", node.node, command)

    async def _wait_heartbeats(self) -> None:
        """Until every agent's heartbeat of this run is in the nodes bucket."""
        assert self._nc is not None
        js_hub = jetstream(self._nc, HUB_DOMAIN)
        wanted = {node.node for node in self.nodes}
        deadline = time.monotonic() + READY_TIMEOUT
        while True:
            fresh = {
                record.node
                for record in await list_nodes(js_hub)
                if record.heartbeat_at >= self.started_at - 1.0
            }
            missing = wanted - fresh
            if not missing:
                return
            if time.monotonic() > deadline:
                raise TransportError(
                    f"agent(s) {', '.join(sorted(missing))} did not heartbeat within "
                    f"{READY_TIMEOUT:.0f} s; see nodes/<node>/agent.log under {self.directory}"
                )
            # Each listing opens a consumer on the bucket: look a few times a second, no more.
            await asyncio.sleep(_LIST_POLL)

    async def _ensure_policy(self) -> None:
        assert self._nc is not None
        store = await PolicyStore.open(jetstream(self._nc, HUB_DOMAIN), create=True)
        current = await store.load()
        if current.policy_set.policies:
            return
        result = await store.apply(default_policy(), actor="cim-place up")
        if result.written:
            self.policy_applied = True
            self.notes.append(
                f"applied the default policy (3 copies in different zones), revision "
                f"{result.revision}"
            )

    async def _start_controllers(self, say: Callable[[str], None]) -> None:
        """Start the controllers and wait until one of them leads."""
        assert self.hub is not None and self._nc is not None
        say("starting the controller" + ("s" if self.controllers > 1 else ""))
        for index in range(self.controllers):
            # Stable identities: the controllers of a resumed domain are the same ones.
            identity = CONTROLLER_IDENTITY if index == 0 else f"{CONTROLLER_IDENTITY}-{index + 1}"
            # The URL with the controller's password goes through the environment, not argv
            # (which every local user can read in the process list).
            command = Command(
                self._cli("controller", "--identity", identity),
                self.directory / f"controller-{index + 1}.log",
                env={
                    # Grown columns go back to the system (docs/SCALE.md); an operator's own
                    # setting wins.
                    "MALLOC_MMAP_THRESHOLD_": "131072",
                    **os.environ,
                    "CIM_PLACE_SERVER": self.credentials.url(CONTROLLER, self.hub_urls),
                },
            )
            self._supervise("controller", None, command)
        js_hub = jetstream(self._nc, HUB_DOMAIN)
        deadline = time.monotonic() + READY_TIMEOUT
        while (await self._leader_or_none(js_hub)) is None:
            if time.monotonic() > deadline:
                raise TransportError(
                    f"no controller took the lead within {READY_TIMEOUT:.0f} s; see "
                    f"{self.directory / 'controller-1.log'}"
                )
            await asyncio.sleep(_POLL)

    @staticmethod
    async def _leader_or_none(js_hub: JetStreamContext) -> LeaderRecord | None:
        # A clustered hub answers for a new bucket only once its stream has a leader: a timeout
        # before that is "no leader yet", as the start-up deadline decides.
        try:
            return await read_leader(js_hub)
        except TransportError:
            return None

    async def __aenter__(self) -> LocalDomain:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

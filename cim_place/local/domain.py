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
import hashlib
import json
import logging
import os
import secrets
import shutil
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml
from nats.aio.client import Client
from nats.js import JetStreamContext

from cim_place.cluster.events.store import ensure_event_store
from cim_place.cluster.nats.connection import connect, jetstream
from cim_place.cluster.nats.security import ACCOUNT, CONTROLLER, OPERATOR, agent_user
from cim_place.cluster.nats.subjects import HUB_DOMAIN
from cim_place.cluster.nats.users import render_accounts
from cim_place.cluster.state.leader import LeaderRecord, read_leader
from cim_place.cluster.state.nodes import list_nodes
from cim_place.cluster.state.policies import PolicyStore
from cim_place.cluster.tasks.queue import ensure_task_stream
from cim_place.errors import CimPlaceError, PortTakenError, TransportError
from cim_place.http.s3.keys import ensure_operator_key
from cim_place.http.settings import OFF, parse_listen
from cim_place.local.credentials import ADMIN, LocalCredentials, plan_local, with_user
from cim_place.local.hubs import MAX_HUB_SERVERS, Ports, start_local_hub
from cim_place.local.link_proxy import LinkProxy
from cim_place.local.server_spec import ServerSpec
from cim_place.local.servers import NatsServer
from cim_place.local.supervisor import Command, Supervised, Supervisor
from cim_place.local.topologies import Hub
from cim_place.policies.validate import LoadedPolicies, load_paths, load_text

__all__ = ["DomainNode", "LocalDomain", "PortTakenError", "default_policy"]

_log = logging.getLogger(__name__)

STATE_FILE = "domain.json"
VOLUME = "v0"
DEFAULT_HTTP = "127.0.0.1:0"
"""Every node's gateway on a free loopback port."""
_READY_TIMEOUT = 60.0
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


@dataclass(frozen=True, slots=True)
class DomainNode:
    """One leaf node as started: id, zone, its server, its volume directory."""

    node: str
    zone: str
    server: NatsServer
    volume: Path

    @property
    def url(self) -> str:
        return self.server.url


class LocalDomain:
    """A hub, ``leaves`` leaf nodes with agents and a controller, under ``directory``.

    ``await start()`` returns once the domain is ready; ``await stop()`` stops everything.
    ``notes`` collects what an operator should know (a port changed, the default policy applied,
    the controller missing). ``hub_port`` asks for a given client port for the hub: if it is
    taken, start raises :class:`PortTakenError` naming it (otherwise ports are chosen freely).
    """

    def __init__(
        self,
        directory: Path,
        *,
        leaves: int = 3,
        zones: int = 3,
        hub_port: int | None = None,
        heartbeat: float = 5.0,
        apply_default_policy: bool = True,
        controllers: int = 1,
        hub_servers: int = 1,
        log_flags: tuple[str, ...] = (),
        link_proxies: bool = False,
        http_listen: str | None = DEFAULT_HTTP,
        scrub: dict[str, str] | None = None,
        inventory: float | None = None,
    ) -> None:
        if leaves < 1:
            raise CimPlaceError(f"a domain needs at least one leaf node, not {leaves}")
        if zones < 1:
            raise CimPlaceError(f"a domain needs at least one zone, not {zones}")
        if controllers < 1:
            raise CimPlaceError(f"a domain needs at least one controller, not {controllers}")
        if not 1 <= hub_servers <= MAX_HUB_SERVERS:
            raise CimPlaceError(
                f"a hub has 1 to {MAX_HUB_SERVERS} servers (3 survive the loss of one), "
                f"not {hub_servers}"
            )
        self.directory = Path(directory).resolve()
        self.leaves = leaves
        self.zones = zones
        self.hub_port = hub_port
        self.hub_servers = hub_servers
        self.heartbeat = heartbeat
        self.apply_default_policy = apply_default_policy
        self.http_listen = http_listen
        """Where each node's gateway listens (port 0: a free one; port N: N + the node's
        index); None: no gateway."""
        if http_listen is not None:
            parse_listen(http_listen, what="the gateways' listen address")
        self._http_urls: dict[str, str] = {}
        self._s3_urls: dict[str, str] = {}
        self.notes: list[str] = []
        self.hub: Hub | None = None
        self.nodes: list[DomainNode] = []
        self.controllers = controllers
        # Each leaf's link to the hub through a LinkProxy that fault tests cut, restore and slow.
        self.link_proxies = link_proxies
        self.log_flags = log_flags
        # The agents' `scrub` section (interval, rate), as `up --scrub-*` gave it.
        self.scrub = dict(scrub or {})
        # Seconds between the agents' inventory digests (None: the agents' default).
        self.inventory = inventory
        # Called after a supervised process was restarted (its pid changed): `up` rewrites
        # context.json from it.
        self.on_change: Callable[[], None] | None = None
        self.supervisor = Supervisor(on_change=self._changed, after_restart=self._ready_again)
        self.policy_applied = False
        self.s3_key: dict[str, str] | None = None
        """The domain's S3 operator key (access_key, secret_key, region) once started."""
        self.started_at = 0.0
        # Every process runs as its own NATS user (docs/SECURITY.md); new passwords each start.
        self.credentials: LocalCredentials = plan_local(self.directory, self.node_ids())
        self.dashboard_token = secrets.token_urlsafe(24)
        """The operator's token for the nodes' dashboards (new on every start)."""
        self._nc: Client | None = None
        # Every server process started, in order, so stop() reaches those still being waited on
        # in a thread when a start is cancelled (Ctrl-C): stopping them ends those waits at once.
        self._spawned: list[NatsServer] = []
        self._spawn_lock = threading.Lock()
        self._closing = False

    # -- layout ---------------------------------------------------------------------------------

    def node_ids(self) -> list[str]:
        return [f"leaf-{index + 1}" for index in range(self.leaves)]

    def zone_of(self, index: int) -> str:
        return f"zone-{index % self.zones + 1}"

    def volume_dir(self, node: str) -> Path:
        return self.directory / "nodes" / node / VOLUME

    @property
    def hub_url(self) -> str:
        if self.hub is None:
            raise RuntimeError("the domain is not started")
        return self.hub.url

    @property
    def hub_urls(self) -> str:
        """Every hub member's client URL, comma-separated (what a client that should fail over
        from one member to the next is given)."""
        if self.hub is None:
            raise RuntimeError("the domain is not started")
        return ",".join(self.hub.urls)

    def _load_ports(self) -> dict[str, Ports]:
        path = self.directory / STATE_FILE
        try:
            doc = json.loads(path.read_text())
            return {
                str(name): Ports({str(k): int(v) for k, v in ports.items()})
                for name, ports in doc.get("ports", {}).items()
            }
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, AttributeError, TypeError) as exc:
            self.notes.append(f"{path} was unreadable ({exc}); chose new ports")
            return {}

    def _save_ports(self, ports: dict[str, Ports]) -> None:
        path = self.directory / STATE_FILE
        doc = {"ports": {name: p.values for name, p in sorted(ports.items())}}
        partial = path.with_name(STATE_FILE + ".partial")
        partial.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
        partial.replace(path)

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

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change()

    def _ready_again(self, supervised: Supervised) -> None:
        """After a restart, in a thread: wait until a server is healthy (and a leaf linked)."""
        if isinstance(supervised.child, NatsServer):
            supervised.child.wait_ready(_READY_TIMEOUT)
            if supervised.role == "leaf-server":
                supervised.child.wait_leaf_connected(timeout=_READY_TIMEOUT)

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

    def _spawn(self, server: NatsServer) -> NatsServer:
        """Start ``server``'s process and record it, unless the domain is being stopped."""
        with self._spawn_lock:
            if self._closing:
                raise CimPlaceError(f"not starting {server.name}: the domain is stopping")
            self._spawned.append(server)
            return server.start()

    def _supervise(self, role: str, node: str | None, child: NatsServer | Command) -> None:
        with self._spawn_lock:
            if self._closing:
                child.stop()
                raise CimPlaceError(f"not starting {role} {node or ''}: the domain is stopping")
            self.supervisor.add(role, node, child)

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
            timeout=_READY_TIMEOUT,
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
                server.wait_ready(_READY_TIMEOUT).wait_leaf_connected(timeout=_READY_TIMEOUT)
                hub.wait_leaf(node, timeout=_READY_TIMEOUT)
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

    def agent_config_path(self, node: str) -> Path:
        return self.directory / "nodes" / node / "agent.yaml"

    def _gateway_listen(self, index: int, node: str, ports: dict[str, Ports]) -> str | None:
        """host:port of ``node``'s gateway: port N + index, or a free port kept in domain.json
        (chosen here, so that context.json can name it before the agent process binds it)."""
        if self.http_listen is None:
            return None
        host, port = parse_listen(self.http_listen)
        if not port:
            port = ports.setdefault(node, Ports()).choose("gateway", f"{node} gateway", self.notes)
        else:
            port += index
        shown = f"[{host}]" if ":" in host else host
        self._http_urls[node] = f"http://{'127.0.0.1' if host == '0.0.0.0' else shown}:{port}"
        return f"{shown}:{port}"

    def _s3_listen(self, node: str, ports: dict[str, Ports]) -> str | None:
        """host:port of ``node``'s S3 API on loopback: a free port kept in domain.json (the
        same one after a resume), or None when the gateways are off."""
        if self.http_listen is None:
            return None
        port = ports.setdefault(node, Ports()).choose("s3", f"{node} S3", self.notes)
        self._s3_urls[node] = f"http://127.0.0.1:{port}"
        return f"127.0.0.1:{port}"

    def s3_url(self, node: str) -> str:
        """Base URL of ``node``'s S3 API ("" when it has none)."""
        return self._s3_urls.get(node, "")

    def dashboard_url(self, node: str) -> str:
        """``node``'s dashboard with the operator's token ("" when it has no gateway); the page
        trades the token for a cookie and drops it from the address bar."""
        base = self.http_url(node)
        return f"{base}/ui/?token={self.dashboard_token}" if base else ""

    def http_url(self, node: str) -> str:
        """Base URL of ``node``'s gateway ("" when it has none)."""
        return self._http_urls.get(node, "")

    def _start_agents(self, ports: dict[str, Ports]) -> None:
        """One agent process per leaf, configured by a file beside its server's directory."""
        for index, node in enumerate(self.nodes):
            path = self.agent_config_path(node.node)
            document: dict[str, object] = {
                "node": node.node,
                "nats": {
                    "servers": [self.credentials.url(agent_user(node.node), node.url)],
                    "hub_domain": HUB_DOMAIN,
                },
                "labels": {"zone": node.zone, "host": node.node},
                "volumes": [{"name": VOLUME, "path": str(node.volume)}],
                "heartbeat": max(1, round(self.heartbeat)),
            }
            listen = self._gateway_listen(index, node.node, ports)
            http: dict[str, object] = {"listen": listen if listen is not None else OFF}
            if listen is not None:
                # The dashboard answers only the operator once users exist: this token, named
                # (with it) in context.json's dashboard URL.
                digest = hashlib.sha256(self.dashboard_token.encode()).hexdigest()
                http["tokens"] = {digest: OPERATOR}
                # The dashboard reads the locations, the task stream and the task events as the
                # CLI's user here does (an agent's own user may not; the read-only operator may
                # not open a reader on the events); the dashboard code only reads.
                assert self.hub is not None
                http["dashboard_server"] = self.credentials.url(ADMIN, self.hub_urls)
            document["http"] = http
            s3 = self._s3_listen(node.node, ports)
            document["s3"] = {"listen": s3 if s3 is not None else OFF}
            if self.scrub:
                document["scrub"] = dict(self.scrub)
            # What the CLI adds stays public, as before users (gateways serve it to anyone);
            # `add --owner admin` makes an object the CLI's own.
            document["public_uploaders"] = [ADMIN]
            if self.inventory is not None:
                document["inventory"] = max(1, round(self.inventory))
            path.parent.mkdir(parents=True, exist_ok=True)
            # It holds the agent's password: readable by this user only.
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as out:
                out.write(
                    "# Written by `cim-place up` at every start; edits are overwritten.\n"
                    + yaml.safe_dump(document, sort_keys=False)
                )
            os.chmod(path, 0o600)
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
        deadline = time.monotonic() + _READY_TIMEOUT
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
                    f"{_READY_TIMEOUT:.0f} s; see nodes/<node>/agent.log under {self.directory}"
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
                    **os.environ,
                    "CIM_PLACE_SERVER": self.credentials.url(CONTROLLER, self.hub_urls),
                },
            )
            self._supervise("controller", None, command)
        js_hub = jetstream(self._nc, HUB_DOMAIN)
        deadline = time.monotonic() + _READY_TIMEOUT
        while (await self._leader_or_none(js_hub)) is None:
            if time.monotonic() > deadline:
                raise TransportError(
                    f"no controller took the lead within {_READY_TIMEOUT:.0f} s; see "
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

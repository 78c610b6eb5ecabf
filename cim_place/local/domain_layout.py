"""What a local domain is made of and where: settings, directories, ports, URLs, processes.

This module owns :class:`DomainLayout`, the part of :class:`cim_place.local.domain.LocalDomain`
that does not start anything by itself: the settings a domain was created with, where each part
lives under its directory (node ids, zones, volumes), the ports kept in ``domain.json``, the URLs
of the hub, the gateways, the S3 APIs and the dashboards, the file each agent is configured by,
and the bookkeeping of the processes started (spawned servers, the supervisor's children).
``domain.py`` starts and stops the domain on top of it.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml
from nats.aio.client import Client

from cim_place.cluster.nats.security import OPERATOR, agent_user
from cim_place.cluster.nats.subjects import HUB_DOMAIN
from cim_place.errors import CimPlaceError
from cim_place.http.settings import OFF, parse_listen
from cim_place.local.credentials import ADMIN, LocalCredentials, plan_local
from cim_place.local.hubs import MAX_HUB_SERVERS, Ports
from cim_place.local.servers import NatsServer
from cim_place.local.supervisor import Command, Supervised, Supervisor
from cim_place.local.topologies import Hub

__all__ = ["DEFAULT_HTTP", "READY_TIMEOUT", "STATE_FILE", "VOLUME", "DomainLayout", "DomainNode"]

STATE_FILE = "domain.json"
VOLUME = "v0"
DEFAULT_HTTP = "127.0.0.1:0"
"""Every node's gateway on a free loopback port."""
READY_TIMEOUT = 60.0


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


class DomainLayout:
    """A local domain's settings, layout, addresses and processes (see :class:`LocalDomain`)."""

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

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change()

    def _ready_again(self, supervised: Supervised) -> None:
        """After a restart, in a thread: wait until a server is healthy (and a leaf linked)."""
        if isinstance(supervised.child, NatsServer):
            supervised.child.wait_ready(READY_TIMEOUT)
            if supervised.role == "leaf-server":
                supervised.child.wait_leaf_connected(timeout=READY_TIMEOUT)

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

    def _write_agent_config(self, index: int, node: DomainNode, ports: dict[str, Ports]) -> Path:
        """Write ``node``'s agent configuration file (its password in it: mode 0600)."""
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
        return path

"""The topologies cim-place runs on: a single server, a hub (one server or a cluster), leaves.

This module owns ``Hub`` (servers sharing the JetStream domain ``hub``, and the wait for a
whole JetStream cluster), ``start_single``, ``start_hub`` and ``add_leaf`` (a leaf server with
its own JetStream domain, optionally behind a ``LinkProxy``), each retried on fresh ports when
another process takes a port first. ``cim-place up`` and the pytest fixtures in
``cim_place.testing`` are built on it.
"""

from __future__ import annotations

import contextlib
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Self, TypeVar

from cim_place.closing import Closing
from cim_place.errors import PortTakenError, TransportError
from cim_place.local.link_proxy import LinkProxy
from cim_place.local.server_spec import LOCALHOST, ServerSpec, free_port
from cim_place.local.servers import READY_TIMEOUT, NatsServer

__all__ = ["HUB_CLUSTER_NAME", "Hub", "add_leaf", "start_hub", "start_single"]


HUB_CLUSTER_NAME = "cim-hub"


# How often a start is retried with fresh ports when another process took a port between
# free_port() and the server's bind.
_START_ATTEMPTS = 3


@dataclass
class Hub(Closing):
    """A hub: one or more clustered servers sharing the JetStream domain ``domain``."""

    servers: list[NatsServer]
    domain: str
    cluster_name: str | None

    @property
    def urls(self) -> list[str]:
        return [s.url for s in self.servers]

    @property
    def url(self) -> str:
        """The first member's client URL (pass ``urls`` to a client for failover)."""
        return self.servers[0].url

    @property
    def leaf_urls(self) -> list[str]:
        return [s.leaf_url for s in self.servers if s.leaf_url is not None]

    @property
    def leaf_targets(self) -> list[tuple[str, int]]:
        return [
            (s.spec.host, s.spec.leafnode_port)
            for s in self.servers
            if s.spec.leafnode_port is not None
        ]

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> Self:
        """Wait until every member is healthy and the JetStream cluster is whole.

        Whole means: every member is routed to the others and names the same meta leader, and
        that leader sees every other member as a current peer. Before that, creating an R3
        stream can fail for want of peers.
        """
        deadline = time.monotonic() + timeout
        for server in self.servers:
            server.wait_ready(max(0.1, deadline - time.monotonic()))
        if len(self.servers) == 1:
            return self
        while not self._is_whole():
            if time.monotonic() > deadline:
                tails = "\n".join(f"--- {s.name}\n{s.log_tail(8)}" for s in self.servers)
                raise TransportError(
                    f"hub cluster {self.cluster_name} did not form a whole JetStream cluster "
                    f"(routes, meta leader, current peers) within {timeout:.0f} s; "
                    f"logs end with:\n{tails}"
                )
            time.sleep(0.05)
        return self

    def _is_whole(self) -> bool:
        try:
            views = [(s, s.monitor("jsz"), s.monitor("routez")) for s in self.servers]
        except (OSError, ValueError, urllib.error.URLError):
            return False
        others = len(self.servers) - 1
        leaders = {(jsz.get("meta_cluster") or {}).get("leader") for _, jsz, _ in views}
        if len(leaders) != 1 or None in leaders or "" in leaders:
            return False
        if any(int(routez.get("num_routes", 0)) < others for _, _, routez in views):
            return False
        leader = leaders.pop()
        for server, jsz, _ in views:
            if server.name == leader:
                peers = (jsz.get("meta_cluster") or {}).get("replicas") or []
                return len(peers) == others and all(p.get("current") for p in peers)
        return False

    def has_leaf(self, name: str) -> bool:
        """Whether some member has a leafnode connection from the server named ``name``."""
        for server in self.servers:
            with contextlib.suppress(OSError, ValueError, urllib.error.URLError):
                leafz = server.monitor("leafz")
                if any(leaf.get("name") == name for leaf in leafz.get("leafs") or []):
                    return True
        return False

    def wait_leaf(self, name: str, timeout: float = READY_TIMEOUT) -> Self:
        """Block until the leaf server ``name`` is connected to a member of this hub."""
        deadline = time.monotonic() + timeout
        while not self.has_leaf(name):
            if time.monotonic() > deadline:
                raise TransportError(
                    f"leaf {name} did not connect to hub {self.domain} within {timeout:.0f} s; "
                    "check the leaf's log for its remote's errors"
                )
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        for server in self.servers:
            server.stop()

    def __iter__(self) -> Iterator[NatsServer]:
        return iter(self.servers)

    close = stop  # what ``with`` calls on the way out (Closing)


_Started = TypeVar("_Started", NatsServer, Hub)


def _start_with_retry(build: Callable[[], _Started], what: str) -> _Started:
    """Run ``build()`` (which starts and waits), retrying with fresh ports if a port was taken."""
    last: PortTakenError | None = None
    for _ in range(_START_ATTEMPTS):
        try:
            return build()
        except PortTakenError as error:
            last = error
    raise TransportError(f"could not start {what}: ports kept being taken ({last})")


def start_single(
    directory: Path,
    *,
    jetstream: bool = True,
    domain: str | None = None,
    name: str = "cim-single",
    leafnode_port: bool = False,
    max_payload: int | None = None,
) -> NatsServer:
    """Start one standalone server under ``directory`` and wait until it is ready."""
    directory = Path(directory)

    def build() -> NatsServer:
        spec = ServerSpec(
            server_name=name,
            store_dir=directory / "jetstream",
            jetstream=jetstream,
            domain=domain,
            leafnode_port=free_port() if leafnode_port else None,
            max_payload=max_payload,
        )
        server = NatsServer(spec, directory)
        try:
            return server.start().wait_ready()
        except BaseException:
            server.stop()
            raise

    return _start_with_retry(build, f"nats-server in {directory}")


def start_hub(
    directory: Path,
    size: int = 3,
    domain: str = "hub",
    *,
    cluster_name: str = HUB_CLUSTER_NAME,
    max_payload: int | None = None,
    timeout: float = READY_TIMEOUT,
) -> Hub:
    """Start a hub of ``size`` servers (clustered when size > 1), each accepting leaf nodes.

    All members start before any is waited on: a JetStream cluster elects its meta leader only
    once a quorum of routes is up.
    """
    if size < 1:
        raise ValueError(f"a hub needs at least one server, not {size}")
    directory = Path(directory)

    def build() -> Hub:
        cluster_ports = [free_port() for _ in range(size)] if size > 1 else []
        servers: list[NatsServer] = []
        for index in range(size):
            name = f"{domain}-{index + 1}" if size > 1 else domain
            member_dir = directory / name
            spec = ServerSpec(
                server_name=name,
                store_dir=member_dir / "jetstream",
                domain=domain,
                leafnode_port=free_port(),
                max_payload=max_payload,
            )
            if size > 1:
                spec.cluster_name = cluster_name
                spec.cluster_port = cluster_ports[index]
                spec.routes = [
                    f"nats-route://{LOCALHOST}:{p}"
                    for i, p in enumerate(cluster_ports)
                    if i != index
                ]
            servers.append(NatsServer(spec, member_dir))
        hub = Hub(servers=servers, domain=domain, cluster_name=cluster_name if size > 1 else None)
        try:
            for server in servers:
                server.start()
            return hub.wait_ready(timeout)
        except BaseException:
            hub.stop()
            raise

    return _start_with_retry(build, f"hub of {size} in {directory}")


def add_leaf(
    hub: Hub,
    directory: Path,
    name: str,
    *,
    domain: str | None = None,
    via_proxy: bool = False,
    max_payload: int | None = None,
    reconnect: float = 0.25,
    wait_connected: bool = True,
) -> NatsServer:
    """Start a leaf server with its own JetStream domain (default: its name) linked to ``hub``.

    The leaf's remote lists every hub member. With ``via_proxy`` the link goes through a
    ``LinkProxy`` (exposed as ``leaf.link``) that fault tests can cut and restore. ``reconnect``
    is the leaf's retry interval in seconds: short, because on one machine a retry is cheap and a
    restored link should be back quickly.
    """
    directory = Path(directory)
    leaf_domain = domain if domain is not None else name

    def build() -> NatsServer:
        link = LinkProxy(hub.leaf_targets) if via_proxy else None
        remotes = [link.url] if link is not None else hub.leaf_urls
        spec = ServerSpec(
            server_name=name,
            store_dir=directory / "jetstream",
            domain=leaf_domain,
            leaf_remotes=remotes,
            leaf_reconnect=reconnect,
            leaf_ignore_discovered=via_proxy,
            max_payload=max_payload,
        )
        server = NatsServer(spec, directory)
        server.link = link
        try:
            server.start().wait_ready()
            if wait_connected:
                # Both ends: the leaf solicits, and the hub has accepted (so hub clients reach
                # the leaf's domain as soon as this returns).
                server.wait_leaf_connected()
                hub.wait_leaf(name)
            return server
        except BaseException:
            server.stop()
            raise

    return _start_with_retry(build, f"leaf {name} in {directory}")

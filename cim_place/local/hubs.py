"""The hub of a local domain: one nats-server, or a JetStream cluster (`up --hub-servers 3`).

This module owns how :class:`cim_place.local.domain.LocalDomain` lays out and starts its hub:

- one server: server name ``hub``, store ``hub/jetstream``, its ports under ``hub`` in
  ``domain.json`` (the layout of every domain started before clusters existed);
- N servers (3 for a hub that survives the loss of one): server names ``hub-1``..``hub-N`` in
  cluster ``cim-place-hub``, stores ``hub/hub-K/jetstream``, ports (client, monitoring, leafnode,
  route) under ``hub`` for the first member and ``hub-K`` for the others, so a restarted member,
  or a resumed domain, comes back on the same addresses and its routes still reach it.

Every member is started before any is waited on (a JetStream cluster elects its meta leader only
once a quorum is routed), then :meth:`Hub.wait_ready` waits for a whole cluster. It also owns the
port bookkeeping shared with the leaves (:class:`Ports`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from cim_place.cluster.nats.subjects import HUB_DOMAIN
from cim_place.errors import CimPlaceError, PortTakenError, TransportError
from cim_place.local.server_spec import LOCALHOST, ServerSpec, free_port, port_free
from cim_place.local.servers import NatsServer
from cim_place.local.topologies import Hub

__all__ = ["HUB_CLUSTER", "MAX_HUB_SERVERS", "Ports", "member_key", "start_local_hub"]

HUB_CLUSTER = "cim-place-hub"
MAX_HUB_SERVERS = 5
"""JetStream replicas go up to 5; a bigger hub buys nothing on one machine."""


@dataclass
class Ports:
    """The ports of one server, loaded from and saved to ``domain.json``."""

    values: dict[str, int] = field(default_factory=dict)

    def choose(self, role: str, what: str, notes: list[str]) -> int:
        saved = self.values.get(role)
        if saved is not None and port_free(saved):
            return saved
        port = free_port()
        if saved is not None:
            notes.append(f"{what} port {saved} is in use; using {port} instead")
        self.values[role] = port
        return port


def member_key(index: int) -> str:
    """The ``domain.json`` key of hub member ``index`` (0-based): ``hub``, ``hub-2``, ..."""
    return HUB_DOMAIN if index == 0 else f"{HUB_DOMAIN}-{index + 1}"


def start_local_hub(
    directory: Path,
    size: int,
    ports: dict[str, Ports],
    notes: list[str],
    *,
    accounts: str,
    spawn: Callable[[NatsServer], NatsServer],
    hub_port: int | None = None,
    timeout: float = 60.0,
) -> Hub:
    """Start the hub's ``size`` servers under ``directory`` (the domain's ``hub/``) and wait until
    they serve (a clustered hub: until its JetStream cluster is whole).

    ``spawn`` starts one server process and records it (the domain stops what it spawned when a
    start is interrupted). ``hub_port`` is the first member's client port, as asked for with
    ``--port``; PortTakenError if it is in use. A port taken between choosing and binding is
    retried with new ports, twice.
    """
    if not 1 <= size <= MAX_HUB_SERVERS:
        raise CimPlaceError(f"a hub has 1 to {MAX_HUB_SERVERS} servers, not {size}")
    saved = [ports.setdefault(member_key(index), Ports()) for index in range(size)]
    if hub_port is not None:
        if not port_free(hub_port):
            raise PortTakenError(
                f"port {hub_port} (asked for with --port) is in use by another process; "
                "stop that process, pick another port, or leave --port out to choose a free one"
            )
        saved[0].values["port"] = hub_port
    for attempt in range(3):
        servers: list[NatsServer] = []
        try:
            servers = [
                spawn(server) for server in _members(directory, size, saved, notes, accounts)
            ]
            hub = Hub(servers, HUB_DOMAIN, HUB_CLUSTER if size > 1 else None)
            return hub.wait_ready(timeout)
        except TransportError as error:
            for server in servers:
                server.stop()
            if "address already in use" not in str(error) or attempt == 2:
                raise
            taken = sorted(p for s in saved for p in s.values.values())
            for member in saved:
                member.values.clear()
            notes.append(f"the hub: a port of {taken} was taken; retrying")
        except BaseException:
            for server in servers:
                server.stop()
            raise
    raise AssertionError("unreachable")


def _members(
    directory: Path, size: int, saved: list[Ports], notes: list[str], accounts: str
) -> list[NatsServer]:
    """The hub's servers, not started: their specs, with routes to one another."""
    routes: list[int] = []
    if size > 1:
        routes = [
            member.choose("cluster_port", f"{member_key(i)} route", notes)
            for i, member in enumerate(saved)
        ]
    servers = []
    for index, member in enumerate(saved):
        name = HUB_DOMAIN if size == 1 else f"{HUB_DOMAIN}-{index + 1}"
        home = directory if size == 1 else directory / name
        spec = ServerSpec(
            server_name=name,
            store_dir=home / "jetstream",
            domain=HUB_DOMAIN,
            port=member.choose("port", f"{name} client", notes),
            http_port=member.choose("http_port", f"{name} monitoring", notes),
            leafnode_port=member.choose("leafnode_port", f"{name} leafnode", notes),
            extra=accounts,
        )
        if size > 1:
            spec.cluster_name = HUB_CLUSTER
            spec.cluster_port = routes[index]
            spec.routes = [
                f"nats-route://{LOCALHOST}:{port}" for i, port in enumerate(routes) if i != index
            ]
        servers.append(NatsServer(spec, home))
    return servers

"""Which JetStream domain a CLI command talks to when the user did not say.

Domain-wide state (names, policies, nodes) lives in the hub's domain. A CLI may be pointed at a
hub server or at a leaf server; from either, ``$JS.hub.API`` reaches the hub when the topology has
one. A lone development server has no hub domain; there the server's own JetStream is the domain.
"""

from __future__ import annotations

import asyncio
import getpass
import socket
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, TypeVar

import nats.errors
import typer
from nats.aio.client import Client
from nats.js import JetStreamContext

from cim_place.cli.context import server_default
from cim_place.cluster.nats.subjects import HUB_DOMAIN
from cim_place.errors import CimPlaceError, TransportError

__all__ = [
    "HUB_DOMAIN",
    "CredsOption",
    "DomainOption",
    "ServerOption",
    "UnknownNodeError",
    "actor",
    "check_known_node",
    "choose_domain",
    "run_in_domain",
]

T = TypeVar("T")

_PROBE_TIMEOUT = 2.0


async def choose_domain(nc: Client, requested: str | None = None) -> str | None:
    """The JetStream domain to use: ``requested`` when given; else the hub's when the connected
    server reaches it; else None (the server's own domain).

    A server with a domain of its own that cannot reach the hub is a leaf cut off from it: domain
    state must never be read from or written to a leaf's local JetStream by mistake, so that is
    an error naming the server, not a silent fallback. A lone server without a domain (a
    development server) is its own domain.
    """
    if requested:
        return requested
    info = nc._server_info or {}
    own = info.get("domain")
    if own == HUB_DOMAIN:
        return HUB_DOMAIN
    try:
        # The account info request is cheap, and only a server of that domain answers it.
        await nc.request(f"$JS.{HUB_DOMAIN}.API.INFO", b"", timeout=_PROBE_TIMEOUT)
    except (nats.errors.NoRespondersError, nats.errors.TimeoutError):
        if own:
            server = info.get("server_name") or "the server"
            raise TransportError(
                f"JetStream domain {HUB_DOMAIN!r} is not reachable from {server} (domain {own!r}): "
                "its link to the hub may be down; connect to a hub server, or pass --domain"
            ) from None
        return None
    return HUB_DOMAIN


ServerOption = Annotated[
    str | None,
    typer.Option(
        "--server",
        "-s",
        envvar="CIM_PLACE_SERVER",
        help="NATS server(s), comma separated: a hub or leaf server "
        "(default: the domain `cim-place up` runs here, else nats://127.0.0.1:4222).",
        show_default=False,
        callback=server_default,
    ),
]
CredsOption = Annotated[
    str | None, typer.Option("--creds", help="NATS credentials file.", show_default=False)
]
LogLevelOption = Annotated[
    str | None,
    typer.Option(
        "--log-level",
        help="debug, info, warning or error (default: $CIM_PLACE_LOG, else info).",
    ),
]
LogJsonOption = Annotated[
    bool, typer.Option("--log-json", help="Log one JSON object per line (for log shippers).")
]
DomainOption = Annotated[
    str | None,
    typer.Option(
        "--domain",
        help="JetStream domain holding domain state (default: hub when reachable).",
        show_default=False,
    ),
]


class UnknownNodeError(CimPlaceError):
    """A node id that no heartbeat in the domain carries."""


async def check_known_node(js: JetStreamContext, node: str, *, also: set[str] | None = None) -> str:
    """``node`` when it heartbeats in the domain (or is in ``also``); else UnknownNodeError
    naming it and listing the nodes that do."""
    from cim_place.cluster.state.nodes import list_nodes

    known = {record.node for record in await list_nodes(js)} | (also or set())
    if node in known:
        return node
    listed = ", ".join(sorted(known)) or "none (no agent heartbeats)"
    raise UnknownNodeError(
        f"no node {node!r} in the domain (no heartbeat from it in the last 30 s); "
        f"known nodes: {listed}"
    )


def actor() -> str:
    """Who is acting, recorded with changes: user@host."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


def run_in_domain(
    server: str | None,
    creds: str | None,
    domain: str | None,
    action: Callable[[JetStreamContext], Awaitable[T]],
) -> T:
    """Connect, pick the domain (:func:`choose_domain`), run ``action(js)``, disconnect."""
    from cim_place.cluster.nats.connection import connected, jetstream

    async def run() -> T:
        async with connected(server, creds=creds) as nc:
            chosen = await choose_domain(nc, domain)
            return await action(jetstream(nc, chosen))

    return asyncio.run(run())


def run_with_connection(
    server: str | None,
    creds: str | None,
    domain: str | None,
    action: Callable[[Any, JetStreamContext], Awaitable[T]],
) -> T:
    """As :func:`run_in_domain`, for an action that also asks on core NATS: ``action(nc, js)``."""
    from cim_place.cluster.nats.connection import connected, jetstream

    async def run() -> T:
        async with connected(server, creds=creds) as nc:
            chosen = await choose_domain(nc, domain)
            return await action(nc, jetstream(nc, chosen))

    return asyncio.run(run())

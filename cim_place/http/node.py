"""A node's gateway and dashboard, wired to the domain: the agent hands over its parts, this
builds the rest.

Composes :class:`~cim_place.http.gateway.Gateway` with the domain-wide content source (who-has
and the verified fetch of ``cluster.exchange``, into this node's emptiest volume), the names of
``cluster.state.names``, and the access rules of ``docs/SECURITY.md``: in a domain that
authenticates its users (the agent's NATS URL names a user) an object is readable by its owner,
its readers and everyone when it has no owner, as on the block exchange; its owner and readers
come from the local pin, or else from the controller's locations record. In an open domain
everything is readable.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import nats.errors
from aiohttp import web

from cim_place.cluster.exchange.fetch import fetch_dag
from cim_place.cluster.exchange.fetch_model import Holder, Labels
from cim_place.cluster.exchange.holders import find_block_holders
from cim_place.cluster.nats.connection import connect, jetstream
from cim_place.cluster.nats.security import may_read
from cim_place.cluster.nats.subjects import Subjects
from cim_place.cluster.state.locations import LocationStore
from cim_place.cluster.state.name_record import NamingError, check_name
from cim_place.cluster.state.names import NameRegistry
from cim_place.errors import TransportError
from cim_place.http.domain import DomainContent
from cim_place.http.gateway import Gateway, ReadObserver
from cim_place.http.gateway_request import BadRequest
from cim_place.http.server import HttpServers, HttpSettings, Listener
from cim_place.http.sources import Access, Identify, OpenAccess
from cim_place.http.ui import add_dashboard
from cim_place.interfaces import BlockSource, Pin
from cim_place.objectstore.cid import Cid, to_str
from cim_place.objectstore.store import ObjectStore

HOLDER_TIMEOUT = 0.5
"""Seconds to wait for who-has answers when this node lacks a root."""
MAX_FETCHES = 8
"""Roots fetched for HTTP clients at once; more wait their turn (the tasks' fetches do not)."""


@dataclass(frozen=True, slots=True)
class NodeParts:
    """What the gateway needs of its agent."""

    nc: Any
    node: str
    subjects: Subjects
    hub_domain: str
    blocks: BlockSource
    """Every volume of the node, read verified."""
    stores: Sequence[ObjectStore]
    cache_volume: Callable[[], ObjectStore]
    """The volume fetched blocks go to (the emptiest one)."""
    pin_of: Callable[[Cid], Pin | None]
    near: Labels
    stream_tls: ssl.SSLContext | None
    secured: bool
    """The domain authenticates its users: apply owner and readers."""
    record_read: ReadObserver | None = None
    """Told of each object read through the gateway (demand counting, docs/DEMAND.md)."""


class DomainAccess:
    """Owner and readers of a root, from the local pin or the domain's locations record."""

    def __init__(self, parts: NodeParts) -> None:
        self.parts = parts
        self._locations: LocationStore | None = None

    async def may_read(self, requester: str | None, root: Cid) -> bool:
        pin = self.parts.pin_of(root)
        if pin is None:
            pin = await self._recorded(root)
        return pin is not None and may_read(requester, pin)

    async def _recorded(self, root: Cid) -> Pin | None:
        try:
            if self._locations is None:
                js = jetstream(self.parts.nc, self.parts.hub_domain)
                self._locations = await LocationStore(js).open(create=False)
            status = await self._locations.get(root)
        except TransportError:
            return None
        if status is None:
            return None
        return Pin(
            root=root,
            size=status.size,
            blocks=0,
            owner=status.owner,
            metadata=dict(status.metadata),
        )


def gateway_for(parts: NodeParts, settings: HttpSettings) -> Gateway:
    """The gateway of one node."""

    async def holders_of(root: Cid) -> list[Holder]:
        # A block query: ``root`` may be a child block a verifying client names alone, which
        # no node holds pinned; the nodes that have it as a block serve it (open domains).
        try:
            return await find_block_holders(
                parts.nc, root, timeout=HOLDER_TIMEOUT, exclude=parts.node, subjects=parts.subjects
            )
        except nats.errors.Error as exc:
            raise TransportError(f"cannot ask the domain who holds {to_str(root)}: {exc}") from None

    fetching = asyncio.Semaphore(MAX_FETCHES)

    async def fetch(
        root: Cid, holders: Sequence[object], progress: Callable[[int, int], None]
    ) -> object:
        async with fetching:
            return await fetch_into_cache(root, holders, progress)

    async def fetch_into_cache(
        root: Cid, holders: Sequence[object], progress: Callable[[int, int], None]
    ) -> object:
        store = parts.cache_volume()
        # Hold off gc while unpinned blocks arrive (as a fetch task does).
        lock = store.writing()
        await asyncio.to_thread(lock.__enter__)
        try:
            return await fetch_dag(
                parts.nc,
                root,
                [holder for holder in holders if isinstance(holder, Holder)],
                content.recent.recording(store.blocks),
                subjects=parts.subjects,
                near=parts.near,
                stream_tls=parts.stream_tls,
                progress=progress,
            )
        finally:
            lock.__exit__(None, None, None)

    async def resolve_name(name: str) -> Cid | None:
        try:
            check_name(name)
        except NamingError as exc:
            raise BadRequest(str(exc).splitlines()[0]) from None
        try:
            record = await NameRegistry(jetstream(parts.nc, parts.hub_domain)).get(name)
        except NamingError:
            return None
        except nats.errors.Error as exc:
            raise TransportError(f"the names of the domain cannot be read: {exc}") from None
        return record.cid if record is not None and not record.removed else None

    content = DomainContent(
        parts.blocks,
        repair=[store.blocks for store in parts.stores],
        find_holders=holders_of,
        fetch=fetch,
    )
    access: Access = DomainAccess(parts) if parts.secured else OpenAccess()
    return Gateway(
        content,
        access=access,
        identify=Identify(settings.tokens),
        names=resolve_name,
        on_read=parts.record_read,
    )


def dashboard_reader(
    parts: NodeParts, settings: HttpSettings, app: web.Application
) -> Callable[[], Awaitable[Any]]:
    """How the dashboard reaches the hub: the agent's connection, or (``dashboard_server``) a
    connection of its own as the read-only operator, which may read what an agent may not
    (the locations, the task stream), opened on first use and closed with the listener."""
    if settings.dashboard_server is None:

        async def agents() -> Any:
            return jetstream(parts.nc, parts.hub_domain)

        return agents
    server = settings.dashboard_server
    opened: list[Any] = []
    lock = asyncio.Lock()

    async def operators() -> Any:
        async with lock:
            if not opened:
                opened.append(await connect([server], name=f"cim-place-dashboard-{parts.node}"))
        return jetstream(opened[0], parts.hub_domain)

    async def close(_: web.Application) -> None:
        for nc in opened:
            await nc.close()

    app.on_cleanup.append(close)
    return operators


async def start_node_http(
    parts: NodeParts, settings: HttpSettings | None, extra: Sequence[Listener] = ()
) -> HttpServers:
    """Bind a node's listeners, all or none: the gateway (unless ``settings`` is None) and any
    ``extra`` ones, such as the S3 API."""
    listeners = list(extra)
    if settings is not None:
        gateway = gateway_for(parts, settings)
        app = gateway.app()
        # The dashboard shares the gateway's listener (and its TLS and tokens).
        add_dashboard(
            app,
            dashboard_reader(parts, settings, app),
            identify=Identify(settings.tokens),
            secured=parts.secured,
        )
        listeners.insert(0, Listener("gateway", app, settings.listen, settings.tls))
    servers = HttpServers(listeners)
    await servers.start()
    return servers

"""The outboxes the hub's event store sources: attaching, detaching and nudging them.

This module owns the source list of ``CIM_PLACE_EVENTS`` (:mod:`cim_place.cluster.events.store`):
:func:`attach_leaf` adds a leaf's ``OUTBOX_<node>``, :func:`attach_hub_outbox` the hub's own,
:func:`detach_leaf` removes one; every change is made under the store's lock.

After an outage, the hub's own retry schedule can leave a source idle for 40 s to about 2 minutes
(measured here: 40 s after a hub restart; after a cut leaf link of 2 to 90 s the hub resumed within
20 ms on its own). :func:`nudge_sources` (remove and re-add the source) restarts it at once. The
agent runs a :class:`SourceKeeper`, which attaches its outbox at start-up and nudges it whenever the
hub becomes reachable again after failures.
"""

from __future__ import annotations

import asyncio
import logging

from nats.js import JetStreamContext
from nats.js.api import StreamInfo, StreamSource

from cim_place.cluster.events.store import (
    event_store_info,
    source_api,
    source_for,
    sources_lock,
    update_stream,
)
from cim_place.cluster.nats.subjects import EVENTS_STREAM, check_node_id, outbox_stream
from cim_place.errors import TransportError

__all__ = ["SourceKeeper", "attach_hub_outbox", "attach_leaf", "detach_leaf", "nudge_sources"]

_log = logging.getLogger(__name__)


async def _set_sources(js_hub: JetStreamContext, sources: list[StreamSource]) -> StreamInfo:
    config = (await event_store_info(js_hub)).config
    config.sources = sources
    # With sources, the stream needs no subjects; without any, the server insists on its name.
    config.subjects = [] if sources else None
    return await update_stream(js_hub, config)


def _has_source(info: StreamInfo, node: str) -> bool:
    name, api = outbox_stream(node), source_api(node)
    return any(
        s.name == name and s.external is not None and s.external.api == api
        for s in info.config.sources or []
    )


def _without_source(sources: list[StreamSource] | None, node: str) -> list[StreamSource]:
    name = outbox_stream(node)
    return [s for s in sources or [] if s.name != name]


def _with_source(sources: list[StreamSource] | None, node: str) -> list[StreamSource]:
    """``sources`` with ``node``'s outbox as it should be (replacing a stale entry of that name)."""
    return [*_without_source(sources, node), source_for(node)]


async def attach_leaf(js_hub: JetStreamContext, node: str) -> bool:
    """Make the event store source ``OUTBOX_<node>``; True if it was added, False if present.

    Idempotent and safe to call concurrently from many leaves (the source list is changed under
    a lock). The event store must exist (:func:`ensure_event_store`); the outbox need not yet.
    """
    if _has_source(await event_store_info(js_hub), node):
        return False
    async with sources_lock(js_hub, f"attach {node}"):
        info = await event_store_info(js_hub)
        if _has_source(info, node):
            return False
        await _set_sources(js_hub, _with_source(info.config.sources, node))
    _log.info("event store %s now sources %s", EVENTS_STREAM, outbox_stream(node))
    return True


async def attach_hub_outbox(js_hub: JetStreamContext, hub_domain: str) -> bool:
    """Make the event store source ``OUTBOX_<hub domain>``, a stream in the hub's own domain
    (the controller's tombstones, cluster/controller/removal.py); True if it was added.

    A source in the same domain takes no external API: one through ``$JS.<hub>.API`` never
    became active (measured with nats-server 2.15.1).
    """
    name = outbox_stream(hub_domain)
    wanted = StreamSource(name=name)

    def present(info: StreamInfo) -> bool:
        return any(s.name == name and s.external is None for s in info.config.sources or [])

    if present(await event_store_info(js_hub)):
        return False
    async with sources_lock(js_hub, f"attach {name}"):
        info = await event_store_info(js_hub)
        if present(info):
            return False
        await _set_sources(js_hub, [*_without_source(info.config.sources, hub_domain), wanted])
    return True


async def detach_leaf(js_hub: JetStreamContext, node: str) -> bool:
    """Stop sourcing ``OUTBOX_<node>`` (a decommissioned node); True if it was attached.

    Events already in the hub stay. Re-attaching later resumes after the last event sourced.
    """
    async with sources_lock(js_hub, f"detach {node}"):
        info = await event_store_info(js_hub)
        if not _has_source(info, node):
            return False
        await _set_sources(js_hub, _without_source(info.config.sources, node))
    return True


async def nudge_sources(js_hub: JetStreamContext, node: str | None = None) -> None:
    """Restart the hub's sourcing of ``OUTBOX_<node>`` (every outbox when ``node`` is None).

    After a leaf link returns, the hub may wait 40 s to about 2 minutes before it retries a source;
    removing and re-adding it (two stream updates) makes it catch up in under a second. The hub
    resumes after the last event it holds from that outbox, and the duplicate window guards the
    rest, so a nudge never duplicates or skips events. It is cheap but not free (the hub scans its
    stream back to the last event of the source), so call it on a transition, not in a loop:
    when an agent sees the hub reachable again after failures, or on a controller's restart.
    A node not attached yet is attached.
    """
    async with sources_lock(js_hub, f"nudge {node or 'all'}"):
        info = await event_store_info(js_hub)
        sources = list(info.config.sources or [])
        if node is None:
            nudged = [s.name for s in sources]
        else:
            nudged = [outbox_stream(node)]
            if not _has_source(info, node):
                sources = _with_source(sources, node)
        if not nudged or not sources:
            return
        await _set_sources(js_hub, [s for s in sources if s.name not in nudged])
        await _set_sources(js_hub, sources)
    _log.info("event store %s: restarted sourcing of %s", EVENTS_STREAM, ", ".join(nudged))


class SourceKeeper:
    """Keeps one leaf's outbox attached to the event store and flowing after outages.

    The agent runs :meth:`run` as a background task (or calls :meth:`check` from its heartbeat
    loop). Each check is one hub request: the first successful one attaches the outbox (or, if it
    was attached before, nudges it, since the leaf may have been away); a success after failures
    nudges the source, because the hub left alone can take 40 s or more to resume after it
    restarts (measured here: 40 s). Failures are expected while the leaf is cut off and are only
    logged on the transition.
    """

    def __init__(self, js_hub: JetStreamContext, node: str, *, interval: float = 5.0) -> None:
        self.node = check_node_id(node)
        self.interval = interval
        self.reachable: bool | None = None
        """None before the first check; then whether the last check reached the hub."""
        self.nudges = 0
        self._js = js_hub

    async def check(self) -> bool:
        """Probe the hub once; attach or nudge as needed. Returns whether the hub was reached."""
        try:
            info = await event_store_info(self._js)
            if not _has_source(info, self.node):
                await attach_leaf(self._js, self.node)
            elif not self.reachable:
                await nudge_sources(self._js, self.node)
                self.nudges += 1
        except TransportError as error:
            if self.reachable is not False:
                _log.warning("event store not reachable from %s (will retry): %s", self.node, error)
            self.reachable = False
            return False
        if self.reachable is False:
            _log.info("event store reachable again from %s; its outbox was nudged", self.node)
        self.reachable = True
        return True

    async def run(self) -> None:
        """Check every ``interval`` seconds until cancelled."""
        while True:
            await self.check()
            await asyncio.sleep(self.interval)

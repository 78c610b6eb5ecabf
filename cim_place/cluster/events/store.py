"""The event store: the hub's ``CIM_PLACE_EVENTS`` stream fed by one outbox stream per leaf.

This module owns the store-and-forward path of events (DESIGN.md, "Store-and-forward") and the
two streams themselves; the list of outboxes the hub stream sources is kept by
:mod:`cim_place.cluster.events.sources`, the publisher by :mod:`cim_place.cluster.events.publisher`:

1. Each agent publishes into ``OUTBOX_<node>``, a stream in its leaf's own JetStream domain
   (:func:`ensure_outbox`, ``EventPublisher``). The leaf accepts the publish whether or not
   its link to the hub is up, so nothing is lost while a leaf is cut off.
2. ``CIM_PLACE_EVENTS`` in the hub domain (:func:`ensure_event_store`) has no subjects of its own,
   only sources: one ``StreamSource`` per outbox (``attach_leaf``). The hub tracks its position
   in each outbox, so every event arrives exactly once and in order, after any outage. A hub stream
   that also listed the event subjects would capture each event twice (routed and sourced).
3. Consumers read the hub stream (cim_place.cluster.events.readers): the controller's projection
   with ``EventFeed`` (pushed, from the first event), tools with ``EventReader`` (pulled, durable
   or not) or ``subscribe_events``; malformed messages are counted and logged, never raised.

Every change to the hub stream's configuration (its source list, its replicas) goes through one
lock (:func:`sources_lock`, a key in a small KV bucket with a TTL), because stream updates are
read-modify-write without compare-and-set: two leaves attaching at the same moment would
otherwise each write a list without the other.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import AsyncIterator

import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.api import (
    DiscardPolicy,
    ExternalStream,
    StorageType,
    StreamConfig,
    StreamInfo,
    StreamSource,
)
from nats.js.kv import KeyValue

from cim_place.cluster.nats import kv as kv_names
from cim_place.cluster.nats.kv import ensure_bucket
from cim_place.cluster.nats.subjects import (
    EVENTS_STREAM,
    HUB_DOMAIN,
    Subjects,
    check_node_id,
    outbox_stream,
)
from cim_place.errors import TransportError

__all__ = [
    "DEFAULT_DUPLICATE_WINDOW",
    "SOURCES_LOCK_BUCKET",
    "ensure_event_store",
    "ensure_outbox",
    "event_store_info",
    "hub_size",
    "source_api",
    "source_for",
    "sources_lock",
    "unreachable",
    "update_stream",
]

_log = logging.getLogger(__name__)
_DEFAULT_SUBJECTS = Subjects()

DEFAULT_DUPLICATE_WINDOW = 120.0
"""Seconds within which a repeated ``Nats-Msg-Id`` is dropped (outbox and hub stream)."""

SOURCES_LOCK_BUCKET = kv_names.EVENT_SOURCES
"""Hub KV bucket holding the lock that serialises changes to the event store's source list."""
_LOCK_KEY = "lock"
# A holder that dies keeps the lock at most this long (the bucket's max age).
_LOCK_TTL = 30.0
_LOCK_WAIT = 45.0

_OUTBOX_MAX_AGE = 7 * 24 * 3600.0
_OUTBOX_MAX_BYTES = 1 << 30


def unreachable(what: str, error: BaseException) -> TransportError:
    """The error of a JetStream call on the event store that failed: what, why, what to do."""
    return TransportError(
        f"{what} failed: {type(error).__name__}: {error or 'no detail'}; "
        "check that the hub (or this leaf's link to it) is up, then retry"
    )


def source_api(node: str) -> str:
    """The JetStream API prefix of a leaf's domain, as the hub reaches it over the leaf link."""
    return f"$JS.{check_node_id(node)}.API"


def source_for(node: str) -> StreamSource:
    return StreamSource(name=outbox_stream(node), external=ExternalStream(api=source_api(node)))


def hub_size(nc: Client, *, hub_domain: str = HUB_DOMAIN) -> int:
    """Number of servers in the hub ``nc`` is connected to (1 for a standalone hub server).

    Read from the server's INFO (its cluster's client URLs), so ``nc`` must be connected to a hub
    server, as the controller is; on a leaf connection it raises TransportError. An agent gets the
    replica count from its configuration instead, or leaves creating the store to the controller.
    """
    info = nc._server_info or {}
    domain = info.get("domain")
    if domain != hub_domain:
        raise TransportError(
            f"cannot tell the hub's size: this connection is to server "
            f"{info.get('server_name', '?')} of JetStream domain {domain!r}, not {hub_domain!r}; "
            "connect to a hub server, or pass the replica count from configuration"
        )
    if not info.get("cluster"):
        return 1
    urls = info.get("connect_urls") or []
    return max(1, len(set(urls)))


async def ensure_event_store(
    js_hub: JetStreamContext,
    *,
    replicas: int,
    duplicate_window: float = DEFAULT_DUPLICATE_WINDOW,
) -> StreamInfo:
    """Create ``CIM_PLACE_EVENTS`` in the hub domain if absent, and converge its settings.

    ``replicas`` is ``min(3, hub_size(nc))``. File storage, no limits (every event is kept),
    ``duplicate_window`` seconds of de-duplication on ``Nats-Msg-Id`` (a stream with sources has
    none unless set). Idempotent, and safe when several processes race: an existing stream keeps
    its sources; only its replica count and duplicate window are brought to the values given.
    """
    if not 1 <= replicas <= 5:
        raise ValueError(f"event store replicas must be 1..5, got {replicas}")
    try:
        info = await js_hub.stream_info(EVENTS_STREAM)
    except nats.js.errors.NotFoundError:
        info = await _create_event_store(js_hub, replicas, duplicate_window)
    except nats.errors.Error as error:
        raise unreachable(f"looking up the event store {EVENTS_STREAM}", error) from error
    config = info.config
    if config.num_replicas == replicas and config.duplicate_window == duplicate_window:
        return info
    _log.info(
        "event store %s: replicas %s -> %s, duplicate window %s -> %s s",
        EVENTS_STREAM,
        config.num_replicas,
        replicas,
        config.duplicate_window,
        duplicate_window,
    )
    async with sources_lock(js_hub, "ensure_event_store"):
        config = (await js_hub.stream_info(EVENTS_STREAM)).config
        config.num_replicas = replicas
        config.duplicate_window = duplicate_window
        return await update_stream(js_hub, config)


async def _create_event_store(
    js_hub: JetStreamContext, replicas: int, duplicate_window: float
) -> StreamInfo:
    # Without sources the server gives the stream its own name as subject; nothing publishes
    # there, and the first attach_leaf() clears it.
    config = StreamConfig(
        name=EVENTS_STREAM,
        description="cim-place events, sourced from every leaf's outbox",
        storage=StorageType.FILE,
        num_replicas=replicas,
        duplicate_window=duplicate_window,
        discard=DiscardPolicy.OLD,
    )
    try:
        return await js_hub.add_stream(config)
    except nats.js.errors.APIError as error:
        if error.err_code == 10058:  # stream name already in use: another process won the race
            return await js_hub.stream_info(EVENTS_STREAM)
        raise TransportError(
            f"could not create the event store {EVENTS_STREAM} with {replicas} replica(s): "
            f"{error.description}; the replica count must not exceed the hub's size"
        ) from error
    except nats.errors.Error as error:
        raise unreachable(f"creating the event store {EVENTS_STREAM}", error) from error


async def ensure_outbox(
    js_leaf: JetStreamContext,
    node: str,
    subjects: Subjects = _DEFAULT_SUBJECTS,
    *,
    duplicate_window: float = DEFAULT_DUPLICATE_WINDOW,
    max_age: float = _OUTBOX_MAX_AGE,
    max_bytes: int = _OUTBOX_MAX_BYTES,
) -> StreamInfo:
    """Create ``OUTBOX_<node>`` in the leaf's own domain (subjects ``<prefix>.evt.<node>.>``).

    ``js_leaf`` is the leaf's local JetStream (``jetstream(nc)`` on a connection to the leaf).
    The outbox only buffers: the hub keeps every event; a message older than ``max_age`` seconds
    (default 7 days) or beyond ``max_bytes`` (default 1 GiB) is dropped, oldest first, so a
    leaf cut off longer than that loses its oldest events and relies on the inventory digest
    for repair. Idempotent; an existing outbox whose subjects differ (a changed prefix) is updated.
    """
    name = outbox_stream(node)
    wanted = [subjects.events_of(node)]
    try:
        info = await js_leaf.stream_info(name)
    except nats.js.errors.NotFoundError:
        config = StreamConfig(
            name=name,
            description=f"cim-place events of {node}, buffered for the hub",
            subjects=wanted,
            storage=StorageType.FILE,
            num_replicas=1,
            duplicate_window=duplicate_window,
            max_age=max_age,
            max_bytes=max_bytes,
            discard=DiscardPolicy.OLD,
        )
        try:
            return await js_leaf.add_stream(config)
        except nats.js.errors.BadRequestError as error:
            if error.err_code != 10058:
                raise TransportError(
                    f"could not create the outbox {name}: {error.description}"
                ) from error
            return await js_leaf.stream_info(name)
    except nats.errors.Error as error:
        raise unreachable(f"looking up the outbox {name} on the leaf", error) from error
    if info.config.subjects != wanted:
        info.config.subjects = wanted
        info = await update_stream(js_leaf, info.config)
    return info


# -- the lock on the configuration --------------------------------------------------------------


@contextlib.asynccontextmanager
async def sources_lock(js_hub: JetStreamContext, holder: str) -> AsyncIterator[None]:
    """Hold the hub-wide lock on the event store's source list (a KV create is atomic)."""
    try:
        kv = await ensure_bucket(js_hub, SOURCES_LOCK_BUCKET, ttl=_LOCK_TTL)
    except nats.errors.Error as error:
        raise unreachable("opening the event-sources lock bucket", error) from error
    revision = await _acquire(kv, holder)
    try:
        yield
    finally:
        # Delete only our own lock; if it expired meanwhile, the delete fails harmlessly.
        with contextlib.suppress(nats.errors.Error):
            await kv.delete(_LOCK_KEY, last=revision)


async def _acquire(kv: KeyValue, holder: str) -> int:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + _LOCK_WAIT
    delay = 0.02
    while True:
        try:
            return await kv.create(_LOCK_KEY, holder.encode())
        except nats.js.errors.KeyWrongLastSequenceError:
            pass
        except nats.errors.Error as error:
            raise unreachable("taking the event-sources lock", error) from error
        if loop.time() > deadline:
            current = "unknown"
            with contextlib.suppress(nats.errors.Error):
                entry = await kv.get(_LOCK_KEY)
                current = (entry.value or b"").decode(errors="replace")
            raise TransportError(
                f"could not change the sources of {EVENTS_STREAM}: the lock in KV "
                f"{SOURCES_LOCK_BUCKET} is held by {current!r} for over {_LOCK_WAIT:.0f} s; "
                f"it expires {_LOCK_TTL:.0f} s after it was taken, so retry"
            )
        # Jitter keeps leaves that start together from retrying in lockstep.
        await asyncio.sleep(delay * (0.5 + random.random()))
        delay = min(delay * 2, 0.5)


UPDATE_WAIT = 120.0
"""Seconds an update whose reply timed out is watched for before it is reported as failed."""


async def update_stream(js: JetStreamContext, config: StreamConfig) -> StreamInfo:
    """Apply ``config`` to its stream.

    Adding a source makes the server scan the stream for messages already sourced (to resume
    after them), which on a stream of millions of events takes longer than a request's timeout
    (seen at 1M events on the bench's hub). The update goes on regardless, so a timed-out reply
    is followed by watching the stream's configuration until it shows the change (up to
    :data:`UPDATE_WAIT`), rather than failing a controller's or an agent's start.
    """
    try:
        return await js.update_stream(config)
    except nats.js.errors.APIError as error:
        raise TransportError(
            f"could not update stream {config.name}: {error.description}"
        ) from error
    except nats.errors.TimeoutError as error:
        info = await _applied(js, config)
        if info is None:
            raise unreachable(f"updating stream {config.name}", error) from error
        return info
    except nats.errors.Error as error:
        raise unreachable(f"updating stream {config.name}", error) from error


def _sources_of(config: StreamConfig) -> set[tuple[str, str | None]]:
    return {(s.name, s.external.api if s.external else None) for s in config.sources or []}


async def _applied(js: JetStreamContext, config: StreamConfig) -> StreamInfo | None:
    """The stream's info once its sources and subjects are those of ``config``, or None if
    they are not within :data:`UPDATE_WAIT` seconds."""
    assert config.name is not None
    loop = asyncio.get_running_loop()
    deadline = loop.time() + UPDATE_WAIT
    wanted = (_sources_of(config), sorted(config.subjects or []))
    while loop.time() < deadline:
        with contextlib.suppress(nats.errors.Error):
            info = await js.stream_info(config.name)
            if (_sources_of(info.config), sorted(info.config.subjects or [])) == wanted:
                _log.info("stream %s took its new configuration slowly; it now has it", config.name)
                return info
        await asyncio.sleep(1.0)
    return None


async def event_store_info(js_hub: JetStreamContext) -> StreamInfo:
    try:
        return await js_hub.stream_info(EVENTS_STREAM)
    except nats.js.errors.NotFoundError:
        raise TransportError(
            f"the event store {EVENTS_STREAM} does not exist in the hub domain yet; "
            "create it with ensure_event_store() (the controller does at start-up), then retry"
        ) from None
    except nats.errors.Error as error:
        raise unreachable(f"reading the event store {EVENTS_STREAM}", error) from error

"""The event store: the hub's ``CIM_PLACE_EVENTS`` stream fed by one outbox stream per leaf.

This module owns the store-and-forward path of events (DESIGN.md, "Store-and-forward"):

1. Each agent publishes into ``OUTBOX_<node>``, a stream in its leaf's own JetStream domain
   (:func:`ensure_outbox`, :class:`EventPublisher`). The leaf accepts the publish whether or not
   its link to the hub is up, so nothing is lost while a leaf is cut off.
2. ``CIM_PLACE_EVENTS`` in the hub domain (:func:`ensure_event_store`) has no subjects of its own,
   only sources: one ``StreamSource`` per outbox (:func:`attach_leaf`). The hub tracks its position
   in each outbox, so every event arrives exactly once and in order, after any outage. A hub stream
   that also listed the event subjects would capture each event twice (routed and sourced).
3. Consumers read the hub stream (cim_place.cluster.events.readers): the controller's projection
   with ``EventFeed`` (pushed, from the first event), tools with ``EventReader`` (pulled, durable
   or not) or ``subscribe_events``; malformed messages are counted and logged, never raised.

After an outage, the hub's own retry schedule can leave a source idle for 40 s to about 2 minutes
(measured here: 40 s after a hub restart; after a cut leaf link of 2 to 90 s the hub resumed within
20 ms on its own). :func:`nudge_sources` (remove and re-add the source) restarts it at once. The
agent runs a :class:`SourceKeeper`, which attaches its outbox at start-up and nudges it whenever the
hub becomes reachable again after failures.

Every change to the source list goes through one lock (a key in a small KV bucket with a TTL),
because stream updates are read-modify-write without compare-and-set: two leaves attaching at the
same moment would otherwise each write a list without the other.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
from collections.abc import AsyncIterator, Sequence

import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext
from nats.js.api import (
    DiscardPolicy,
    ExternalStream,
    PubAck,
    StorageType,
    StreamConfig,
    StreamInfo,
    StreamSource,
)
from nats.js.kv import KeyValue

from cim_place.cluster.events.types import AnyEvent, event_envelope
from cim_place.cluster.nats import kv as kv_names
from cim_place.cluster.nats.envelope import Envelope
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
    "EventPublisher",
    "SourceKeeper",
    "attach_leaf",
    "detach_leaf",
    "ensure_event_store",
    "ensure_outbox",
    "hub_size",
    "nudge_sources",
    "source_api",
    "unreachable",
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
_PUBLISH_MANY_TIMEOUT = 30.0
_PUBLISH_WINDOW = 4096
_EXPECTED_STREAM = "Nats-Expected-Stream"


def unreachable(what: str, error: BaseException) -> TransportError:
    """The error of a JetStream call on the event store that failed: what, why, what to do."""
    return TransportError(
        f"{what} failed: {type(error).__name__}: {error or 'no detail'}; "
        "check that the hub (or this leaf's link to it) is up, then retry"
    )


def source_api(node: str) -> str:
    """The JetStream API prefix of a leaf's domain, as the hub reaches it over the leaf link."""
    return f"$JS.{check_node_id(node)}.API"


def _source_for(node: str) -> StreamSource:
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
    async with _sources_lock(js_hub, "ensure_event_store"):
        config = (await js_hub.stream_info(EVENTS_STREAM)).config
        config.num_replicas = replicas
        config.duplicate_window = duplicate_window
        return await _update(js_hub, config)


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
        info = await _update(js_leaf, info.config)
    return info


# -- the source list ------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def _sources_lock(js_hub: JetStreamContext, holder: str) -> AsyncIterator[None]:
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


async def _update(js: JetStreamContext, config: StreamConfig) -> StreamInfo:
    try:
        return await js.update_stream(config)
    except nats.js.errors.APIError as error:
        raise TransportError(
            f"could not update stream {config.name}: {error.description}"
        ) from error
    except nats.errors.Error as error:
        raise unreachable(f"updating stream {config.name}", error) from error


async def _set_sources(js_hub: JetStreamContext, sources: list[StreamSource]) -> StreamInfo:
    config = (await _event_store_info(js_hub)).config
    config.sources = sources
    # With sources, the stream needs no subjects; without any, the server insists on its name.
    config.subjects = [] if sources else None
    return await _update(js_hub, config)


async def _event_store_info(js_hub: JetStreamContext) -> StreamInfo:
    try:
        return await js_hub.stream_info(EVENTS_STREAM)
    except nats.js.errors.NotFoundError:
        raise TransportError(
            f"the event store {EVENTS_STREAM} does not exist in the hub domain yet; "
            "create it with ensure_event_store() (the controller does at start-up), then retry"
        ) from None
    except nats.errors.Error as error:
        raise unreachable(f"reading the event store {EVENTS_STREAM}", error) from error


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
    return [*_without_source(sources, node), _source_for(node)]


async def attach_leaf(js_hub: JetStreamContext, node: str) -> bool:
    """Make the event store source ``OUTBOX_<node>``; True if it was added, False if present.

    Idempotent and safe to call concurrently from many leaves (the source list is changed under
    a lock). The event store must exist (:func:`ensure_event_store`); the outbox need not yet.
    """
    if _has_source(await _event_store_info(js_hub), node):
        return False
    async with _sources_lock(js_hub, f"attach {node}"):
        info = await _event_store_info(js_hub)
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

    if present(await _event_store_info(js_hub)):
        return False
    async with _sources_lock(js_hub, f"attach {name}"):
        info = await _event_store_info(js_hub)
        if present(info):
            return False
        await _set_sources(js_hub, [*_without_source(info.config.sources, hub_domain), wanted])
    return True


async def detach_leaf(js_hub: JetStreamContext, node: str) -> bool:
    """Stop sourcing ``OUTBOX_<node>`` (a decommissioned node); True if it was attached.

    Events already in the hub stay. Re-attaching later resumes after the last event sourced.
    """
    async with _sources_lock(js_hub, f"detach {node}"):
        info = await _event_store_info(js_hub)
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
    async with _sources_lock(js_hub, f"nudge {node or 'all'}"):
        info = await _event_store_info(js_hub)
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
            info = await _event_store_info(self._js)
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


# -- publishing -----------------------------------------------------------------------------------


class _AckPipeline:
    """Pipelined JetStream publishes with one wildcard reply subscription for all their acks.

    nats-py's ``publish_async`` does the same with a future, a semaphore and more bookkeeping per
    message; measured here (bench/announce.py, same payloads), this path's publishing part ran
    1.1 to 1.8 times as fast, the gap growing with the machine's load.
    Each reply subject is ``<inbox>.<batch>.<index>``; a reply is kept as raw bytes (None for "no
    responders") and decoded once the whole batch is in.
    """

    def __init__(self, nc: Client, subject_prefix: str, stream: str) -> None:
        self._nc = nc
        self._subject_prefix = subject_prefix
        self._stream = stream
        self._inbox = nc.new_inbox()
        self._sub: Subscription | None = None
        self._batches: dict[int, _Batch] = {}
        self._next_batch = 0

    @classmethod
    async def open(cls, nc: Client, subject_prefix: str, stream: str) -> _AckPipeline:
        pipeline = cls(nc, subject_prefix, stream)
        # The window bounds what is pending, so the client-side limits never drop an ack.
        pipeline._sub = await nc.subscribe(
            f"{pipeline._inbox}.*.*",
            cb=pipeline._on_reply,
            pending_msgs_limit=-1,
            pending_bytes_limit=-1,
        )
        return pipeline

    async def _on_reply(self, msg: Msg) -> None:
        batch_token, _, index = msg.subject[len(self._inbox) + 1 :].partition(".")
        if not (batch_token.isdigit() and index.isdigit()):
            return  # not a reply to us
        batch = self._batches.get(int(batch_token))
        if batch is None:
            return  # a batch that timed out
        no_responders = (msg.headers or {}).get("Status") == "503"
        batch.settle(int(index), None if no_responders else msg.data)

    async def send(
        self, messages: Sequence[tuple[str, bytes, dict[str, str]]], *, window: int, timeout: float
    ) -> list[bytes | None]:
        """Publish every message and return the replies in order (TimeoutError if incomplete)."""
        token = self._next_batch
        self._next_batch += 1
        batch = _Batch(len(messages), window)
        self._batches[token] = batch
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        try:
            for index, (subject, payload, headers) in enumerate(messages):
                if batch.in_flight.locked():
                    await asyncio.wait_for(batch.in_flight.acquire(), deadline - loop.time())
                else:
                    await batch.in_flight.acquire()
                headers[_EXPECTED_STREAM] = self._stream
                await self._nc.publish(
                    self._subject_prefix + subject,
                    payload,
                    reply=f"{self._inbox}.{token}.{index}",
                    headers=headers,
                )
            await asyncio.wait_for(asyncio.shield(batch.done), max(0.0, deadline - loop.time()))
        finally:
            del self._batches[token]
        return batch.replies

    async def close(self) -> None:
        if self._sub is not None:
            with contextlib.suppress(nats.errors.Error):
                await self._sub.unsubscribe()
            self._sub = None


class _Batch:
    """The replies of one pipelined batch, and the window of its unacknowledged publishes."""

    def __init__(self, size: int, window: int) -> None:
        self.replies: list[bytes | None] = [None] * size
        self.missing = size
        self.in_flight = asyncio.Semaphore(max(1, window))
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._seen = bytearray(size)

    def settle(self, index: int, reply: bytes | None) -> None:
        if not 0 <= index < len(self._seen) or self._seen[index]:
            return  # a foreign or repeated reply
        self._seen[index] = 1
        self.replies[index] = reply
        self.in_flight.release()
        self.missing -= 1
        if self.missing == 0 and not self.done.done():
            self.done.set_result(None)


class EventPublisher:
    """Publishes envelopes to this node's outbox, durably, whether or not the hub is reachable.

    ``js_leaf`` is JetStream of the leaf the agent is connected to (its own domain). Every
    publish is acknowledged by the outbox; the envelope id goes into ``Nats-Msg-Id``, so
    re-publishing an envelope (a retry after a timeout, a replay) stores it once.
    """

    def __init__(
        self,
        js_leaf: JetStreamContext,
        node: str,
        *,
        subjects: Subjects = _DEFAULT_SUBJECTS,
        timeout: float = 5.0,
    ) -> None:
        self.node = check_node_id(node)
        self.stream = outbox_stream(node)
        self._js = js_leaf
        self._subjects = subjects
        self._timeout = timeout
        self._acks: _AckPipeline | None = None

    def subject_of(self, envelope: Envelope) -> str:
        """``<prefix>.evt.<node>.<content type>``."""
        return self._subjects.event(self.node, envelope.content.type)

    def _headers(self, envelope: Envelope) -> dict[str, str]:
        if envelope.content.kind != "event":
            raise ValueError(f"only events go to the event store, not a {envelope.content.kind}")
        return envelope.headers()

    async def publish(self, envelope: Envelope) -> PubAck:
        """Store one event in the outbox; returns the outbox's ack (``duplicate`` if seen)."""
        subject = self.subject_of(envelope)
        try:
            return await self._js.publish(
                subject,
                envelope.encode(),
                timeout=self._timeout,
                stream=self.stream,
                headers=self._headers(envelope),
            )
        except (nats.js.errors.APIError, nats.js.errors.NoStreamResponseError) as error:
            raise self._rejected(error) from error
        except nats.errors.Error as error:
            raise unreachable(f"publishing {subject} to the outbox {self.stream}", error) from error

    async def publish_event(
        self, event: AnyEvent, *, owner: str | None = None, cause: Envelope | None = None
    ) -> Envelope:
        """Wrap ``event`` (caused by ``cause``, if given), publish it, return its envelope."""
        envelope = event_envelope(event, owner=owner or self.node, cause=cause)
        await self.publish(envelope)
        return envelope

    async def publish_many(
        self,
        envelopes: Sequence[Envelope],
        *,
        timeout: float = _PUBLISH_MANY_TIMEOUT,
        window: int = _PUBLISH_WINDOW,
    ) -> list[PubAck]:
        """Publish ``envelopes`` pipelined, at most ``window`` unacknowledged; acks in order.

        Returns when every event is stored in the outbox. If any publish fails or is not
        acknowledged within ``timeout`` s, TransportError is raised after the others settle;
        publishing the same envelopes again is safe (duplicates are dropped by id), so the simple
        recovery is to retry the whole batch.
        """
        if not envelopes:
            return []
        pipeline = await self._pipeline()
        messages = [
            (self.subject_of(envelope), envelope.encode(), self._headers(envelope))
            for envelope in envelopes
        ]
        try:
            replies = await pipeline.send(messages, window=window, timeout=timeout)
        except TimeoutError:
            raise TransportError(
                f"events of a batch of {len(messages)} got no ack from the outbox {self.stream} "
                f"within {timeout:.0f} s; is the leaf server up and not overloaded? "
                "publish the batch again (duplicates are dropped)"
            ) from None
        except nats.errors.Error as error:
            raise unreachable(f"publishing to the outbox {self.stream}", error) from error
        acks: list[PubAck] = []
        errors: list[nats.js.errors.APIError | nats.js.errors.NoStreamResponseError] = []
        for reply in replies:
            if reply is None:
                errors.append(nats.js.errors.NoStreamResponseError())
                continue
            answer = json.loads(reply)
            if "error" in answer:
                errors.append(nats.js.errors.APIError.from_error(answer["error"]))
            else:
                acks.append(PubAck.from_response(answer))
        if errors:
            raise self._rejected(errors[0], count=len(errors)) from errors[0]
        return acks

    async def _pipeline(self) -> _AckPipeline:
        if self._acks is None:
            # A DomainJetStream aimed at another domain prefixes its publishes; keep that routing.
            prefix = getattr(self._js, "_publish_prefix", "")
            self._acks = await _AckPipeline.open(self._js._nc, prefix, self.stream)
        return self._acks

    async def close(self) -> None:
        """Release the pipeline's reply subscription (the connection stays open)."""
        if self._acks is not None:
            await self._acks.close()
            self._acks = None

    def _rejected(
        self,
        error: nats.js.errors.APIError | nats.js.errors.NoStreamResponseError,
        count: int = 1,
    ) -> TransportError:
        # No responders: no stream listens on the subject; 10060: expected stream not found.
        if isinstance(error, nats.js.errors.NoStreamResponseError) or error.err_code == 10060:
            return TransportError(
                f"no outbox {self.stream} on this leaf to take {count} event(s); create it with "
                "ensure_outbox() before publishing, and check the agent is connected to its leaf"
            )
        return TransportError(
            f"the outbox {self.stream} rejected {count} event(s): {error.description or error}; "
            "check its limits with `nats stream info` on the leaf"
        )

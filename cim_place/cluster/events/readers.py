"""Reading the event store: the controller's pushed feed, pulled readers, subscriptions.

This module owns every consumer of ``CIM_PLACE_EVENTS`` (cim_place.cluster.events.store owns the
stream and the leaf outboxes that feed it, events.sources its source list, events.publisher the
publisher):

- :class:`EventFeed`: the controller's projection reader, an ordered push consumer without acks
  that starts at a stream sequence and repairs its own gaps (ARCHITECTURE.md, "Event feed");
- :class:`EventReader`: pulled, durable or not, for tools (``cim-place tasks``) and tests;
- :func:`subscribe_events`: a callback per event, for applications (cim_place.comms).

Malformed messages are counted and logged, never raised.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass

import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
)

from cim_place.cluster.events.store import unreachable
from cim_place.cluster.nats.envelope import Envelope, EnvelopeError, decode
from cim_place.cluster.nats.subjects import EVENTS_STREAM, Subjects
from cim_place.errors import TransportError

__all__ = [
    "EventFeed",
    "EventReader",
    "EventSubscription",
    "StoredEvent",
    "subscribe_events",
]

_log = logging.getLogger(__name__)
_DEFAULT_SUBJECTS = Subjects()
_LEADER_RETRY = 0.1

EventHandler = Callable[[Envelope], Awaitable[None]]


def _skipped(sequence: int, subject: str, so_far: int, error: Exception) -> None:
    """Log a message of the event store that is not an envelope (it is counted, never raised)."""
    _log.warning(
        "skipped malformed message %d on %s in %s (%d so far): %s",
        sequence,
        subject,
        EVENTS_STREAM,
        so_far,
        error,
    )


def _publisher(subject: str, envelope: Envelope) -> str:
    """The node token of ``<prefix>.evt.<node>.<Type>``; the envelope's owner if there is none."""
    tokens = subject.rsplit(".", 2)
    return tokens[-2] if len(tokens) >= 2 else envelope.owner


SOURCE_HEADER = "Nats-Stream-Source"


def source_of(headers: dict[str, str] | None) -> str | None:
    """The name of the stream a sourced message came from: the first token of its
    ``Nats-Stream-Source`` header (``OUTBOX_a:<api hash> <sequence> ...``)."""
    if not headers:
        return None
    value = headers.get(SOURCE_HEADER)
    if not value:
        return None
    return value.split(" ", 1)[0].split(":", 1)[0]


@dataclass(frozen=True, slots=True)
class StoredEvent:
    """An event as the hub stored it: the envelope (with its stream sequence), the node that
    published it (the ``<prefix>.evt.<node>.<Type>`` subject token) and when it was stored."""

    envelope: Envelope
    node: str
    stored_at: float
    source: str | None = None
    """The stream the hub sourced it from (``OUTBOX_<node>``, from the ``Nats-Stream-Source``
    header); None when the message was published to the hub's stream directly."""


class EventReader:
    """Decoded envelopes of ``CIM_PLACE_EVENTS`` in stream order, with their stream sequence.

    Backed by a pull consumer: a durable one (named ``durable``, resumed across restarts) or an
    ephemeral one. Delivery is at least once: a batch is acknowledged when the next one is
    fetched (or on :meth:`commit`), so a consumer that dies mid-batch sees it again. Messages that
    are not valid envelopes are logged, counted in :attr:`malformed` and skipped.
    """

    def __init__(
        self,
        js_hub: JetStreamContext,
        *,
        durable: str | None = None,
        filter_subject: str | None = None,
        start_sequence: int | None = None,
        subjects: Subjects = _DEFAULT_SUBJECTS,
        batch: int = 256,
        ack_wait: float = 30.0,
    ) -> None:
        self._js = js_hub
        self.durable = durable
        self.filter_subject = filter_subject or subjects.all_events
        self._start = start_sequence
        self._batch = batch
        self._ack_wait = ack_wait
        self._sub: JetStreamContext.PullSubscription | None = None
        self._unacked: Msg | None = None
        self.malformed = 0
        """Messages that were not valid envelopes (skipped)."""
        self.delivered = 0
        """Envelopes handed to the caller."""
        self.last_sequence = 0
        """Stream sequence of the last message seen (valid or not)."""

    async def _subscription(self) -> JetStreamContext.PullSubscription:
        if self._sub is None:
            start = self._start if self.last_sequence == 0 else self.last_sequence + 1
            config = ConsumerConfig(
                ack_policy=AckPolicy.ALL,
                deliver_policy=DeliverPolicy.BY_START_SEQUENCE if start else DeliverPolicy.ALL,
                opt_start_seq=start,
                max_ack_pending=max(1000, self._batch * 4),
                ack_wait=self._ack_wait,
                # An ephemeral reader outlives short hub outages, and is removed after a long one.
                inactive_threshold=None if self.durable else 300.0,
            )
            try:
                self._sub = await self._js.pull_subscribe(
                    self.filter_subject, durable=self.durable, stream=EVENTS_STREAM, config=config
                )
            except nats.errors.Error as error:
                raise unreachable(f"opening a reader on {EVENTS_STREAM}", error) from error
        return self._sub

    async def fetch(self, max_messages: int | None = None, timeout: float = 1.0) -> list[Envelope]:
        """Up to ``max_messages`` next envelopes, waiting at most ``timeout`` s for the first.

        Returns an empty list when nothing arrives in time. Acknowledges the previous batch.
        """
        return [stored.envelope for stored in await self.fetch_stored(max_messages, timeout)]

    async def fetch_stored(
        self, max_messages: int | None = None, timeout: float = 1.0
    ) -> list[StoredEvent]:
        """Like :meth:`fetch`, with the publishing node (the subject's node token) and the time
        the hub stored each event."""
        await self.commit()
        sub = await self._subscription()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            try:
                messages = await sub.fetch(max_messages or self._batch, timeout=timeout)
                break
            except TimeoutError:  # nats-py's fetch also raises the bare asyncio one
                return []
            except nats.js.errors.NotFoundError:
                # The ephemeral consumer was removed (a long outage): open a new one where we were.
                self._sub = None
                return []
            except (nats.js.errors.ServiceUnavailableError, nats.errors.NoRespondersError) as error:
                # A consumer of a replicated stream answers only once its leader is elected
                # (just after creation, or after a hub member restarts): retry within the budget.
                if loop.time() + _LEADER_RETRY > deadline:
                    raise unreachable(f"reading {EVENTS_STREAM}", error) from error
                await asyncio.sleep(_LEADER_RETRY)
            except nats.errors.Error as error:
                raise unreachable(f"reading {EVENTS_STREAM}", error) from error
        envelopes: list[StoredEvent] = []
        for msg in messages:
            sequence = msg.metadata.sequence.stream
            self.last_sequence = sequence
            self._unacked = msg
            try:
                envelope = decode(msg.data, sequence=sequence)
                stored_at = msg.metadata.timestamp
                envelopes.append(
                    StoredEvent(
                        envelope,
                        _publisher(msg.subject, envelope),
                        stored_at.timestamp() if stored_at is not None else time.time(),
                        source_of(msg.headers),
                    )
                )
            except EnvelopeError as error:
                self.malformed += 1
                _skipped(sequence, msg.subject, self.malformed, error)
        self.delivered += len(envelopes)
        return envelopes

    async def pending(self) -> int:
        """Events in the stream not yet delivered to this reader (0: caught up, for now)."""
        sub = await self._subscription()
        try:
            info = await sub.consumer_info()
        except nats.errors.Error as error:
            raise unreachable(
                f"reading the position of a reader on {EVENTS_STREAM}", error
            ) from error
        return int(info.num_pending or 0)

    async def commit(self) -> None:
        """Acknowledge everything fetched so far (AckPolicy.ALL: one ack covers the batch)."""
        msg, self._unacked = self._unacked, None
        if msg is not None:
            with contextlib.suppress(nats.errors.Error):
                await msg.ack()

    async def __aiter__(self) -> AsyncIterator[Envelope]:
        """Envelopes forever; a hub outage is logged and retried, never raised."""
        while True:
            try:
                batch = await self.fetch()
            except TransportError as error:
                _log.warning("event reader on %s: %s", EVENTS_STREAM, error)
                await asyncio.sleep(1.0)
                continue
            for envelope in batch:
                yield envelope

    async def close(self) -> None:
        """Acknowledge what was read and stop the subscription (a durable consumer stays)."""
        await self.commit()
        if self._sub is not None:
            with contextlib.suppress(nats.errors.Error):
                await self._sub.unsubscribe()
            self._sub = None


def _delivery(reply: str) -> tuple[int, int, int, int]:
    """(stream sequence, consumer sequence, stored-at ns, messages pending) of a delivered message.

    From its reply subject, ``$JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ns>.<n>``
    (``n`` messages pending), or the form with a domain and account hash after ``$JS.ACK`` (and
    a trailing token) that newer servers may send. ValueError or IndexError for anything else.
    """
    tokens = reply.split(".")
    if len(tokens) == 9:
        return int(tokens[5]), int(tokens[6]), int(tokens[7]), int(tokens[8])
    return int(tokens[7]), int(tokens[8]), int(tokens[9]), int(tokens[10])


_STATUS = "Status"
_LAST_CONSUMER = "Nats-Last-Consumer"
_STALLED = "Nats-Consumer-Stalled"


class EventFeed:
    """Every event of ``CIM_PLACE_EVENTS`` from ``start_sequence`` on, pushed to ``handler``.

    The projection's reader: an ordered push consumer that the feed runs itself (ephemeral, in
    memory, no acks, flow control, idle heartbeats) on a plain subscription, so that each message
    costs one parse and one callback (nats-py's own ordered consumer adds about a third to that,
    and a pull per batch more). The hub streams a backlog through it without a request per batch
    and hands a new event over the moment it is stored.

    ``handler`` is called synchronously, in stream order, once per decoded event; it must not
    block (it runs on the subscription's delivery task); if it raises, the error is logged and
    counted in :attr:`handler_errors` and the feed goes on. Messages that are not valid envelopes
    are logged, counted in :attr:`malformed` and skipped. A gap (a consumer sequence that skips,
    a heartbeat that reports more than was received) or silence for two heartbeats (a hub
    restart, a lost connection) makes the feed recreate its consumer after the last message it
    took, on a new subscription whose predecessor's leftovers are dropped: delivery stays in order,
    without holes or repeats. The feed keeps no position on the hub: a controller rebuilds its
    projection whenever it starts, from the first event or after the snapshot it loaded
    (ARCHITECTURE.md).
    """

    def __init__(
        self,
        js_hub: JetStreamContext,
        handler: Callable[[StoredEvent], None],
        *,
        start_sequence: int = 1,
        filter_subject: str | Sequence[str] | None = None,
        subjects: Subjects = _DEFAULT_SUBJECTS,
        idle_heartbeat: float = 2.0,
    ) -> None:
        self._js = js_hub
        self._nc: Client = js_hub._nc
        self._handler = handler
        # One subject, or several (the controller reads only the event types it applies, not the
        # application events that share the store).
        self.filter_subjects = (
            [filter_subject]
            if isinstance(filter_subject, str)
            else list(filter_subject or [subjects.all_events])
        )
        self._idle_heartbeat = idle_heartbeat
        self._sub: Subscription | None = None
        self._consumer: str | None = None
        self._generation = 0  # messages of an older subscription are dropped
        self._expected = 1  # the next consumer sequence of the current consumer
        self._active = False
        self._resetting = False
        self._stopped = False
        self._watchdog: asyncio.Task[None] | None = None
        self._reset_task: asyncio.Task[None] | None = None
        self.caught_up = asyncio.Event()
        """Set once every event present when :meth:`start` returned has been handed over."""
        self.malformed = 0
        """Messages that were not valid envelopes (skipped)."""
        self.delivered = 0
        """Envelopes handed to the handler."""
        self.handler_errors = 0
        """Envelopes on which the handler raised (logged; the feed goes on)."""
        self.resets = 0
        """Times the consumer was recreated after a gap or silence."""
        self.last_sequence = max(1, start_sequence) - 1
        """Stream sequence of the last message taken (valid or not)."""

    async def start(self) -> None:
        """Create the consumer and start delivery; TransportError if the hub is unreachable."""
        if self._watchdog is not None:
            return
        try:
            await self._open()
        except nats.errors.Error as error:
            await self._close_current()
            raise unreachable(f"opening a feed on {EVENTS_STREAM}", error) from error
        self._watchdog = asyncio.get_running_loop().create_task(
            self._watch(), name="cim-place-event-feed-watchdog"
        )

    async def _open(self) -> None:
        """A new subscription, then a consumer delivering to it from after the last message."""
        deliver = self._nc.new_inbox()
        self._generation += 1
        generation = self._generation

        async def on_message(msg: Msg) -> None:
            if generation != self._generation:  # leftovers of a replaced subscription: dropped
                return
            self._active = True
            if not msg.data and msg.headers and _STATUS in msg.headers:
                await self._on_status(msg)
            else:
                self._take(msg)

        self._sub = await self._nc.subscribe(deliver, cb=on_message)
        self._expected = 1
        self._active = True
        config = ConsumerConfig(
            deliver_subject=deliver,
            deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
            opt_start_seq=self.last_sequence + 1,
            ack_policy=AckPolicy.NONE,
            filter_subject=self.filter_subjects[0] if len(self.filter_subjects) == 1 else None,
            filter_subjects=self.filter_subjects if len(self.filter_subjects) > 1 else None,
            flow_control=True,
            idle_heartbeat=self._idle_heartbeat,
            mem_storage=True,
            num_replicas=1,
            # Removed by the hub a minute after this subscription goes away unannounced.
            inactive_threshold=60.0,
        )
        info = await self._js.add_consumer(EVENTS_STREAM, config)
        self._consumer = info.name
        if not info.num_pending:
            # Nothing to read now; otherwise the message that leaves nothing pending sets it,
            # once handled (a message delivered but still queued here is not read yet).
            self.caught_up.set()

    def _take(self, msg: Msg) -> None:
        # Synchronous: one event is handled completely before the next is taken.
        try:
            sequence, consumer_sequence, stored_ns, pending = _delivery(msg.reply)
        except (ValueError, IndexError):
            self.malformed += 1
            _log.warning("skipped a message without JetStream metadata on %s", msg.subject)
            return
        if consumer_sequence != self._expected:
            self._gap(f"consumer sequence {consumer_sequence}, expected {self._expected}")
            return
        self._expected = consumer_sequence + 1
        self.last_sequence = sequence
        try:
            envelope = decode(msg.data, sequence=sequence)
        except EnvelopeError as error:
            self.malformed += 1
            _skipped(sequence, msg.subject, self.malformed, error)
        else:
            self.delivered += 1
            try:
                self._handler(
                    StoredEvent(
                        envelope,
                        _publisher(msg.subject, envelope),
                        stored_ns / 1e9,
                        source_of(msg.headers),
                    )
                )
            except Exception:
                # A bug in the handler costs this event, never the feed.
                self.handler_errors += 1
                _log.exception(
                    "event handler failed on %s #%d (%s)",
                    envelope.content.type,
                    sequence,
                    envelope.id,
                )
        if not pending:
            self.caught_up.set()

    async def _on_status(self, msg: Msg) -> None:
        headers = msg.headers or {}
        if msg.reply:
            # A flow-control request: everything delivered before it has been handled (this
            # callback takes messages in order), so the hub may send the next window.
            with contextlib.suppress(nats.errors.Error):
                await self._nc.publish(msg.reply)
            return
        stalled = headers.get(_STALLED)
        if stalled:
            with contextlib.suppress(nats.errors.Error):
                await self._nc.publish(stalled)
        last = headers.get(_LAST_CONSUMER)
        if last is not None and last.isdigit() and int(last) >= self._expected:
            self._gap(
                f"the hub delivered up to consumer sequence {last}, {self._expected - 1} came"
            )

    def _gap(self, what: str) -> None:
        _log.warning("event feed on %s: %s; recreating its consumer", EVENTS_STREAM, what)
        self._generation += 1  # drop whatever the old subscription still delivers
        self._reset_task = asyncio.get_running_loop().create_task(self._reset())

    async def _reset(self) -> None:
        if self._resetting or self._stopped:
            return
        self._resetting = True
        try:
            await self._close_current()
            await self._open()
            self.resets += 1
        except Exception as error:
            # The hub is away (or answered oddly): the watchdog tries again after the next silent
            # interval; the feed must outlive anything a reset meets.
            await self._close_current()
            _log.warning("event feed on %s: %s; retrying", EVENTS_STREAM, error or "unreachable")
        finally:
            self._resetting = False
        if self._stopped:
            await self._close_current()

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(2 * self._idle_heartbeat)
            if self._sub is None or not self._active:
                _log.info("event feed on %s: silent for two heartbeats", EVENTS_STREAM)
                await self._reset()
            self._active = False

    async def _close_current(self) -> None:
        sub, self._sub = self._sub, None
        consumer, self._consumer = self._consumer, None
        if sub is not None:
            with contextlib.suppress(nats.errors.Error):
                await sub.unsubscribe()
        if consumer is not None:
            with contextlib.suppress(nats.errors.Error, asyncio.TimeoutError):
                await self._js.delete_consumer(EVENTS_STREAM, consumer)

    async def stop(self) -> None:
        """Stop delivery and remove the consumer (best effort: the hub removes it anyway)."""
        self._stopped = True
        self._generation += 1
        watchdog, self._watchdog = self._watchdog, None
        if watchdog is not None:
            watchdog.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watchdog
        await self._close_current()


@dataclass
class EventSubscription:
    """A running :func:`subscribe_events` loop and its counters."""

    reader: EventReader
    task: asyncio.Task[None]
    handled: int = 0
    handler_errors: int = 0

    @property
    def malformed(self) -> int:
        return self.reader.malformed

    async def stop(self) -> None:
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task
        await self.reader.close()


async def subscribe_events(
    js_hub: JetStreamContext,
    durable: str | None,
    handler: EventHandler,
    *,
    filter_subject: str | None = None,
    start_sequence: int | None = None,
    subjects: Subjects = _DEFAULT_SUBJECTS,
    ack_wait: float = 30.0,
) -> EventSubscription:
    """Call ``handler`` for every event of the hub stream, in order, in a background task.

    An exception from ``handler`` is logged and counted (``handler_errors``) and the event is not
    retried: the controller's periodic full pass repairs what a failed event missed, which keeps
    one bad event from blocking the stream. Malformed messages are counted in ``malformed``.
    """
    reader = EventReader(
        js_hub,
        durable=durable,
        filter_subject=filter_subject,
        start_sequence=start_sequence,
        subjects=subjects,
        ack_wait=ack_wait,
    )
    await reader._subscription()  # fail now, not in the background, if the hub is unreachable

    async def run() -> None:
        async for envelope in reader:
            try:
                await handler(envelope)
                subscription.handled += 1
            except Exception:
                subscription.handler_errors += 1
                _log.exception(
                    "event handler failed on %s #%s (%s)",
                    envelope.content.type,
                    envelope.sequence,
                    envelope.id,
                )

    subscription = EventSubscription(reader, asyncio.get_running_loop().create_task(run()))
    return subscription

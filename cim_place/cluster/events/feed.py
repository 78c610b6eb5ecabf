"""The controller's event feed: every stored event, pushed in order, gaps repaired.

This module owns :class:`EventFeed`, the projection's reader of ``CIM_PLACE_EVENTS``: an ordered
push consumer without acks that the feed runs itself, starting at a stream sequence and
recreating its consumer after the last message it took whenever a gap or silence shows
(ARCHITECTURE.md, "Event feed"). The other readers of the stream are in
:mod:`cim_place.cluster.events.readers`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence

import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from cim_place.cluster.events.readers import StoredEvent, log_skipped, publisher_of, source_of
from cim_place.cluster.events.store import unreachable
from cim_place.cluster.nats.envelope import EnvelopeError, decode
from cim_place.cluster.nats.subjects import EVENTS_STREAM, Subjects

__all__ = ["EventFeed"]

_log = logging.getLogger(__name__)
_DEFAULT_SUBJECTS = Subjects()


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
            log_skipped(sequence, msg.subject, self.malformed, error)
        else:
            self.delivered += 1
            try:
                self._handler(
                    StoredEvent(
                        envelope,
                        publisher_of(msg.subject, envelope),
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

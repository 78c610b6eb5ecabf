"""Reading the event store: the controller's pushed feed, pulled readers, subscriptions.

This module owns every consumer of ``CIM_PLACE_EVENTS`` (cim_place.cluster.events.store owns the
stream and the leaf outboxes that feed it, events.sources its source list, events.publisher the
publisher):

- ``EventFeed`` (:mod:`cim_place.cluster.events.feed`): the controller's projection reader, an
  ordered push consumer without acks that starts at a stream sequence and repairs its own gaps
  (ARCHITECTURE.md, "Event feed"); it reads events as ``StoredEvent``, defined here;
- :class:`EventReader`: pulled, durable or not, for tools (``cim-place tasks``) and tests;
- :func:`subscribe_events`: a callback per event, for applications (cim_place.comms).

Malformed messages are counted and logged, never raised.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import nats.errors
import nats.js.errors
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from cim_place.cluster.events.store import unreachable
from cim_place.cluster.nats.envelope import Envelope, EnvelopeError, decode
from cim_place.cluster.nats.subjects import EVENTS_STREAM, Subjects
from cim_place.errors import TransportError

__all__ = [
    "SOURCE_HEADER",
    "EventHandler",
    "EventReader",
    "EventSubscription",
    "StoredEvent",
    "log_skipped",
    "publisher_of",
    "source_of",
    "subscribe_events",
]


_log = logging.getLogger(__name__)
_DEFAULT_SUBJECTS = Subjects()
_LEADER_RETRY = 0.1

EventHandler = Callable[[Envelope], Awaitable[None]]


def log_skipped(sequence: int, subject: str, so_far: int, error: Exception) -> None:
    """Log a message of the event store that is not an envelope (it is counted, never raised)."""
    _log.warning(
        "skipped malformed message %d on %s in %s (%d so far): %s",
        sequence,
        subject,
        EVENTS_STREAM,
        so_far,
        error,
    )


def publisher_of(subject: str, envelope: Envelope) -> str:
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
                        publisher_of(msg.subject, envelope),
                        stored_at.timestamp() if stored_at is not None else time.time(),
                        source_of(msg.headers),
                    )
                )
            except EnvelopeError as error:
                self.malformed += 1
                log_skipped(sequence, msg.subject, self.malformed, error)
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

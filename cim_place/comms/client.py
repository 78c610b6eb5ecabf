"""The comms client: send, request and subscribe to application messages, offloading large content.

One :class:`Comms` per process, connected to the leaf its node's agent runs on (``node``):

- :meth:`Comms.send` offloads the body's large values (``cim_place.comms.offload``), wraps the
  content in an envelope and sends it where its kind goes (``cim_place.comms.routes``): commands
  and queries on core NATS, events into the leaf's outbox, acknowledged, so they persist in the
  hub's event store even when the hub is away at that moment.
- :meth:`Comms.request` sends a query (or command) and returns the handler's reply event.
- :meth:`Comms.subscribe` calls a handler for every matching message. What the handler returns
  (an event, ``cim_place.comms.event(...)``) is caused by the message it handled (same
  correlation, causation = the message's id): it is persisted and, for a request, it is the reply.

Envelopes are built (and small ones encoded at once) by ``cim_place.comms.outgoing``. Received
offloaded content is resolved on demand through the client's ContentAccessor.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from cim_place.cluster.events.readers import EventSubscription, subscribe_events
from cim_place.cluster.exchange.fetch_model import Labels
from cim_place.cluster.nats.connection import connect, flushed, jetstream
from cim_place.cluster.nats.envelope import KINDS, Content, Envelope, EnvelopeError, Kind, decode
from cim_place.cluster.nats.security import identity_of
from cim_place.cluster.nats.subjects import HUB_DOMAIN, Subjects, check_node_id, outbox_stream
from cim_place.comms.access import ContentAccessor
from cim_place.comms.content import BodyInput, InvalidMessageError, event
from cim_place.comms.message import Message, received
from cim_place.comms.offload import Offloader
from cim_place.comms.outgoing import Outgoing, too_large
from cim_place.comms.routes import Routes
from cim_place.comms.settings import ThresholdCache
from cim_place.errors import CimPlaceError, TransportError
from cim_place.interfaces import BlockSource

__all__ = ["AppSubscription", "Comms", "Handler", "HandlerFailedError"]

_log = logging.getLogger(__name__)

Handler = Callable[[Message], Awaitable[Content | None]]
"""Handles one message; may return an event (``cim_place.comms.event``) caused by it."""

HANDLED = "Handled"
"""Reply type when a handler of a request returned nothing (not persisted)."""
HANDLER_FAILED = "HandlerFailed"
"""Reply type when a handler of a request raised (not persisted); ``request`` raises for it."""


class HandlerFailedError(CimPlaceError):
    """The handler of a request raised; the message names the handler's error."""


@dataclass
class AppSubscription:
    """A running :meth:`Comms.subscribe`; stop it with :meth:`stop`."""

    pattern: str
    kinds: tuple[Kind, ...]
    handled: int = 0
    handler_errors: int = 0
    malformed: int = 0
    """Messages on the subjects that were not valid envelopes (skipped)."""
    _subs: list[Subscription] = field(default_factory=list, repr=False)
    _durable: EventSubscription | None = field(default=None, repr=False)

    async def stop(self) -> None:
        for sub in self._subs:
            with contextlib.suppress(nats.errors.Error):
                await sub.unsubscribe()
        self._subs = []
        if self._durable is not None:
            await self._durable.stop()
            self._durable = None


class Comms:
    """Application messaging over a cim-place domain.

    ``nc`` is connected to the leaf of ``node`` (whose agent stores offloaded content).
    ``owner`` goes into every envelope and onto offloaded pins (with object access control, the
    connection's NATS user: only the owner, the agents and ``readers`` may fetch offloaded
    content; ``readers`` defaults to ``*``, every authenticated user, like the message itself).
    ``threshold`` fixes the offload threshold in bytes; by default the domain's setting in KV
    is used (64 KiB when unset).
    ``local`` lists block sources read before fetching (an agent's volumes on this machine),
    ``cache_dir`` keeps fetched content (default: a temporary directory), ``near`` is this
    node's labels (nearest holders first).
    """

    def __init__(
        self,
        nc: Client,
        node: str,
        *,
        owner: str = "",
        readers: Sequence[str] = ("*",),
        subjects: Subjects | None = None,
        hub_domain: str = HUB_DOMAIN,
        threshold: int | None = None,
        local: Sequence[BlockSource] = (),
        cache_dir: Path | None = None,
        near: Labels | None = None,
        request_timeout: float = 5.0,
        upload_timeout: float = 30.0,
    ) -> None:
        self.nc = nc
        self.node = check_node_id(node)
        self.owner = owner
        self.readers = tuple(readers)
        self.subjects = subjects if subjects is not None else Subjects()
        self.routes = Routes(self.subjects)
        self.request_timeout = request_timeout
        self._js_hub = jetstream(nc, hub_domain)
        self.threshold = ThresholdCache(self._js_hub, fixed=threshold)
        self.offloader = Offloader(
            nc, self.node, owner=owner, subjects=self.subjects, timeout=upload_timeout
        )
        self._outgoing = Outgoing(
            nc, self.threshold, self.offloader, owner=owner, readers=self.readers
        )
        self.accessor = ContentAccessor(
            nc, subjects=self.subjects, local=local, cache_dir=cache_dir, near=near
        )
        self._js_leaf = nc.jetstream()
        self._outbox = outbox_stream(self.node)
        self._owns_connection = False
        self._subscriptions: list[AppSubscription] = []

    @classmethod
    async def connect(
        cls,
        servers: str | list[str] | None,
        node: str,
        *,
        creds: str | None = None,
        name: str = "cim-place-comms",
        **options: Any,
    ) -> Comms:
        """Connect to ``node``'s leaf server and return a client that closes the connection.

        ``owner`` defaults to the user named in the server URL (the identity NATS checks).
        """
        nc = await connect(servers, creds=creds, name=name, for_service=True)
        if "owner" not in options and servers is not None:
            options["owner"] = identity_of(servers) or ""
        comms = cls(nc, node, **options)
        comms._owns_connection = True
        return comms

    async def close(self) -> None:
        """Stop every subscription, drop the content cache, close an owned connection."""
        for subscription in self._subscriptions:
            await subscription.stop()
        self._subscriptions = []
        self.accessor.close()
        if self._owns_connection:
            with contextlib.suppress(Exception):
                await self.nc.drain()

    async def __aenter__(self) -> Comms:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- sending --------------------------------------------------------------------------------

    async def envelope(
        self,
        content: Content,
        *,
        cause: Message | Envelope | None = None,
        metadata: Mapping[str, str] | None = None,
        readers: Sequence[str] | None = None,
    ) -> Envelope:
        """The envelope ``send`` would send: large values offloaded (uploaded now)."""
        return (await self._outgoing.prepare(content, cause, metadata, readers))[0]

    async def send(
        self,
        content: Content,
        *,
        cause: Message | Envelope | None = None,
        metadata: Mapping[str, str] | None = None,
        readers: Sequence[str] | None = None,
    ) -> Envelope:
        """Send a command, query or event; returns the envelope as it travelled.

        ``readers`` overrides the client's readers of the content offloaded from this message.
        An event is acknowledged by this leaf's outbox before this returns (it persists); a
        command or query is published on core NATS (delivered to the handlers subscribed now).
        """
        ready = self._outgoing.inline(content, cause, metadata)
        if ready is None:
            envelope = await self._outgoing.offloaded(content, cause, metadata, readers)
            data = envelope.encode()
        else:
            envelope, data = ready
        sent = envelope.content
        if sent.kind == "event":
            await self._persist(envelope, self._outgoing.encode(envelope, data))
            return envelope
        subject = self.routes.of(sent.kind, sent.type, self.node)
        try:
            # No headers on core NATS: no stream stores the message, the subject names its kind
            # and type, the envelope the rest; headers would halve the rate (nats-py builds and
            # parses them per message). nats-py checks the server's max payload before it
            # writes anything, so the size is not checked twice here.
            await self.nc.publish(subject, data)
        except nats.errors.MaxPayloadError:
            raise too_large(envelope, len(data), self.nc.max_payload) from None
        except nats.errors.Error as error:
            raise TransportError(
                f"cannot publish {sent.type} on {subject}: {error or type(error)}; "
                "check the connection to the leaf server"
            ) from error
        return envelope

    async def _persist(self, envelope: Envelope, data: bytes) -> None:
        """Store the event ``envelope`` (encoded as ``data``) in this leaf's outbox."""
        subject = self.routes.of("event", envelope.content.type, self.node)
        try:
            await self._js_leaf.publish(
                subject,
                data,
                stream=self._outbox,
                headers=envelope.headers(),
            )
        except (nats.js.errors.NoStreamResponseError, nats.errors.NoRespondersError) as error:
            raise TransportError(
                f"no outbox {self._outbox} on this leaf for event {envelope.content.type}: is "
                f"the agent of {self.node} running, and is this client connected to its leaf?"
            ) from error
        except nats.errors.Error as error:
            raise TransportError(
                f"the outbox {self._outbox} did not store event {envelope.content.type}: "
                f"{error or type(error)}; check the leaf server"
            ) from error

    async def request(
        self,
        content: Content,
        *,
        timeout: float | None = None,
        cause: Message | Envelope | None = None,
        metadata: Mapping[str, str] | None = None,
        readers: Sequence[str] | None = None,
    ) -> Message:
        """Send a query (or command) and return the handler's reply event.

        Raises TransportError when no handler is subscribed or none answers within ``timeout``
        (default ``request_timeout``), HandlerFailedError when the handler raised.
        """
        if content.kind == "event":
            raise InvalidMessageError(
                f"{content.type} is an event: events are sent, not requested; use send()"
            )
        envelope, data = await self._outgoing.prepare(content, cause, metadata, readers)
        subject = self.routes.of(envelope.content.kind, envelope.content.type, self.node)
        wait = self.request_timeout if timeout is None else timeout
        try:
            msg = await self.nc.request(
                subject, self._outgoing.encode(envelope, data), timeout=wait
            )
        except nats.errors.NoRespondersError:
            raise TransportError(
                f"no handler for {envelope.content.type} ({subject}); start one with "
                f"Comms.subscribe({envelope.content.type!r}, handler)"
            ) from None
        except nats.errors.TimeoutError:
            raise TransportError(
                f"no reply to {envelope.content.type} within {wait:g} s ({subject}); the "
                "handler may be slow or stopped: retry, or raise the timeout"
            ) from None
        try:
            reply = decode(msg.data)
        except EnvelopeError as error:
            raise TransportError(
                f"the reply to {envelope.content.type} is malformed: {error}"
            ) from None
        if reply.content.type == HANDLER_FAILED:
            raise HandlerFailedError(
                f"the handler of {envelope.content.type} failed: "
                f"{reply.content.body.get('error', 'no detail')!s}"
            )
        return Message(reply, msg.subject, self.accessor)

    # -- receiving ------------------------------------------------------------------------------

    async def subscribe(
        self,
        pattern: str,
        handler: Handler,
        *,
        kinds: Sequence[Kind] = KINDS,
        queue: str | None = None,
        durable: str | None = None,
    ) -> AppSubscription:
        """Call ``handler`` for each message whose type matches ``pattern`` (a type, or ``*``).

        ``kinds`` limits the kinds handled. ``queue`` shares commands and queries (and live
        events) among the handlers of a queue group. Events arrive live (core NATS, from now
        on), or, with ``durable``, from the hub's event store through a durable consumer of that
        name: every event since the consumer was created, at least once, resumed after a
        restart. Messages of one subscription are handled one at a time, in arrival order.
        """
        unknown = set(kinds) - set(KINDS)
        if unknown:
            raise InvalidMessageError(f"unknown message kinds {sorted(unknown)}; use {KINDS}")
        subscription = AppSubscription(pattern, tuple(kinds))
        accessor = self.accessor
        try:
            for kind in subscription.kinds:
                filter_subject = self.routes.pattern(kind, pattern)
                if kind == "event" and durable is not None:

                    async def on_event(envelope: Envelope, subject: str = filter_subject) -> None:
                        await self._handle(subscription, handler, envelope, subject, None)

                    subscription._durable = await subscribe_events(
                        self._js_hub, durable, on_event, filter_subject=filter_subject
                    )
                    continue

                async def on_msg(msg: Msg) -> None:
                    # Decoded and handled here rather than in further coroutines: this runs per
                    # message, and most are commands whose handler answers nothing.
                    try:
                        envelope = decode(msg.data)
                    except EnvelopeError as error:
                        await self._malformed(subscription, msg, error)
                        return
                    reply_to = msg.reply or None
                    try:
                        result = await handler(received(envelope, msg.subject, accessor))
                    except Exception as error:
                        await self._failed(subscription, envelope, reply_to, error)
                        return
                    if result is None and reply_to is None:
                        subscription.handled += 1
                        return
                    await self._answer(subscription, envelope, result, reply_to)

                subscription._subs.append(
                    await self.nc.subscribe(filter_subject, queue=queue or "", cb=on_msg)
                )
            await flushed(self.nc)
        except BaseException:
            await subscription.stop()
            raise
        self._subscriptions.append(subscription)
        return subscription

    async def _malformed(self, subscription: AppSubscription, msg: Msg, error: Exception) -> None:
        subscription.malformed += 1
        _log.warning("skipped a malformed message on %s: %s", msg.subject, error)
        if msg.reply:
            await self._reply(msg.reply, None, HANDLER_FAILED, {"error": str(error)})

    async def _handle(
        self,
        subscription: AppSubscription,
        handler: Handler,
        envelope: Envelope,
        subject: str,
        reply_to: str | None,
    ) -> None:
        try:
            result = await handler(received(envelope, subject, self.accessor))
        except Exception as error:
            await self._failed(subscription, envelope, reply_to, error)
            return
        await self._answer(subscription, envelope, result, reply_to)

    async def _answer(
        self,
        subscription: AppSubscription,
        envelope: Envelope,
        result: Content | None,
        reply_to: str | None,
    ) -> None:
        """Persist the event a handler returned for ``envelope``, and reply to a request."""
        try:
            if result is not None and result.kind != "event":
                raise InvalidMessageError(
                    f"a handler returned a {result.kind} ({result.type}); handlers return an "
                    "event (cim_place.comms.event) or None"
                )
            # Built here so that a failed offload of the answer is the handler's failure too.
            answer, data = (None, None)
            if result is not None:
                answer, known = await self._outgoing.prepare(result, envelope, None, None)
                data = self._outgoing.encode(answer, known)
        except Exception as error:
            await self._failed(subscription, envelope, reply_to, error)
            return
        subscription.handled += 1
        if answer is None or data is None:
            if reply_to:
                await self._reply(reply_to, envelope, HANDLED, {})
            return
        try:
            await self._persist(answer, data)
        except CimPlaceError as error:
            # The requester still gets its answer; the event store misses this one event.
            _log.error("event %s caused by %s not persisted: %s", answer.id, envelope.id, error)
        if reply_to:
            with contextlib.suppress(nats.errors.Error):
                await self.nc.publish(reply_to, data)

    async def _failed(
        self,
        subscription: AppSubscription,
        envelope: Envelope,
        reply_to: str | None,
        error: Exception,
    ) -> None:
        """The handler of ``envelope`` raised ``error`` (or its answer could not be built)."""
        subscription.handler_errors += 1
        _log.error("handler of %s %s failed", envelope.content.type, envelope.id, exc_info=error)
        if reply_to:
            detail = f"{type(error).__name__}: {error}"
            await self._reply(reply_to, envelope, HANDLER_FAILED, {"error": detail})

    async def _reply(
        self, reply_to: str, cause: Envelope | None, reply_type: str, body: BodyInput
    ) -> None:
        content = event(reply_type, body)
        if cause is None:
            answer = Envelope.new(content, owner=self.owner)
        else:
            answer = cause.caused(content, owner=self.owner)
        with contextlib.suppress(nats.errors.Error):
            await self.nc.publish(reply_to, answer.encode())

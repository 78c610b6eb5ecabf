"""The event store: typed events, leaf outboxes sourced by the hub, readers, on real servers."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Awaitable, Callable
from typing import TypeVar

import legacy_codec
import pytest
from hypothesis import given
from hypothesis import strategies as st
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.errors import NoStreamResponseError, ServiceUnavailableError

from cim_place.cluster.events.feed import EventFeed
from cim_place.cluster.events.publisher import EventPublisher
from cim_place.cluster.events.readers import EventReader, StoredEvent, subscribe_events
from cim_place.cluster.events.sources import SourceKeeper, attach_leaf, detach_leaf, nudge_sources
from cim_place.cluster.events.store import ensure_event_store, ensure_outbox, hub_size
from cim_place.cluster.events.types import (
    EVENT_TYPES,
    AnyEvent,
    EventBodyError,
    InventoryDigest,
    NodeJoined,
    NodeLeft,
    ObjectDeleted,
    ObjectRemoved,
    ObjectStored,
    ReplicaDamaged,
    TaskCompleted,
    TaskFailed,
    event_envelope,
    inventory_digest,
    object_fields,
    parse_event,
)
from cim_place.cluster.nats.connection import DomainJetStream, connected, jetstream
from cim_place.cluster.nats.envelope import Content, Envelope, decode
from cim_place.cluster.nats.subjects import EVENTS_STREAM, Subjects
from cim_place.errors import TransportError
from cim_place.local.servers import NatsServer
from cim_place.local.topologies import Hub
from cim_place.objectstore.cid import RAW, make_cid
from cim_place.objectstore.dagcbor import Link
from cim_place.testing import LeafFactory

T = TypeVar("T")

_UNREACHABLE = (
    NoRespondersError,
    NoStreamResponseError,
    ServiceUnavailableError,
    NatsTimeoutError,
    asyncio.TimeoutError,
)


def cid_of(data: bytes) -> bytes:
    return make_cid(RAW, data)


def stored(i: int, volume: str = "v1") -> ObjectStored:
    return ObjectStored(
        root=cid_of(f"object {i}".encode()),
        size=1000 + i,
        blocks=1 + i % 3,
        volume=volume,
        owner="alice",
        name=f"doc-{i}",
        metadata={"i": str(i)},
    )


SAMPLES: list[AnyEvent] = [
    stored(1),
    ObjectRemoved(root=cid_of(b"gone"), size=3, blocks=1, volume="v2", owner="bob"),
    ObjectDeleted(root=cid_of(b"gone"), by="ana@host", reason="GDPR", names=("a/b",)),
    InventoryDigest(
        volume="v1",
        pins=2,
        size=2048,
        digest=inventory_digest([cid_of(b"a"), cid_of(b"b")]),
        taken_at=1_700_000_000.5,
    ),
    NodeJoined(
        node="leaf-a",
        labels={"region": "eu", "zone": "eu-1", "host": "h1"},
        tags=("ssd",),
        volumes=("v1", "v2"),
        version="0.1.0",
        started_at=1_700_000_000.0,
    ),
    NodeLeft(node="leaf-a", reason="shutdown"),
    TaskCompleted(
        task_id="t-1",
        action="fetch",
        node="leaf-a",
        root=cid_of(b"x"),
        volume="v1",
        attempts=1,
        duration=0.25,
        result={"bytes_fetched": 10},
    ),
    TaskFailed(
        task_id="t-2",
        action="drop",
        node="leaf-a",
        root=None,
        volume=None,
        attempts=5,
        reason="full",
        permanent=True,
    ),
    ReplicaDamaged(
        root=cid_of(b"object 1"),
        node="leaf-a",
        volume="v0",
        blocks=(cid_of(b"block 1"), cid_of(b"block 2")),
        problem="corrupt",
        found_by="scrub",
    ),
]


def _sample(kind: type[AnyEvent]) -> AnyEvent:
    return next(event for event in SAMPLES if isinstance(event, kind))


# -- events, no server -------------------------------------------------------------------------


@pytest.mark.parametrize("event", SAMPLES, ids=lambda e: e.TYPE)
def test_every_event_round_trips_through_an_envelope(event: AnyEvent) -> None:
    envelope = event_envelope(event, owner="leaf-a")
    decoded = decode(envelope.encode(), sequence=7)
    assert decoded.content.type == event.TYPE
    assert parse_event(decoded) == event


def test_every_event_type_is_sampled() -> None:
    assert {e.TYPE for e in SAMPLES} == set(EVENT_TYPES)


def test_cids_travel_as_links() -> None:
    body = stored(3).body()
    assert body["root"] == Link(cid_of(b"object 3"))


def test_task_outcomes_are_caused_by_their_task() -> None:
    task = Envelope.new(Content("command", "fetch", {}), owner="controller")
    done = event_envelope(_sample(TaskCompleted), owner="leaf-a", cause=task)
    assert done.causation_id == task.id
    assert done.correlation_id == task.correlation_id


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        (Content("event", "Nonsense", {}), "unknown event type"),
        (Content("command", "ObjectStored", {}), "not an event"),
        (Content("event", "ObjectStored", {"size": 1}), "missing field 'root'"),
        (Content("event", "NodeLeft", {"node": 5, "reason": ""}), "NodeLeft.node"),
        (
            Content("event", "ObjectStored", {**stored(1).body(), "size": True}),
            "ObjectStored.size",
        ),
        (
            Content("event", "ObjectStored", {**stored(1).body(), "root": b"not-a-link"}),
            "ObjectStored.root",
        ),
        (
            Content("event", "TaskFailed", {**_sample(TaskFailed).body(), "action": "explode"}),
            "TaskFailed.action",
        ),
        (
            Content(
                "event", "InventoryDigest", {**_sample(InventoryDigest).body(), "digest": b"short"}
            ),
            "InventoryDigest.digest",
        ),
    ],
)
def test_malformed_bodies_name_the_problem(content: Content, fragment: str) -> None:
    envelope = Envelope.new(content, owner="x")
    with pytest.raises(EventBodyError, match=fragment):
        parse_event(decode(envelope.encode()))


field_values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-5, max_value=2**40),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=6),
    st.binary(max_size=6),
    st.just(Link(cid_of(b"x"))),
    st.dictionaries(st.text(max_size=3), st.one_of(st.text(max_size=3), st.integers()), max_size=2),
)
OBJECT_FIELDS = ("root", "size", "blocks", "volume", "owner", "name", "metadata")


@given(st.dictionaries(st.sampled_from(OBJECT_FIELDS), field_values), st.booleans())
def test_object_events_parse_in_one_pass_exactly_as_field_by_field(
    fields: dict[str, object], complete: bool
) -> None:
    # The projection's one-pass read against the hand-written readers the codec replaced.
    body: dict[str, object] = {**stored(1).body(), **fields} if complete else dict(fields)

    def outcome(parse: Callable[[], object]) -> object:
        try:
            return parse()
        except EventBodyError as error:
            return ("error", str(error))

    slow = outcome(lambda: legacy_codec.from_body(ObjectStored, body))
    fast = object_fields(body)  # type: ignore[arg-type]
    if fast is None:
        assert isinstance(slow, tuple)
    else:
        assert ObjectStored(**dict(zip(OBJECT_FIELDS, fast, strict=True))) == slow  # type: ignore[arg-type]
    assert outcome(lambda: ObjectStored.from_body(body)) == slow  # type: ignore[arg-type]


def test_inventory_digest_ignores_order_and_repeats() -> None:
    a, b, c = cid_of(b"a"), cid_of(b"b"), cid_of(b"c")
    assert inventory_digest([a, b, c]) == inventory_digest([c, a, b, a])
    assert inventory_digest([a, b]) != inventory_digest([a, b, c])
    assert len(inventory_digest([])) == 32


@given(
    st.lists(
        st.one_of(st.binary(min_size=34, max_size=34), st.binary(min_size=36, max_size=36)),
        max_size=40,
    ),
    st.booleans(),
)
def test_inventory_digest_is_its_definition(roots: list[bytes], one_width: bool) -> None:
    """The digest of one join (every root of one width) equals the definition, root by root:
    SHA-256 over the sorted distinct roots, each after its length in two bytes."""
    if one_width:
        roots = [root for root in roots if len(root) == 36]
    reference = hashlib.sha256()
    for root in sorted(set(roots)):
        reference.update(len(root).to_bytes(2, "big") + root)
    assert inventory_digest(roots) == reference.digest()
    assert inventory_digest([*roots, *roots[:3]]) == reference.digest()


# -- helpers on real servers -------------------------------------------------------------------


async def eventually(action: Callable[[], Awaitable[T]], attempts: int = 300) -> T:
    """Retry ``action`` while the other domain is unreachable (a leaf link coming up)."""
    for _ in range(attempts - 1):
        try:
            return await action()
        except _UNREACHABLE:
            await asyncio.sleep(0.1)
    return await action()


async def eventually_true(check: Callable[[], Awaitable[bool]], attempts: int = 300) -> bool:
    for _ in range(attempts):
        if await check():
            return True
        await asyncio.sleep(0.1)
    return False


async def wait_for_messages(js_hub: DomainJetStream, count: int, attempts: int = 600) -> None:
    for _ in range(attempts):
        if (await js_hub.stream_info(EVENTS_STREAM)).state.messages >= count:
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"{EVENTS_STREAM} did not reach {count} messages")


async def read_hub(js_hub: DomainJetStream, filter_subject: str | None = None) -> list[Envelope]:
    """Every envelope now in the hub stream (or on ``filter_subject``), in stream order."""
    reader = EventReader(js_hub, filter_subject=filter_subject)
    seen: list[Envelope] = []
    try:
        for _ in range(100):
            seen.extend(await reader.fetch(timeout=5.0))
            if await reader.pending() == 0:
                break
    finally:
        await reader.close()
    return seen


async def settle(js_hub: DomainJetStream, count: int) -> None:
    """Wait for ``count`` messages, then make sure no more arrive (no duplicates late)."""
    await wait_for_messages(js_hub, count)
    await asyncio.sleep(1.0)
    assert (await js_hub.stream_info(EVENTS_STREAM)).state.messages == count


async def join(leaf_nc: Client, node: str) -> tuple[EventPublisher, DomainJetStream]:
    """What an agent does at start: its outbox, then attach it from the leaf (hub via the link)."""
    js_leaf = jetstream(leaf_nc)
    await ensure_outbox(js_leaf, node)
    js_hub_from_leaf = jetstream(leaf_nc, "hub")
    await eventually(lambda: attach_leaf(js_hub_from_leaf, node))
    return EventPublisher(js_leaf, node), js_hub_from_leaf


async def cut_publish_restore(
    hub: Hub, leaf: NatsServer, publisher: EventPublisher, js_hub: DomainJetStream
) -> list[Envelope]:
    """One event through the live link, then 50 while the link is cut; returns all 51 sent."""
    assert leaf.link is not None
    first = await publisher.publish_event(stored(0))
    await wait_for_messages(js_hub, 1)

    leaf.link.cut()
    await asyncio.to_thread(_wait_until, lambda: leaf.leafnode_count() == 0)
    sent = [first]
    # The leaf's own domain takes every event while the hub is away, one by one or pipelined.
    for i in range(1, 26):
        sent.append(await publisher.publish_event(stored(i)))
    batch = [event_envelope(stored(i), owner=publisher.node) for i in range(26, 51)]
    await publisher.publish_many(batch)
    sent.extend(batch)
    info = await publisher._js.stream_info(publisher.stream)
    assert info.state.messages == 51

    leaf.link.restore()
    await asyncio.to_thread(leaf.wait_leaf_connected)
    await eventually(lambda: nudge_sources(js_hub, publisher.node))
    await settle(js_hub, 51)
    return sent


def _wait_until(predicate: Callable[[], bool], attempts: int = 600) -> None:
    import time

    for _ in range(attempts):
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError("condition not reached")


def assert_same_events_in_order(arrived: list[Envelope], sent: list[Envelope]) -> None:
    ids = [e.id for e in arrived]
    assert len(ids) == len(set(ids)), "an event arrived twice"
    assert ids == [e.id for e in sent]
    sequences = [e.sequence or 0 for e in arrived]
    assert sequences == sorted(sequences)
    assert 0 not in sequences
    assert [parse_event(e) for e in arrived] == [parse_event(e) for e in sent]


# -- store and forward -------------------------------------------------------------------------


async def test_events_of_a_cut_off_leaf_arrive_once_and_in_order(
    hub1: Hub, leaf_factory: LeafFactory
) -> None:
    leaf = leaf_factory("leaf-a", via_proxy=True)
    async with connected(hub1.urls) as hub_nc, connected(leaf.url) as leaf_nc:
        assert hub_size(hub_nc) == 1
        js_hub = jetstream(hub_nc, "hub")
        await ensure_event_store(js_hub, replicas=1)
        with pytest.raises(TransportError, match="not 'hub'"):
            hub_size(leaf_nc)
        publisher, _ = await join(leaf_nc, "leaf-a")

        sent = await cut_publish_restore(hub1, leaf, publisher, js_hub)

        arrived = await read_hub(js_hub)
        assert len(arrived) == 51
        assert_same_events_in_order(arrived, sent)
        assert all(e.sequence is not None for e in arrived)


async def test_three_server_hub_keeps_events_of_a_cut_off_leaf(
    hub: Hub, leaf_factory: LeafFactory
) -> None:
    leaf = leaf_factory("leaf-r3", hub=hub, via_proxy=True)
    async with connected(hub.urls) as hub_nc, connected(leaf.url) as leaf_nc:
        assert hub_size(hub_nc) == 3
        js_hub = jetstream(hub_nc, "hub")
        info = await ensure_event_store(js_hub, replicas=min(3, hub_size(hub_nc)))
        assert info.config.num_replicas == 3
        publisher, _ = await join(leaf_nc, "leaf-r3")

        sent = await cut_publish_restore(hub, leaf, publisher, js_hub)

        arrived = await read_hub(js_hub)
        assert_same_events_in_order(arrived, sent)
        info = await js_hub.stream_info(EVENTS_STREAM)
        assert info.cluster is not None
        assert len(info.cluster.replicas or []) == 2


async def test_events_published_while_the_hub_restarts_arrive_once(
    hub1: Hub, leaf_factory: LeafFactory
) -> None:
    leaf = leaf_factory("leaf-h")
    async with connected(leaf.url) as leaf_nc:
        async with connected(hub1.urls) as hub_nc:
            await ensure_event_store(jetstream(hub_nc, "hub"), replicas=1)
        js_leaf = jetstream(leaf_nc)
        await ensure_outbox(js_leaf, "leaf-h")
        publisher = EventPublisher(js_leaf, "leaf-h")
        # The agent's keeper attaches the outbox, and nudges it when the hub comes back.
        keeper = SourceKeeper(jetstream(leaf_nc, "hub"), "leaf-h")
        js_hub = jetstream(leaf_nc, "hub")
        assert await eventually_true(keeper.check)
        assert keeper.nudges == 0
        sent = [await publisher.publish_event(stored(i)) for i in range(5)]
        await wait_for_messages(js_hub, 5)

        server = hub1.servers[0]
        await asyncio.to_thread(server.stop)
        assert not await keeper.check()
        sent += [await publisher.publish_event(stored(i)) for i in range(5, 20)]
        await asyncio.to_thread(server.start)
        await asyncio.to_thread(server.wait_ready)
        assert await eventually_true(keeper.check)
        assert keeper.nudges == 1
        await settle(js_hub, 20)
        assert_same_events_in_order(await read_hub(js_hub), sent)


async def test_an_envelope_published_twice_is_stored_once(
    hub1: Hub, leaf_factory: LeafFactory
) -> None:
    leaf = leaf_factory("leaf-d")
    async with connected(hub1.urls) as hub_nc, connected(leaf.url) as leaf_nc:
        js_hub = jetstream(hub_nc, "hub")
        await ensure_event_store(js_hub, replicas=1)
        publisher, _ = await join(leaf_nc, "leaf-d")

        envelope = event_envelope(stored(1), owner="leaf-d")
        first = await publisher.publish(envelope)
        again = await publisher.publish(envelope)
        assert not first.duplicate
        assert again.duplicate
        assert again.seq == first.seq

        batch = [event_envelope(stored(i), owner="leaf-d") for i in range(2, 6)]
        acks = await publisher.publish_many([*batch, *batch, envelope])
        assert [bool(a.duplicate) for a in acks] == [False] * 4 + [True] * 5

        await settle(js_hub, 5)
        arrived = await read_hub(js_hub)
        assert_same_events_in_order(arrived, [envelope, *batch])


async def test_events_from_two_leaves_both_arrive(hub1: Hub, leaf_factory: LeafFactory) -> None:
    leaves = [leaf_factory("leaf-x"), leaf_factory("leaf-y")]
    async with (
        connected(hub1.urls) as hub_nc,
        connected(leaves[0].url) as nc_x,
        connected(leaves[1].url) as nc_y,
    ):
        js_hub = jetstream(hub_nc, "hub")
        await ensure_event_store(js_hub, replicas=1)
        # Both agents join at the same moment: neither attach may overwrite the other.
        (pub_x, _), (pub_y, _) = await asyncio.gather(join(nc_x, "leaf-x"), join(nc_y, "leaf-y"))
        info = await js_hub.stream_info(EVENTS_STREAM)
        assert sorted(s.name for s in info.config.sources or []) == [
            "OUTBOX_leaf-x",
            "OUTBOX_leaf-y",
        ]
        # Sources only: a subject of its own would capture routed events a second time.
        assert not info.config.subjects

        sent_x = await pub_x.publish_many([event_envelope(stored(i), owner="x") for i in range(10)])
        sent_y = [await pub_y.publish_event(stored(i, volume="vy")) for i in range(7)]
        assert len(sent_x) == 10
        await settle(js_hub, 17)

        subjects = Subjects()
        from_y = await read_hub(js_hub, filter_subject=subjects.events_of("leaf-y"))
        assert_same_events_in_order(from_y, sent_y)
        from_x = await read_hub(js_hub, filter_subject=subjects.events_of("leaf-x"))
        assert len(from_x) == 10

        # The hub's own duplicate window also applies to sourced events: one id, stored once.
        same = event_envelope(NodeLeft(node="leaf-x", reason="test"), owner="leaf-x")
        await pub_x.publish(same)
        await pub_y.publish(same)
        await settle(js_hub, 18)


async def test_setup_is_idempotent_and_detach_keeps_history(
    hub1: Hub, leaf_factory: LeafFactory
) -> None:
    leaf = leaf_factory("leaf-i")
    async with connected(hub1.urls) as hub_nc, connected(leaf.url) as leaf_nc:
        js_hub = jetstream(hub_nc, "hub")
        await ensure_event_store(js_hub, replicas=1)
        again = await ensure_event_store(js_hub, replicas=1)
        assert again.config.duplicate_window == 120.0
        publisher, js_from_leaf = await join(leaf_nc, "leaf-i")
        assert not await attach_leaf(js_from_leaf, "leaf-i")
        await ensure_outbox(jetstream(leaf_nc), "leaf-i")
        await ensure_event_store(js_hub, replicas=1)
        info = await js_hub.stream_info(EVENTS_STREAM)
        assert [s.name for s in info.config.sources or []] == ["OUTBOX_leaf-i"]

        await publisher.publish_event(stored(1))
        await wait_for_messages(js_hub, 1)
        assert await detach_leaf(js_hub, "leaf-i")
        assert not await detach_leaf(js_hub, "leaf-i")
        await publisher.publish_event(stored(2))  # buffered in the outbox, not sourced
        assert (await js_hub.stream_info(EVENTS_STREAM)).state.messages == 1
        # Re-attaching resumes after the last event the hub holds from this outbox.
        assert await attach_leaf(js_hub, "leaf-i")
        await settle(js_hub, 2)
        await nudge_sources(js_hub)  # every source at once, nothing duplicated
        await settle(js_hub, 2)


# -- reading -----------------------------------------------------------------------------------


async def test_malformed_messages_are_counted_and_skipped(
    hub1: Hub, leaf_factory: LeafFactory
) -> None:
    leaf = leaf_factory("leaf-m")
    async with connected(hub1.urls) as hub_nc, connected(leaf.url) as leaf_nc:
        js_hub = jetstream(hub_nc, "hub")
        await ensure_event_store(js_hub, replicas=1)
        publisher, _ = await join(leaf_nc, "leaf-m")
        js_leaf = jetstream(leaf_nc)
        subjects = Subjects()

        good = [await publisher.publish_event(stored(i)) for i in range(3)]
        # Foreign bytes on our subjects: garbage, a CBOR non-map, a truncated envelope.
        await js_leaf.publish(subjects.event("leaf-m", "ObjectStored"), b"\xff\x00garbage")
        await js_leaf.publish(subjects.event("leaf-m", "Junk"), b"\x83\x01\x02\x03")
        await js_leaf.publish(subjects.event("leaf-m", "ObjectStored"), good[0].encode()[:-3])
        good.append(await publisher.publish_event(stored(9)))
        await settle(js_hub, 7)

        handled: list[Envelope] = []

        async def handler(envelope: Envelope) -> None:
            if parse_event(envelope) == stored(1):
                raise RuntimeError("a handler bug must not stop the subscription")
            handled.append(envelope)

        # A short ack wait: what a stopped subscriber's last pull request swallowed comes back soon.
        subscription = await subscribe_events(js_hub, "projection", handler, ack_wait=1.0)
        try:
            for _ in range(200):
                if subscription.handled + subscription.handler_errors == 4:
                    break
                await asyncio.sleep(0.05)
        finally:
            await subscription.stop()
        assert subscription.malformed == 3
        assert subscription.handler_errors == 1
        assert [e.id for e in handled] == [good[0].id, good[2].id, good[3].id]

        # The durable consumer resumes after what it acknowledged.
        extra = await publisher.publish_event(stored(10))
        await wait_for_messages(js_hub, 8)
        resumed = EventReader(js_hub, durable="projection")
        try:
            batch = await resumed.fetch(timeout=10.0)
        finally:
            await resumed.close()
        assert [e.id for e in batch] == [extra.id]
        assert batch[0].sequence == 8


async def test_publishing_without_an_outbox_says_what_to_do(nats_server: NatsServer) -> None:
    async with connected(nats_server.url) as nc:
        publisher = EventPublisher(jetstream(nc), "lonely")
        with pytest.raises(TransportError, match="ensure_outbox"):
            await publisher.publish_event(stored(1))
        with pytest.raises(TransportError, match="ensure_outbox"):
            await publisher.publish_many([event_envelope(stored(i), owner="x") for i in range(3)])
        with pytest.raises(TransportError, match="ensure_event_store"):
            await attach_leaf(jetstream(nc), "lonely")
        await publisher.close()


async def test_concurrent_attaches_lose_no_source(nats_server: NatsServer) -> None:
    async with connected(nats_server.url) as nc_a, connected(nats_server.url) as nc_b:
        await ensure_event_store(jetstream(nc_a), replicas=1)
        nodes = [f"n{i}" for i in range(6)]
        # Two clients, interleaved, as six agents starting at once would be.
        added = await asyncio.gather(
            *(attach_leaf(jetstream(nc_a if i % 2 else nc_b), n) for i, n in enumerate(nodes)),
            nudge_sources(jetstream(nc_a), "n0"),
        )
        assert sum(1 for a in added[:-1] if a) >= 5  # the nudge may have attached n0 first
        info = await jetstream(nc_a).stream_info(EVENTS_STREAM)
        assert sorted(s.name for s in info.config.sources or []) == [f"OUTBOX_{n}" for n in nodes]


async def test_publish_many_keeps_order_beyond_its_window(nats_server: NatsServer) -> None:
    async with connected(nats_server.url) as nc:
        js = jetstream(nc)
        await ensure_outbox(js, "solo")
        publisher = EventPublisher(js, "solo")
        envelopes = [event_envelope(stored(i), owner="solo") for i in range(300)]
        acks = await publisher.publish_many(envelopes, window=16)
        assert [a.seq for a in acks] == list(range(1, 301))
        again = await publisher.publish_many(envelopes[:10], window=4)
        assert all(a.duplicate for a in again)
        for seq in (1, 150, 300):
            stored_msg = await js.get_msg("OUTBOX_solo", seq)
            assert stored_msg.data is not None
            assert decode(stored_msg.data).id == envelopes[seq - 1].id
        await publisher.close()


# -- the feed (the controller's reader) ----------------------------------------------------------


async def until(predicate: Callable[[], bool], attempts: int = 300) -> None:
    for _ in range(attempts):
        if predicate():
            return
        await asyncio.sleep(0.05)
    raise AssertionError("condition not reached")


async def test_the_feed_pushes_history_then_new_events_and_skips_malformed(
    hub1: Hub, leaf_factory: LeafFactory
) -> None:
    leaf = leaf_factory("leaf-f")
    async with connected(hub1.urls) as hub_nc, connected(leaf.url) as leaf_nc:
        js_hub = jetstream(hub_nc, "hub")
        await ensure_event_store(js_hub, replicas=1)
        publisher, _ = await join(leaf_nc, "leaf-f")
        js_leaf = jetstream(leaf_nc)
        subjects = Subjects()
        good = [await publisher.publish_event(stored(i)) for i in range(3)]
        await js_leaf.publish(subjects.event("leaf-f", "ObjectStored"), b"\xff\x00garbage")
        await js_leaf.publish(subjects.event("leaf-f", "ObjectStored"), good[0].encode()[:-3])
        good.append(await publisher.publish_event(stored(3)))
        await settle(js_hub, 6)

        seen: list[StoredEvent] = []

        def handler(event: StoredEvent) -> None:
            seen.append(event)
            if event.envelope.id == good[1].id:
                raise RuntimeError("a handler bug must not stop the feed")

        feed = EventFeed(js_hub, handler)
        await feed.start()
        try:
            await asyncio.wait_for(feed.caught_up.wait(), 10)
            # Caught up means handed over, not merely delivered to this process.
            assert [s.envelope.id for s in seen] == [e.id for e in good]
            assert feed.malformed == 2
            assert feed.handler_errors == 1
            assert [s.envelope.sequence for s in seen] == [1, 2, 3, 6]
            assert {s.node for s in seen} == {"leaf-f"}
            assert all(s.stored_at > 1_600_000_000 for s in seen)

            later = await publisher.publish_event(stored(4))
            await until(lambda: len(seen) == 5)
            assert seen[-1].envelope.id == later.id
            assert seen[-1].envelope.sequence == 7
            assert feed.last_sequence == 7
        finally:
            await feed.stop()


async def test_a_feed_on_an_empty_store_is_caught_up_at_once(nats_server: NatsServer) -> None:
    async with connected(nats_server.url) as nc:
        js = jetstream(nc)
        await ensure_event_store(js, replicas=1)
        feed = EventFeed(js, lambda stored: None)
        await feed.start()
        try:
            assert feed.caught_up.is_set()
        finally:
            await feed.stop()


async def test_the_feed_goes_on_after_a_hub_restart_without_holes_or_repeats(
    hub1: Hub, leaf_factory: LeafFactory
) -> None:
    leaf = leaf_factory("leaf-r")
    async with connected(leaf.url) as leaf_nc, connected(hub1.urls) as hub_nc:
        js_hub = jetstream(hub_nc, "hub")
        await ensure_event_store(js_hub, replicas=1)
        publisher, _ = await join(leaf_nc, "leaf-r")
        keeper = SourceKeeper(jetstream(leaf_nc, "hub"), "leaf-r")
        assert await eventually_true(keeper.check)
        sent = [await publisher.publish_event(stored(i)) for i in range(5)]
        await wait_for_messages(js_hub, 5)

        seen: list[StoredEvent] = []
        feed = EventFeed(js_hub, seen.append, idle_heartbeat=0.5)
        await feed.start()
        try:
            await asyncio.wait_for(feed.caught_up.wait(), 10)
            server = hub1.servers[0]
            await asyncio.to_thread(server.stop)
            sent += [await publisher.publish_event(stored(i)) for i in range(5, 12)]
            await asyncio.to_thread(server.start)
            await asyncio.to_thread(server.wait_ready)
            assert await eventually_true(keeper.check)
            await until(lambda: len(seen) >= len(sent), attempts=600)
            await asyncio.sleep(1.5)  # nothing more may come
            assert_same_events_in_order([s.envelope for s in seen], sent)
            assert feed.resets >= 1  # the hub's restart lost the consumer; the feed made another
        finally:
            await feed.stop()


async def test_a_gap_in_delivery_makes_the_feed_start_over_after_the_last_event(
    hub1: Hub, leaf_factory: LeafFactory
) -> None:
    leaf = leaf_factory("leaf-g")
    async with connected(hub1.urls) as hub_nc, connected(leaf.url) as leaf_nc:
        js_hub = jetstream(hub_nc, "hub")
        await ensure_event_store(js_hub, replicas=1)
        publisher, _ = await join(leaf_nc, "leaf-g")
        sent = [await publisher.publish_event(stored(i)) for i in range(3)]
        await wait_for_messages(js_hub, 3)

        seen: list[StoredEvent] = []
        feed = EventFeed(js_hub, seen.append)
        await feed.start()
        try:
            await asyncio.wait_for(feed.caught_up.wait(), 10)
            # A message that skips consumer sequences (one was lost on the way): not handed
            # over; the feed recreates its consumer after the last event it took.
            lost = Msg(
                hub_nc,
                subject="cim-place.evt.leaf-g.ObjectStored",
                reply=f"$JS.ACK.{EVENTS_STREAM}.gone.1.9.9.1700000000000000000.0",
                data=event_envelope(stored(9), owner="leaf-g").encode(),
            )
            feed._take(lost)
            await until(lambda: feed.resets == 1)
            sent += [await publisher.publish_event(stored(i)) for i in range(3, 5)]
            await until(lambda: len(seen) == 5)
            await asyncio.sleep(0.5)  # nothing more may come
            assert_same_events_in_order([s.envelope for s in seen], sent)
        finally:
            await feed.stop()

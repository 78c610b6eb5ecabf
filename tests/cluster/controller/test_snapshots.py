"""Controller snapshots on a real hub: restart from snapshot + tail, fallback, bounded stream.

Events are published into outbox streams in the hub's own domain, sourced into
``CIM_PLACE_EVENTS`` as the leaves' are (no agents: a test chooses every event).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import AsyncIterator
from dataclasses import replace

import pytest
from nats.js import JetStreamContext

from cim_place.cluster.controller.inventory import InventoryCheck
from cim_place.cluster.controller.projection import Projection
from cim_place.cluster.controller.service import Controller, ControllerConfig
from cim_place.cluster.controller.snapshot import SNAPSHOT_BUCKET, purge_bound
from cim_place.cluster.events.feed import EventFeed
from cim_place.cluster.events.readers import StoredEvent
from cim_place.cluster.events.sources import attach_hub_outbox
from cim_place.cluster.events.store import ensure_event_store, ensure_outbox
from cim_place.cluster.events.types import (
    Event,
    InventoryDigest,
    ObjectRemoved,
    ObjectStored,
    event_envelope,
    inventory_digest,
)
from cim_place.cluster.nats.connection import connected, jetstream
from cim_place.cluster.nats.subjects import EVENTS_STREAM, Subjects
from cim_place.local.topologies import Hub
from cim_place.objectstore.cid import RAW, make_cid
from cim_place.testing import until

SUBJECTS = Subjects()
NODES = ["n1", "n2", "n3", "n4"]
_counter = itertools.count()
_published = 0


@pytest.fixture(autouse=True)
def _fresh_count() -> None:
    global _published
    _published = 0


def config(hub: Hub, identity: str, **changes: object) -> ControllerConfig:
    base = ControllerConfig(
        servers=(hub.url,),
        identity=identity,
        lease=3.0,
        full_pass_every=3600.0,
        summary_every=3600.0,
        snapshot_every_events=10**9,  # the tests write snapshots when they choose
        snapshot_every=10**6,
    )
    return replace(base, **changes)  # type: ignore[arg-type]


@pytest.fixture
async def js(hub1: Hub) -> AsyncIterator[JetStreamContext]:
    async with connected(hub1.url) as nc:
        js = jetstream(nc, "hub")
        await ensure_event_store(js, replicas=1)
        for node in NODES:
            await ensure_outbox(js, node)
            await attach_hub_outbox(js, node)
        yield js


async def publish(js: JetStreamContext, count: int) -> int:
    """``count`` events (stores, removals, digests) about a few hundred objects; the hub's last
    sequence once they are all there."""
    global _published
    for _ in range(count):
        i = next(_counter)
        node = NODES[i % len(NODES)]
        cid = make_cid(RAW, f"object {i % 300}".encode())
        event: Event
        if i % 11 == 5:
            event = ObjectRemoved(root=cid, size=1, blocks=1, volume="v1", owner="alice")
        elif i % 29 == 7:
            # Never empty: an empty digest would make the leader's inventory check (which no
            # agent answers here) disprove every replica of the volume.
            roots = [make_cid(RAW, f"object {j}".encode()) for j in range(1 + i % 5)]
            event = InventoryDigest(
                volume="v1", pins=len(roots), size=0, digest=inventory_digest(roots), taken_at=1.0
            )
        else:
            event = ObjectStored(
                root=cid,
                size=1000 + i,
                blocks=1,
                volume="v1",
                owner=["alice", "bob"][i % 2],
                name=f"docs/{i % 300}.txt" if i % 3 else None,
                metadata={"k": str(i % 4)} if i % 5 == 0 else {},
            )
        envelope = event_envelope(event, owner=node)
        await js.publish(
            SUBJECTS.event(node, event.TYPE), envelope.encode(), headers=envelope.headers()
        )
    _published += count
    last = _published
    while (await js.stream_info(EVENTS_STREAM)).state.last_seq < last:
        await asyncio.sleep(0.05)
    return last


async def full_replay(js: JetStreamContext, last: int) -> Projection:
    """The projection a controller builds from the first event, read through a real consumer."""
    projection = Projection()

    def apply(stored: StoredEvent) -> None:
        projection.apply_event(stored.envelope, node=stored.node, at=stored.stored_at)

    feed = EventFeed(js, apply, filter_subject=SUBJECTS.all_events)
    await feed.start()
    try:
        await until(lambda: projection.last_sequence >= last, "the full replay")
    finally:
        await feed.stop()
    return projection


def readings(p: Projection) -> dict[str, object]:
    cids = sorted(p.cids())
    places = [(n, "v1") for n in NODES]
    return {
        "cids": cids,
        "objects": [p.object(c) for c in cids],
        "verified": [p.verified_at(c) for c in cids],
        "on": [p.cids_on(n, v) for n, v in places],
        "inventories": [p.inventory(n, v) for n, v in places],
        "drift": [p.drift(n, v) for n, v in places],
        "in_flight": sorted(t.id for t in p.in_flight()),
        "counters": (p.last_sequence, p.applied, p.total_size, p.rejected),
    }


async def started(hub: Hub, identity: str, **changes: object) -> Controller:
    controller = Controller(config(hub, identity, **changes))
    await controller.start()
    await until(controller.caught_up.is_set, "the controller catching up")
    return controller


async def test_restart_from_snapshot_plus_tail_equals_a_full_replay(
    hub1: Hub, js: JetStreamContext
) -> None:
    await publish(js, 400)
    first = await started(hub1, "ctl-a", snapshot_every_events=100)
    try:
        # The leader writes one by itself once 100 events are behind its last snapshot.
        await until(lambda: bool(first.snapshots and first.snapshots.written), "a snapshot")
    finally:
        await first.stop()
    assert first.snapshots is not None
    snapshot = first.snapshots.written[-1].sequence
    last = await publish(js, 250)  # the tail
    second = await started(hub1, "ctl-b")
    try:
        assert second.snapshots is not None and second.snapshots.restored == snapshot
        await until(lambda: second.projection.last_sequence == last, "the tail applied")
        assert readings(second.projection) == readings(await full_replay(js, last))
    finally:
        await second.stop()


async def test_a_corrupt_snapshot_is_skipped_for_an_older_one_then_a_full_replay(
    hub1: Hub, js: JetStreamContext, caplog: pytest.LogCaptureFixture
) -> None:
    await publish(js, 200)
    first = await started(hub1, "ctl-a")
    try:
        await until(lambda: first.is_leader, "leadership")
        assert first.snapshots is not None
        older = await first.snapshots.write()
        target = await publish(js, 100)
        await until(lambda: first.projection.last_sequence == target, "the events applied")
        newer = await first.snapshots.write()
    finally:
        await first.stop()
    last = await publish(js, 50)
    store = await js.object_store(SNAPSHOT_BUCKET)
    data = (await store.get(newer.name)).data
    assert data is not None
    await store.put(newer.name, data[:-100] + bytes(100))  # the end overwritten: corrupt

    caplog.set_level(logging.INFO, logger="cim_place.cluster.controller.snapshot")
    second = await started(hub1, "ctl-b")
    try:
        assert second.snapshots is not None and second.snapshots.restored == older.sequence
        await until(lambda: second.projection.last_sequence == last, "the tail applied")
        assert readings(second.projection) == readings(await full_replay(js, last))
    finally:
        await second.stop()
    skipped = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert skipped == [f"snapshot {newer.name} skipped: checksum mismatch (corrupt)"]

    # Every snapshot unusable (truncated, another format): a full replay, as without snapshots.
    await store.put(older.name, data[:50])
    await store.put(newer.name, b"CIMPSNAP" + (99).to_bytes(4, "little") + bytes(60))
    third = await started(hub1, "ctl-c")
    try:
        assert third.snapshots is not None and third.snapshots.restored == 0
        await until(lambda: third.projection.last_sequence == last, "the full replay")
        assert readings(third.projection) == readings(await full_replay(js, last))
    finally:
        await third.stop()


def test_the_purge_bound_never_passes_the_snapshot() -> None:
    assert purge_bound(covered=100, allowed=500) == 100
    assert purge_bound(covered=100, allowed=40) == 40
    assert purge_bound(covered=0, allowed=500) == 0


async def test_the_purge_stops_at_the_oldest_kept_snapshot_and_a_restart_still_converges(
    hub1: Hub, js: JetStreamContext
) -> None:
    await publish(js, 300)
    # A byte limit of 1 would allow removing every event: only snapshots hold the purge back.
    first = await started(hub1, "ctl-a", events_max_bytes=1, snapshots_kept=2)
    try:
        await until(lambda: first.is_leader, "leadership")
        snapshots = first.snapshots
        assert snapshots is not None
        older = await snapshots.write()
        assert await snapshots.purge() == older.sequence
        target = await publish(js, 100)
        await until(lambda: first.projection.last_sequence == target, "the events applied")
        newer = await snapshots.write()
        # Two kept: the older one still needs its tail, so nothing more goes.
        assert await snapshots.purge() == 0
        state = (await js.stream_info(EVENTS_STREAM)).state
        assert state.first_seq == older.sequence + 1
        target = await publish(js, 60)
        await until(lambda: first.projection.last_sequence == target, "the events applied")
        newest = await snapshots.write()  # the older one is pruned: the purge reaches `newer`
        assert [s for s, _ in await snapshots.listed()] == [newest.sequence, newer.sequence]
        assert await snapshots.purge() == newer.sequence
        state = (await js.stream_info(EVENTS_STREAM)).state
        assert state.first_seq == newer.sequence + 1
        expected = readings(first.projection)
    finally:
        await first.stop()
    second = await started(hub1, "ctl-b")
    try:
        assert second.snapshots is not None and second.snapshots.restored == newest.sequence
        assert readings(second.projection) == expected
    finally:
        await second.stop()


async def test_without_limits_nothing_is_purged(hub1: Hub, js: JetStreamContext) -> None:
    await publish(js, 50)
    first = await started(hub1, "ctl-a", events_max_age=10**6)
    try:
        await until(lambda: first.is_leader, "leadership")
        assert first.snapshots is not None
        await first.snapshots.write()
        assert await first.snapshots.purge() == 0  # every event is younger than the age limit
        assert (await js.stream_info(EVENTS_STREAM)).state.first_seq == 1
    finally:
        await first.stop()


async def test_the_age_limit_finds_the_last_event_stored_before_a_time(
    hub1: Hub, js: JetStreamContext
) -> None:
    last = await publish(js, 40)
    first = await started(hub1, "ctl-a")
    try:
        assert first.snapshots is not None
        stored = []
        for seq in range(1, last + 1):
            at = (await js.get_msg(EVENTS_STREAM, seq)).time
            assert at is not None
            stored.append(at.timestamp())
        for seq in (1, 17, last):
            cutoff = stored[seq - 1]
            # Events stored at the same instant as `seq` are not before it.
            expected = max((s for s in range(1, last + 1) if stored[s - 1] < cutoff), default=0)
            assert await first.snapshots.stored_before(cutoff, 1, last) == expected
        assert await first.snapshots.stored_before(10**10, 1, last) == last
    finally:
        await first.stop()


async def test_replicas_disproved_after_the_snapshot_are_dropped_again(hub1: Hub) -> None:
    # A snapshot taken before an inventory check still holds the replica the check disproved;
    # one taken after it, a replica stored again since (which the tail does not repeat).
    a, b = make_cid(RAW, b"a"), make_cid(RAW, b"b")
    projection = Projection()
    for sequence, cid in enumerate((a, b), start=1):
        event = ObjectStored(root=cid, size=1, blocks=1, volume="v1", owner="o")
        envelope = event_envelope(event, owner="n1").with_sequence(sequence)
        projection.apply_event(envelope, node="n1", at=1.0)
    async with connected(hub1.url) as nc:
        check = InventoryCheck(nc, jetstream(nc, "hub"), projection, lambda cids: None)
        check._disproved[("n1", "v1")] = {a: 2, b: 1}  # as read from KV cim-place-inventory
        assert check.forget_disproved(2) == 1
    assert projection.replicas(a) == frozenset()
    assert projection.replicas(b) == {("n1", "v1")}


async def test_snapshots_on_a_clustered_hub(hub: Hub) -> None:
    # Three servers: the bucket and the event store are replicated, the readers are not.
    async with connected(hub.urls) as nc:
        js = jetstream(nc, "hub")
        await ensure_event_store(js, replicas=3)
        for node in NODES:
            await ensure_outbox(js, node)
            await attach_hub_outbox(js, node)
        await publish(js, 120)
        first = await started(hub, "ctl-a")
        try:
            assert first.snapshots is not None
            written = await first.snapshots.write()
            expected = readings(first.projection)
        finally:
            await first.stop()
        second = await started(hub, "ctl-b")
        try:
            assert second.snapshots is not None and second.snapshots.restored == written.sequence
            assert readings(second.projection) == expected
        finally:
            await second.stop()

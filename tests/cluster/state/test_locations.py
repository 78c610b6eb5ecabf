"""The locations store (KV ``cim-place-locations`` and its shards) against a real hub server."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from nats.js import JetStreamContext

from cim_place.cluster.nats import kv
from cim_place.cluster.nats.connection import connected, jetstream
from cim_place.cluster.nats.kv import LOCATIONS
from cim_place.cluster.state.locations import LAYOUT_KEY, SUMMARY_KEY, LocationStore, shard_of
from cim_place.errors import TransportError
from cim_place.local.topologies import Hub
from cim_place.objectstore.cid import RAW, make_cid, to_str
from cim_place.placement.status import Condition, Location, ObjectStatus, Summary


def status(n: int, state: str = "placed", updated_at: float = 1.0) -> ObjectStatus:
    return ObjectStatus(
        cid=to_str(make_cid(RAW, n.to_bytes(4, "big"))),
        state=state,  # type: ignore[arg-type]
        locations=(Location("n1", "v1", "z1"), Location("n2", "v1", "z2", "fetching")),
        desired=2,
        policy="two",
        name=f"object-{n}",
        owner="alice",
        size=1024,
        metadata={"team": "web"},
        conditions=(Condition("Placed", True, "DesiredMet", "2 of 2 copies", 1.0),),
        updated_at=updated_at,
    )


@pytest.fixture
async def js_hub(hub1: Hub) -> AsyncIterator[JetStreamContext]:
    async with connected(hub1.urls) as nc:
        yield jetstream(nc, "hub")


async def test_round_trip(js_hub: JetStreamContext) -> None:
    store = await LocationStore(js_hub).open()
    record = status(1)
    assert await store.get(record.cid) is None
    await store.put(record)
    assert await store.get(record.cid) == record
    assert await store.get(make_cid(RAW, (1).to_bytes(4, "big"))) == record  # binary CID too
    await store.delete(record.cid)
    assert await store.get(record.cid) is None
    await store.delete(record.cid)  # absent: fine


async def test_summary_round_trip(js_hub: JetStreamContext) -> None:
    store = await LocationStore(js_hub).open()
    assert await store.summary() is None
    summary = Summary(
        objects=3,
        by_state={"placed": 2, "degraded": 1},
        under_replicated=1,
        total_bytes=3072,
        nodes_up=4,
        updated_at=5.0,
    )
    await store.put_summary(summary)
    assert await store.summary() == summary


async def test_list_filters_by_state_and_skips_the_summary(js_hub: JetStreamContext) -> None:
    store = await LocationStore(js_hub).open()
    assert [s async for s in store.list()] == []
    for n in range(10):
        await store.put(status(n, "degraded" if n % 3 == 0 else "placed"))
    await store.put_summary(Summary(objects=10))
    await store.delete(status(9).cid)
    listed = [s async for s in store.list()]
    assert sorted(s.cid for s in listed) == sorted(status(n).cid for n in range(9))
    degraded = [s async for s in store.list("degraded")]
    assert sorted(s.cid for s in degraded) == sorted(status(n).cid for n in (0, 3, 6))


async def test_garbage_values_are_skipped_and_counted(js_hub: JetStreamContext) -> None:
    store = await LocationStore(js_hub).open()
    good = status(1)
    await store.put(good)
    for key, value in (
        ("bafkgarbage1", b"\xff\xfe not json"),
        ("bafkgarbage2", b'{"cid": "x", "state": "exploded"}'),
        ("bafkgarbage3", b"[1, 2, 3]"),
    ):
        await (await store.shard(key)).put(key, value)
    await store.bucket.put(SUMMARY_KEY, b'{"objects": "many"}')
    assert await store.get("bafkgarbage1") is None
    assert store.garbage == 1
    assert [s async for s in store.list()] == [good]
    assert store.garbage == 4
    assert await store.summary() is None
    assert store.garbage == 5
    assert await store.get("not a valid key!") is None


async def test_a_reader_without_the_bucket_is_told_what_to_do(js_hub: JetStreamContext) -> None:
    with pytest.raises(TransportError, match="no controller"):
        await LocationStore(js_hub).open(create=False)
    await LocationStore(js_hub).open()
    reader = await LocationStore(js_hub).open(create=False)
    assert reader.bucket is not None
    assert (await js_hub.key_value(LOCATIONS)) is not None


async def test_statuses_spread_over_the_shards_and_readers_find_them(
    js_hub: JetStreamContext,
) -> None:
    writer = await LocationStore(js_hub).open()
    records = [status(n) for n in range(64)]
    for record in records:
        await writer.put(record)
    used = {shard_of(r.cid) for r in records}
    assert len(used) > kv.LOCATION_SHARDS // 2  # 64 CIDs land in most of the 16 shards
    for record in records[:5]:
        held = await js_hub.key_value(kv.location_shard(shard_of(record.cid)))
        assert (await held.get(record.cid)).value == record.encode()
    reader = await LocationStore(js_hub).open(create=False)
    assert reader.shard_count == kv.LOCATION_SHARDS
    for record in records:
        assert await reader.get(record.cid) == record
    assert sorted([s.cid async for s in reader.list()]) == sorted(r.cid for r in records)


async def test_an_unsharded_bucket_is_emptied_and_laid_out(js_hub: JetStreamContext) -> None:
    """Statuses written into the base bucket by an older controller are dropped (the controller
    rewrites every status from its projection); the layout key says how many shards."""
    old = await kv.ensure_bucket(js_hub, LOCATIONS)
    await old.put(status(1).cid, status(1).encode())
    await old.put(SUMMARY_KEY, Summary(objects=1).encode())
    store = await LocationStore(js_hub).open()
    assert await store.get(status(1).cid) is None
    assert await store.summary() is None
    layout = await store.bucket.get(LAYOUT_KEY)
    assert layout.value == b'{"shards": 16}'
    await LocationStore(js_hub).open()  # a second controller finds the layout as it is
    assert (await store.bucket.get(LAYOUT_KEY)).revision == layout.revision


async def test_a_damaged_layout_is_named(js_hub: JetStreamContext) -> None:
    store = await LocationStore(js_hub).open()
    await store.bucket.put(LAYOUT_KEY, b"{}")
    with pytest.raises(TransportError, match=f"delete key {LAYOUT_KEY}"):
        await LocationStore(js_hub).open(create=False)
    await store.bucket.put(LAYOUT_KEY, b'{"shards": 4}')
    with pytest.raises(TransportError, match="4 shards"):
        await LocationStore(js_hub).open()

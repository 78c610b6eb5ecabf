"""Complete KV listings (cim_place.cluster.nats.kv_listing) against real nats-servers, directly
on the hub and through a leaf node into the hub's JetStream domain."""

from __future__ import annotations

import asyncio

import pytest

from cim_place.cluster.nats.connection import connected, jetstream
from cim_place.cluster.nats.kv import ensure_bucket
from cim_place.cluster.nats.kv_listing import latest_entries, live_keys
from cim_place.local.topologies import Hub
from cim_place.testing import LeafFactory

pytestmark = pytest.mark.nats


async def test_empty_deleted_and_overwritten_keys(hub1: Hub) -> None:
    async with connected(hub1.url) as nc:
        bucket = await ensure_bucket(jetstream(nc, "hub"), "listing-test", history=5)
        assert await live_keys(bucket) == []
        await bucket.put("a", b"1")
        await bucket.put("b", b"1")
        await bucket.put("a", b"2")
        await bucket.put("c", b"1")
        await bucket.delete("c")  # the latest value of the last key is a delete marker
        entries = await latest_entries(bucket)
        assert sorted((e.key, e.value) for e in entries) == [("a", b"2"), ("b", b"1")]
        assert sorted(await live_keys(bucket)) == ["a", "b"]
        await bucket.purge("a")
        await bucket.delete("b")
        assert await live_keys(bucket) == []  # values remain (markers), no live key


async def test_every_listing_through_a_leaf_is_complete(
    hub1: Hub, leaf_factory: LeafFactory
) -> None:
    """The case nats-py's own end marker gets wrong now and then (a listing ending empty while
    the bucket holds keys): many listings in a row, some while other clients write, all whole."""
    leaf = leaf_factory("leaf1")
    async with connected(hub1.url) as hub_nc, connected(leaf.url) as leaf_nc:
        writer = await ensure_bucket(jetstream(hub_nc, "hub"), "listing-test")
        for i in range(3):
            await writer.put(f"node-{i}", b"up")
        reader = await jetstream(leaf_nc, "hub").key_value("listing-test")
        stop = asyncio.Event()

        async def churn() -> None:  # other keys come and go while the reader lists
            n = 0
            while not stop.is_set():
                await writer.put(f"other-{n % 7}", b"x")
                await writer.delete(f"other-{(n + 3) % 7}")
                n += 1

        churning = asyncio.create_task(churn())
        try:
            for _ in range(60):
                keys = set(await live_keys(reader))
                assert {"node-0", "node-1", "node-2"} <= keys
        finally:
            stop.set()
            await churning
        many = [f"k{i:04d}" for i in range(600)]
        for key in many:
            await writer.put(key, key.encode())
        entries = await latest_entries(reader)
        assert {e.key: e.value for e in entries if e.key.startswith("k")} == {
            key: key.encode() for key in many
        }

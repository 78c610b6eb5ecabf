"""A throttled fetch moves its bytes at the limit, over the block stream and over NATS alike.

8 MiB at 2 MiB/s between two leaf servers; the rate is the bytes fetched over the seconds the
fetch took (``FetchResult``), which is what ``repair.bandwidth`` promises.
"""

from __future__ import annotations

import pytest
from exchange import MiB, content, import_into
from memstore import MemoryBlockStore

from cim_place.cluster.exchange.blocks import BlockServer
from cim_place.cluster.exchange.fetch import fetch_dag, wait_for_holder
from cim_place.cluster.exchange.fetch_model import Holder
from cim_place.cluster.exchange.ratelimit import BandwidthLimit
from cim_place.cluster.exchange.stream import BlockStreamServer
from cim_place.local.topologies import Hub
from cim_place.objectstore.unixfs import read_file
from cim_place.testing import LeafFactory, connected

pytestmark = pytest.mark.timeout(180)

LIMIT = 2 * MiB
SIZE = 8 * MiB


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "nats"])
async def test_a_throttled_fetch_moves_at_the_limit(
    hub1: Hub, leaf_factory: LeafFactory, stream: bool
) -> None:
    leaf_a = leaf_factory("leaf-a")
    leaf_b = leaf_factory("leaf-b")
    source = MemoryBlockStore()
    root = import_into(source, SIZE, "unixfs-v1-2025", seed="throttled")
    async with connected(leaf_a.url) as nc_a, connected(leaf_b.url) as nc_b:
        server = BlockServer(nc_a, "leaf-a", source)
        streams = BlockStreamServer(source, serve_stats=server.stats)
        if stream:
            await streams.start()
            server.stream = streams
        await server.start()
        try:
            assert await wait_for_holder(nc_b, "leaf-a", timeout=10)
            store = MemoryBlockStore()
            result = await fetch_dag(
                nc_b,
                root,
                [Holder("leaf-a")],
                store,
                bandwidth=BandwidthLimit(LIMIT),
                stream=stream,
            )
        finally:
            await server.stop()
            if stream:
                await streams.stop()
    assert (result.holders["leaf-a"].stream_blocks > 0) == stream
    assert b"".join(read_file(store, root)) == content("throttled", SIZE)
    rate = result.bytes_fetched / result.seconds
    print(f"{'stream' if stream else 'nats'}: {result.bytes_fetched} B in {result.seconds:.3f} s")
    assert 0.9 * LIMIT <= rate <= 1.1 * LIMIT

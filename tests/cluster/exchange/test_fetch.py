"""fetch_dag against BlockServers on real leaf servers: A serves, B fetches through the hub."""

from __future__ import annotations

import asyncio
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from exchange import (
    LyingStore,
    MiB,
    Pair,
    content,
    import_into,
)
from memstore import MemoryBlockStore

from cim_place.cluster.exchange.blocks import BlockServer
from cim_place.cluster.exchange.fetch import fetch_dag, wait_for_holder
from cim_place.cluster.exchange.fetch_model import (
    BlockUnavailableError,
    Holder,
    Labels,
    order_holders,
)
from cim_place.cluster.exchange.ratelimit import BandwidthLimit
from cim_place.cluster.nats.subjects import Subjects
from cim_place.errors import CorruptBlockError
from cim_place.local.servers import NatsServer
from cim_place.local.topologies import Hub, add_leaf, start_hub
from cim_place.objectstore.blockstore import FsBlockStore
from cim_place.objectstore.cid import RAW, codec_of
from cim_place.objectstore.dag import walk_cids
from cim_place.objectstore.testdata import chacha_stream
from cim_place.objectstore.unixfs import import_file, read_file
from cim_place.testing import connected

pytestmark = pytest.mark.nats


async def serving(nc: Any, node: str, store: Any) -> BlockServer:
    server = BlockServer(nc, node, store)
    await server.start()
    return server


def test_holders_are_ordered_nearest_first() -> None:
    near = Labels(region="eu", zone="eu-1", host="h1")
    far = Holder("far", region="us", zone="us-1", host="x")
    region = Holder("region", region="eu", zone="eu-2", host="y")
    zone = Holder("zone", region="eu", zone="eu-1", host="z")
    zone2 = Holder("zone2", region="eu", zone="eu-1", host="w")
    host = Holder("host", region="eu", zone="eu-1", host="h1")
    # Host names are unique within a zone only: h1 in another zone is just the same region.
    namesake = Holder("namesake", region="eu", zone="eu-2", host="h1")
    tiers = order_holders([far, region, zone, host, namesake, zone2, zone], near)
    assert tiers == [[host], [zone, zone2], [region, namesake], [far]]
    assert order_holders([far, zone], None) == [[far, zone]]


@pytest.mark.parametrize(("profile", "blocks"), [("unixfs-v1-2025", 6), ("unixfs-v0-2015", 21)])
async def test_multi_chunk_file_arrives_whole(
    pair: Pair,
    clients: tuple[Any, Any],
    volume: FsBlockStore,
    tmp_path: Path,
    profile: str,
    blocks: int,
) -> None:
    nc_a, nc_b = clients
    with FsBlockStore(tmp_path / "volume-a", fsync="none") as source:
        root = import_into(source, 5 * MiB, profile)
        server = await serving(nc_a, "leaf-a", source)
        try:
            assert await wait_for_holder(nc_b, "leaf-a", timeout=10.0)
            result = await fetch_dag(nc_b, root, [Holder("leaf-a")], volume, window=3, batch=4)
        finally:
            await server.stop()
        assert result.bytes_fetched == source.used_bytes()
    assert result.root == root
    assert result.blocks_fetched == blocks
    assert result.blocks_present == 0
    assert result.holders["leaf-a"].blocks == blocks
    assert b"".join(read_file(volume, root)) == content("fetch", 5 * MiB)
    assert server.stats.blocks_served == blocks

    # Everything is present now: a second fetch transfers nothing.
    again = await fetch_dag(nc_b, root, [Holder("leaf-a")], volume)
    assert (again.blocks_fetched, again.blocks_present) == (0, blocks)


async def test_a_dag_fetch_is_one_read_for_demand(
    pair: Pair, clients: tuple[Any, Any], volume: FsBlockStore, tmp_path: Path
) -> None:
    """The block server tells its demand counter once per object read, not per block or batch
    (docs/DEMAND.md); the requester is None here, an open domain."""
    nc_a, nc_b = clients
    with FsBlockStore(tmp_path / "volume-a", fsync="none") as source:
        root = import_into(source, 5 * MiB, "unixfs-v0-2015")
        server = BlockServer(nc_a, "leaf-a", source)
        reads: list[tuple[Any, str | None]] = []
        server.on_read = lambda cid, requester: reads.append((cid, requester))
        await server.start()
        try:
            assert await wait_for_holder(nc_b, "leaf-a", timeout=10.0)
            await fetch_dag(nc_b, root, [Holder("leaf-a")], volume, window=3, batch=4)
        finally:
            await server.stop()
    assert server.stats.blocks_served == 21
    assert reads == [(root, None)]


async def test_corrupt_holder_is_skipped_for_a_good_one(
    pair: Pair, clients: tuple[Any, Any], volume: FsBlockStore
) -> None:
    nc_a, nc_b = clients
    good = MemoryBlockStore()
    root = import_into(good, 4 * MiB, "unixfs-v1-2025")
    leaves = [c for c in walk_cids(good, root) if codec_of(c) == RAW]
    bad = LyingStore({leaves[2]})
    bad.blocks.update(good.blocks)
    with pytest.raises(CorruptBlockError):
        bad.blocks[leaves[2]] = b"y" + good.blocks[leaves[2]][1:]
        bad.get(leaves[2])  # sanity: MemoryBlockStore verifies; LyingStore lies after that
    bad.blocks[leaves[2]] = good.blocks[leaves[2]]

    near = Labels(region="eu", zone="eu-1", host="b")
    servers = [await serving(nc_a, "liar", bad), await serving(nc_a, "honest", good)]
    try:
        for node in ("liar", "honest"):
            assert await wait_for_holder(nc_b, node, timeout=10.0)
        holders = [
            Holder("honest", region="us", zone="us-1", host="h"),
            Holder("liar", region="eu", zone="eu-1", host="l"),
        ]
        result = await fetch_dag(nc_b, root, holders, volume, near=near, window=1, batch=2)
    finally:
        for server in servers:
            await server.stop()
    assert result.corrupt_holders == ["liar"]
    assert result.holders["liar"].skipped
    assert "do not match" in result.holders["liar"].reason
    assert result.holders["honest"].blocks > 0
    assert b"".join(read_file(volume, root)) == content("fetch", 4 * MiB)
    assert servers[0].stats.blocks_served >= 1  # the liar was asked first (it is nearer)


async def test_interrupted_fetch_resumes_without_refetching(
    pair: Pair, clients: tuple[Any, Any], volume: FsBlockStore
) -> None:
    nc_a, nc_b = clients
    source = MemoryBlockStore()
    root = import_into(source, 24 * MiB, "unixfs-v0-2015")  # 96 leaves + 1 root
    total = len(source.blocks)
    server = await serving(nc_a, "leaf-a", source)
    try:
        assert await wait_for_holder(nc_b, "leaf-a", timeout=10.0)
        halfway = asyncio.Event()

        def progress(blocks: int, _bytes: int) -> None:
            if blocks >= 30:
                halfway.set()

        task = asyncio.create_task(
            fetch_dag(nc_b, root, [Holder("leaf-a")], volume, window=2, batch=4, progress=progress)
        )
        await halfway.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        have = sum(1 for _ in volume.cids())
        assert 30 <= have < total
        # The holder finishes the batches it was answering when B gave up; B dropped those. A
        # request B sent just before it gave up may still be crossing the hub, so wait until the
        # holder is idle and stays so.
        served_before = -1
        while served_before != server.stats.blocks_served:
            served_before = server.stats.blocks_served
            await asyncio.sleep(0.3)
            while server.active:
                await asyncio.sleep(0.01)

        result = await fetch_dag(nc_b, root, [Holder("leaf-a")], volume)
    finally:
        await server.stop()
    assert result.blocks_present == have
    assert result.blocks_fetched == total - have
    # The holder sent exactly what was still missing (nothing twice).
    assert server.stats.blocks_served - served_before == total - have
    assert b"".join(read_file(volume, root)) == content("fetch", 24 * MiB)


async def test_missing_everywhere_names_the_cid(
    pair: Pair, clients: tuple[Any, Any], volume: FsBlockStore
) -> None:
    nc_a, nc_b = clients
    source = MemoryBlockStore()
    root = import_into(source, 3 * MiB, "unixfs-v1-2025")
    leaf = next(c for c in walk_cids(source, root) if codec_of(c) == RAW)
    other = MemoryBlockStore()
    other.blocks.update(source.blocks)
    del source.blocks[leaf]
    del other.blocks[leaf]
    unknown = import_file(chacha_stream("nowhere", 100), None).root
    servers = [await serving(nc_a, "leaf-a", source), await serving(nc_a, "leaf-c", other)]
    try:
        for node in ("leaf-a", "leaf-c"):
            assert await wait_for_holder(nc_b, node, timeout=10.0)
        holders = [Holder("leaf-a"), Holder("leaf-c")]
        with pytest.raises(BlockUnavailableError) as caught:
            await fetch_dag(nc_b, unknown, holders, volume)
        assert caught.value.cid == unknown
        assert caught.value.tried == ["leaf-a", "leaf-c"]
        with pytest.raises(BlockUnavailableError) as caught:
            await fetch_dag(nc_b, root, holders, volume)
        assert caught.value.cid == leaf
        with pytest.raises(BlockUnavailableError):
            await fetch_dag(nc_b, root, [], volume)
    finally:
        for server in servers:
            await server.stop()
    # What could be fetched was kept: everything but the one leaf.
    assert not volume.has(leaf)
    assert sum(1 for _ in volume.cids()) == len(source.blocks)


async def test_load_spreads_over_equally_near_holders(
    pair: Pair, clients: tuple[Any, Any], volume: FsBlockStore
) -> None:
    nc_a, nc_b = clients
    source = MemoryBlockStore()
    root = import_into(source, 8 * MiB, "unixfs-v0-2015")
    servers = [await serving(nc_a, node, source) for node in ("h1", "h2", "far")]
    try:
        for node in ("h1", "h2", "far"):
            assert await wait_for_holder(nc_b, node, timeout=10.0)
        near = Labels(region="eu", zone="z1", host="b")
        holders = [
            Holder("far", region="us"),
            Holder("h1", region="eu", zone="z1"),
            Holder("h2", region="eu", zone="z1"),
        ]
        result = await fetch_dag(nc_b, root, holders, volume, near=near, batch=2)
    finally:
        for server in servers:
            await server.stop()
    assert result.holders["h1"].blocks > 4
    assert result.holders["h2"].blocks > 4
    assert result.holders["far"].requests == 0


async def test_bandwidth_limit_still_delivers(
    pair: Pair, clients: tuple[Any, Any], volume: FsBlockStore
) -> None:
    nc_a, nc_b = clients
    source = MemoryBlockStore()
    root = import_into(source, 2 * MiB, "unixfs-v1-2025")
    server = await serving(nc_a, "leaf-a", source)
    try:
        assert await wait_for_holder(nc_b, "leaf-a", timeout=10.0)
        limit = BandwidthLimit(64 * MiB)
        result = await fetch_dag(nc_b, root, [Holder("leaf-a")], volume, bandwidth=limit)
    finally:
        await server.stop()
    assert result.blocks_fetched == 3


@pytest.fixture
def small_payload_hub(tmp_path: Path) -> Iterator[tuple[Hub, NatsServer, NatsServer]]:
    small = 256 << 10
    hub = start_hub(tmp_path / "hub-small", size=1, max_payload=small)
    leaves: list[NatsServer] = []
    try:
        for name in ("leaf-a", "leaf-b"):
            leaves.append(add_leaf(hub, tmp_path / name, name, max_payload=small))
        yield hub, leaves[0], leaves[1]
    finally:
        for leaf in leaves:
            leaf.stop()
        hub.stop()


async def test_blocks_larger_than_max_payload_transfer(
    small_payload_hub: tuple[Hub, NatsServer, NatsServer], volume: FsBlockStore
) -> None:
    _, leaf_a, leaf_b = small_payload_hub
    source = MemoryBlockStore()
    root = import_into(source, 3 * MiB + 5, "unixfs-v1-2025")  # 1 MiB raw leaves
    async with connected(leaf_a.url) as nc_a, connected(leaf_b.url) as nc_b:
        assert nc_a.max_payload == 256 << 10
        server = BlockServer(nc_a, "leaf-a", source, subjects=Subjects("small.pay"))
        await server.start()
        try:
            assert await wait_for_holder(
                nc_b, "leaf-a", subjects=Subjects("small.pay"), timeout=10.0
            )
            result = await fetch_dag(
                nc_b, root, [Holder("leaf-a")], volume, subjects=Subjects("small.pay")
            )
        finally:
            await server.stop()
    assert result.blocks_fetched == 5
    assert server.stats.messages_sent > 12  # 3 MiB in 256 KiB messages
    assert b"".join(read_file(volume, root)) == content("fetch", 3 * MiB + 5)


async def test_lost_blocks_and_a_rotten_local_copy_are_fetched_again(
    pair: Pair, clients: tuple[Any, Any], volume: FsBlockStore
) -> None:
    nc_a, nc_b = clients
    source = MemoryBlockStore()
    root = import_into(source, 3 * MiB, "unixfs-v0-2015")  # dag-pb leaves: read when present
    server = await serving(nc_a, "leaf-a", source)
    try:
        assert await wait_for_holder(nc_b, "leaf-a", timeout=10.0)
        first = await fetch_dag(nc_b, root, [Holder("leaf-a")], volume)
        leaves = [c for c in walk_cids(volume, root) if c != root]
        volume.delete(leaves[0])
        volume.delete(leaves[5])
        rotten = volume.block_path(leaves[7])
        rotten.write_bytes(b"\x00" + rotten.read_bytes()[1:])
        again = await fetch_dag(nc_b, root, [Holder("leaf-a")], volume)
    finally:
        await server.stop()
    assert again.blocks_fetched == 3
    assert again.blocks_present == first.blocks_fetched - 3
    assert b"".join(read_file(volume, root)) == content("fetch", 3 * MiB)


async def test_absent_garbage_and_silent_holders_are_passed_over(
    pair: Pair, clients: tuple[Any, Any], volume: FsBlockStore
) -> None:
    nc_a, nc_b = clients
    source = MemoryBlockStore()
    root = import_into(source, 2 * MiB, "unixfs-v0-2015")

    async def garbage(msg: Any) -> None:
        await msg.respond(b"\xcb\x01\x00\x01\xff\xff")

    async def silence(msg: Any) -> None:
        return None

    junk = await nc_a.subscribe(Subjects().block_get("junk"), cb=garbage)
    mute = await nc_a.subscribe(Subjects().block_get("mute"), cb=silence)
    server = await serving(nc_a, "good", source)
    try:
        # junk's subscription was made first on the same connection, so it has propagated too.
        assert await wait_for_holder(nc_b, "good", timeout=10.0)
        near = Labels(region="eu", zone="z1", host="b")
        holders = [
            Holder("good", region="us"),
            Holder("ghost", region="eu", zone="z1", host="b"),  # no agent answers there
            Holder("junk", region="eu", zone="z1"),
            Holder("mute", region="eu"),
        ]
        result = await fetch_dag(nc_b, root, holders, volume, near=near, timeout=0.5, batch=2)
    finally:
        await server.stop()
        await junk.unsubscribe()
        await mute.unsubscribe()
    assert result.holders["ghost"].failures >= 1
    assert result.holders["ghost"].skipped
    assert "no responders" in result.holders["ghost"].reason
    assert result.holders["junk"].failures >= 1
    assert "malformed reply" in result.holders["junk"].reason
    assert result.holders["mute"].failures >= 1  # timed out, then the next holder was asked
    assert result.holders["good"].blocks == result.blocks_fetched == len(source.blocks)
    assert b"".join(read_file(volume, root)) == content("fetch", 2 * MiB)


async def test_repeated_blocks_are_fetched_once(
    pair: Pair, clients: tuple[Any, Any], volume: FsBlockStore
) -> None:
    nc_a, nc_b = clients
    source = MemoryBlockStore()
    zeros = bytes(3 * MiB)
    root = import_file(io.BytesIO(zeros), source, "unixfs-v1-2025").root
    assert len(source.blocks) == 2  # three identical leaves under one root
    server = await serving(nc_a, "leaf-a", source)
    try:
        assert await wait_for_holder(nc_b, "leaf-a", timeout=10.0)
        result = await fetch_dag(nc_b, root, [Holder("leaf-a")], volume)
    finally:
        await server.stop()
    assert result.blocks_fetched == 2
    assert server.stats.blocks_served == 2
    assert b"".join(read_file(volume, root)) == zeros

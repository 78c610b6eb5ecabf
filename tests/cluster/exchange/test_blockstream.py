"""The bulk block stream: fetch_dag over holders' TCP streams, granted on real leaf servers.

A serves (a BlockServer on NATS with a BlockStreamServer beside it), B fetches through the hub;
the grant goes over NATS, the blocks over the stream.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from exchange import LyingStore, MiB, content
from exchange import import_into as _import_into
from memstore import MemoryBlockStore

from cim_place.cluster.agent.config import AgentConfigError, parse_agent_config
from cim_place.cluster.exchange.block_wire import (
    End,
    Grant,
    Missing,
    Status,
    decode_reply,
    encode_grant_request,
)
from cim_place.cluster.exchange.blocks import BlockServer
from cim_place.cluster.exchange.fetch import fetch_dag, wait_for_holder
from cim_place.cluster.exchange.fetch_model import Holder, Labels
from cim_place.cluster.exchange.stream import BlockStreamServer
from cim_place.cluster.exchange.stream_client import StreamClient
from cim_place.cluster.exchange.stream_wire import Block, StreamRefusedError, client_tls, server_tls
from cim_place.cluster.nats.subjects import Subjects
from cim_place.cluster.state.nodes import NodeRecord
from cim_place.objectstore.blockstore import FsBlockStore
from cim_place.objectstore.cid import RAW, Cid, codec_of
from cim_place.objectstore.dag import walk_cids
from cim_place.objectstore.unixfs import read_file


def import_into(store: Any, size: int, profile: str, seed: str = "stream") -> Cid:
    return _import_into(store, size, profile, seed)


@dataclass
class Holding:
    blocks: BlockServer
    stream: BlockStreamServer

    async def stop(self) -> None:
        await self.blocks.stop()
        await self.stream.stop()


async def streaming(nc: Any, node: str, store: Any) -> Holding:
    server = BlockServer(nc, node, store)
    stream = BlockStreamServer(store, serve_stats=server.stats)
    await stream.start()
    server.stream = stream
    await server.start()
    return Holding(server, stream)


async def test_a_dag_travels_over_the_stream(
    clients: tuple[Any, Any], volume: FsBlockStore
) -> None:
    nc_a, nc_b = clients
    source = MemoryBlockStore()
    root = import_into(source, 5 * MiB + 7, "unixfs-v0-2015")
    holding = await streaming(nc_a, "leaf-a", source)
    try:
        assert await wait_for_holder(nc_b, "leaf-a", timeout=10.0)
        result = await fetch_dag(nc_b, root, [Holder("leaf-a")], volume, batch=4)
    finally:
        await holding.stop()
    stats = result.holders["leaf-a"]
    assert result.blocks_fetched == len(source.blocks) > 20
    assert stats.stream_blocks == stats.blocks == result.blocks_fetched
    assert stats.stream_bytes == result.bytes_fetched
    assert stats.fallbacks == 0, stats.fallback
    assert holding.stream.stats.grants == 1 == holding.stream.stats.connections
    # The holder's served counters count the stream too (they feed the agent's metrics).
    assert holding.blocks.stats.blocks_served == result.blocks_fetched
    assert b"".join(read_file(volume, root)) == content("stream", 5 * MiB + 7)


async def test_without_streams_the_nats_path_still_serves(
    clients: tuple[Any, Any], volume: FsBlockStore
) -> None:
    nc_a, nc_b = clients
    source = MemoryBlockStore()
    root = import_into(source, 2 * MiB, "unixfs-v1-2025")
    server = BlockServer(nc_a, "leaf-a", source)  # no stream: grants answer "use NATS"
    await server.start()
    try:
        assert await wait_for_holder(nc_b, "leaf-a", timeout=10.0)
        result = await fetch_dag(nc_b, root, [Holder("leaf-a")], volume)
    finally:
        await server.stop()
    stats = result.holders["leaf-a"]
    assert stats.blocks == result.blocks_fetched == len(source.blocks)
    assert stats.stream_blocks == 0
    assert stats.fallbacks == 1
    assert "no block stream" in stats.fallback


async def test_corrupt_stream_holder_is_skipped_for_a_good_one(
    clients: tuple[Any, Any], volume: FsBlockStore
) -> None:
    nc_a, nc_b = clients
    good = MemoryBlockStore()
    root = import_into(good, 4 * MiB, "unixfs-v1-2025")
    leaves = [c for c in walk_cids(good, root) if codec_of(c) == RAW]
    bad = LyingStore(set(leaves))
    bad.blocks.update(good.blocks)
    near = Labels(region="eu", zone="eu-1", host="b")
    holdings = [await streaming(nc_a, "liar", bad), await streaming(nc_a, "honest", good)]
    try:
        for node in ("liar", "honest"):
            assert await wait_for_holder(nc_b, node, timeout=10.0)
        holders = [
            Holder("honest", region="us", zone="us-1", host="h"),
            Holder("liar", region="eu", zone="eu-1", host="l"),
        ]
        result = await fetch_dag(nc_b, root, holders, volume, near=near, window=2, batch=2)
    finally:
        for holding in holdings:
            await holding.stop()
    assert result.corrupt_holders == ["liar"]
    assert result.holders["liar"].skipped
    assert "do not match" in result.holders["liar"].reason
    assert result.holders["honest"].stream_blocks > 0
    assert b"".join(read_file(volume, root)) == content("stream", 4 * MiB)


async def test_a_stream_that_dies_mid_fetch_completes_over_nats(
    clients: tuple[Any, Any], volume: FsBlockStore
) -> None:
    nc_a, nc_b = clients
    source = MemoryBlockStore()
    size = 6 * MiB
    root = import_into(source, size, "unixfs-v0-2015")
    holding = await streaming(nc_a, "leaf-a", source)
    stopping: list[asyncio.Task[None]] = []

    def progress(blocks: int, _bytes: int) -> None:
        if blocks == 3 and not stopping:
            # The holder's stream goes away (a crash, a firewall); its NATS side stays.
            stopping.append(asyncio.ensure_future(holding.stream.stop()))

    try:
        assert await wait_for_holder(nc_b, "leaf-a", timeout=10.0)
        result = await fetch_dag(
            nc_b, root, [Holder("leaf-a")], volume, window=2, batch=2, progress=progress
        )
        await asyncio.gather(*stopping)
    finally:
        await holding.stop()
    stats = result.holders["leaf-a"]
    assert stats.fallbacks == 1
    assert "broke" in stats.fallback
    assert 3 <= stats.stream_blocks < stats.blocks == result.blocks_fetched == len(source.blocks)
    assert not stats.skipped
    assert b"".join(read_file(volume, root)) == content("stream", size)


async def test_a_holder_without_the_root_grants_no_stream(clients: tuple[Any, Any]) -> None:
    """Its stream would serve nothing of that root; the fetcher keeps NATS for that holder."""
    nc_a, nc_b = clients
    source = MemoryBlockStore()
    root = import_into(source, 2 * MiB, "unixfs-v1-2025")
    partial = MemoryBlockStore()
    holding = await streaming(nc_a, "leaf-a", partial)
    try:
        assert await wait_for_holder(nc_b, "leaf-a", timeout=10.0)
        for held in (False, True):
            if held:
                partial.put(root, source.blocks[root])
            msg = await nc_b.request(
                Subjects().block_get("leaf-a"), encode_grant_request(root), timeout=5
            )
            records = decode_reply(msg.data)[1]
            assert any(isinstance(r, Grant) for r in records) is held, records
            assert isinstance(records[-1], End) and records[-1].status == Status.OK
    finally:
        await holding.stop()


async def test_an_interrupted_stream_fetch_resumes_without_refetching(
    clients: tuple[Any, Any], volume: FsBlockStore
) -> None:
    nc_a, nc_b = clients
    source = MemoryBlockStore()
    size = 24 * MiB
    root = import_into(source, size, "unixfs-v0-2015")  # 96 leaves + 1 root
    total = len(source.blocks)
    holding = await streaming(nc_a, "leaf-a", source)
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

        result = await fetch_dag(nc_b, root, [Holder("leaf-a")], volume)
    finally:
        await holding.stop()
    assert result.blocks_present == have
    assert result.blocks_fetched == total - have
    assert result.holders["leaf-a"].stream_blocks == total - have
    assert b"".join(read_file(volume, root)) == content("stream", size)


# -- the TCP port directly -------------------------------------------------------------------------


@pytest.fixture
async def two_roots() -> AsyncIterator[tuple[BlockStreamServer, Cid, Cid, MemoryBlockStore]]:
    store = MemoryBlockStore()
    first = import_into(store, 2 * MiB + 3, "unixfs-v1-2025", seed="first")
    second = import_into(store, 2 * MiB + 5, "unixfs-v1-2025", seed="second")
    server = BlockStreamServer(store)
    await server.start()
    try:
        yield server, first, second, store
    finally:
        await server.stop()


async def _records(client: StreamClient, count: int) -> list[Block | Missing | End]:
    return [await client.read(5.0) for _ in range(count)]


async def test_bad_tokens_and_garbage_are_refused_and_counted(
    two_roots: tuple[BlockStreamServer, Cid, Cid, MemoryBlockStore],
) -> None:
    server, root, _, _ = two_roots
    with pytest.raises(StreamRefusedError, match="token"):
        await StreamClient.open(server.address, b"\x00" * 32, timeout=5.0)
    host, port = server.address.rsplit(":", 1)
    for garbage in (b"GET / HTTP/1.1\r\n\r\n", struct.pack(">BBI", 0x20, 0, 1 << 30), b"\xff"):
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(garbage)
        if garbage == b"\xff":
            writer.close()  # a truncated header, then gone
        with pytest.raises((asyncio.IncompleteReadError, ConnectionError)):
            while True:
                await asyncio.wait_for(reader.readexactly(6), 5.0)
        writer.close()
    # A token is single use: the second connection with it is refused.
    grant = server.grant(root, None)
    client = await StreamClient.open(grant.address, grant.token, timeout=5.0)
    with pytest.raises(StreamRefusedError):
        await StreamClient.open(grant.address, grant.token, timeout=5.0)
    # A granted connection that sends garbage is closed; the server keeps serving others.
    client.transport.write(struct.pack(">BBI", 0x10, 0, 3) + b"\x05ab")
    end = await client.read(5.0)
    assert isinstance(end, End) and end.status == Status.MALFORMED
    await client.close()
    for _ in range(50):
        if server.stats.malformed >= 3 and server.stats.bad_tokens >= 2:
            break
        await asyncio.sleep(0.05)
    assert server.stats.bad_tokens == 2
    assert server.stats.malformed >= 3
    assert server.serve_stats.malformed == server.stats.malformed
    grant = server.grant(root, None)
    client = await StreamClient.open(grant.address, grant.token, timeout=5.0)
    client.send_get([root])
    block, end = await _records(client, 2)
    assert isinstance(block, Block) and block.cid == root
    assert isinstance(end, End) and end.status == Status.OK
    await client.close()


async def test_a_grant_for_one_root_does_not_open_another(
    two_roots: tuple[BlockStreamServer, Cid, Cid, MemoryBlockStore],
) -> None:
    server, first, second, store = two_roots
    second_blocks = list(walk_cids(store, second))
    grant = server.grant(first, None)
    client = await StreamClient.open(grant.address, grant.token, timeout=5.0)
    try:
        client.send_get([first, *second_blocks])
        records = await _records(client, len(second_blocks) + 2)
    finally:
        await client.close()
    assert isinstance(records[0], Block) and records[0].cid == first
    assert all(isinstance(r, Missing) for r in records[1:-1])
    assert [r.cid for r in records[1:-1] if isinstance(r, Missing)] == second_blocks
    assert isinstance(records[-1], End) and records[-1].status == Status.OK
    assert server.serve_stats.blocks_served == 1


async def test_expired_grants_are_refused(
    two_roots: tuple[BlockStreamServer, Cid, Cid, MemoryBlockStore],
) -> None:
    server, root, _, _ = two_roots
    server.grant_ttl = 0.0
    grant = server.grant(root, None)
    await asyncio.sleep(0.01)
    with pytest.raises(StreamRefusedError, match="expired"):
        await StreamClient.open(grant.address, grant.token, timeout=5.0)


async def test_the_stream_over_tls_verifies_the_holder(
    clients: tuple[Any, Any], volume: FsBlockStore, tmp_path: Path
) -> None:
    from certs import write_certs

    certs = write_certs(tmp_path / "tls")
    nc_a, nc_b = clients
    source = MemoryBlockStore()
    size = 3 * MiB + 11
    root = import_into(source, size, "unixfs-v0-2015")
    server = BlockServer(nc_a, "leaf-a", source)
    stream = BlockStreamServer(
        source,
        serve_stats=server.stats,
        tls=server_tls(str(certs / "server.pem"), str(certs / "server-key.pem")),
    )
    await stream.start()
    server.stream = stream
    await server.start()
    try:
        assert stream.address.startswith("tls://127.0.0.1:")
        assert await wait_for_holder(nc_b, "leaf-a", timeout=10.0)
        # A fetcher that does not trust the holder's certificate keeps to NATS.
        untrusted = await fetch_dag(nc_b, root, [Holder("leaf-a")], volume, stream_tls=client_tls())
        assert untrusted.holders["leaf-a"].stream_blocks == 0
        assert "CERTIFICATE_VERIFY_FAILED" in untrusted.holders["leaf-a"].fallback
        for cid in list(volume.cids()):
            volume.delete(cid)
        result = await fetch_dag(
            nc_b, root, [Holder("leaf-a")], volume, stream_tls=client_tls(str(certs / "ca.pem"))
        )
    finally:
        await server.stop()
        await stream.stop()
    stats = result.holders["leaf-a"]
    assert stats.stream_blocks == result.blocks_fetched == len(source.blocks)
    assert stats.fallbacks == 0
    assert b"".join(read_file(volume, root)) == content("stream", size)


# -- configuration and the node record -----------------------------------------------------------

BASE = "node: n1\nvolumes: [{path: /tmp/v}]\n"


def test_the_stream_is_on_by_default_on_loopback() -> None:
    config = parse_agent_config(BASE)
    assert config.stream_listen == "127.0.0.1:0"
    assert config.stream_advertise is None


def test_stream_settings_are_read_and_off_disables() -> None:
    config = parse_agent_config(
        BASE + "blocks: {stream_listen: '0.0.0.0:4250', stream_advertise: 'web1.example:4250'}\n"
    )
    assert (config.stream_listen, config.stream_advertise) == ("0.0.0.0:4250", "web1.example:4250")
    assert parse_agent_config(BASE + "blocks: {stream_listen: off}\n").stream_listen is None
    assert parse_agent_config(BASE + "blocks: {stream_listen: 'off'}\n").stream_listen is None


def test_stream_tls_files_are_read() -> None:
    config = parse_agent_config(
        BASE + "blocks: {tls: {cert: /etc/a.pem, key: /etc/a-key.pem, ca: /etc/ca.pem}}\n"
    )
    assert (config.stream_tls_cert, config.stream_tls_key, config.stream_tls_ca) == (
        "/etc/a.pem",
        "/etc/a-key.pem",
        "/etc/ca.pem",
    )


@pytest.mark.parametrize(
    ("blocks", "message"),
    [
        ("{tls: {cert: /etc/a.pem}}", "needs both `cert` and `key`"),
        ("{stream_listen: nowhere}", "is not host:port"),
        ("{stream_listen: '0.0.0.0:4250'}", "stream_advertise"),
        ("{stream_port: 1}", "unknown key"),
        ("{stream_listen: '127.0.0.1:0', stream_advertise: 'h:x'}", "not host or host:port"),
    ],
)
def test_bad_stream_settings_name_their_line(blocks: str, message: str) -> None:
    with pytest.raises(AgentConfigError, match=message) as caught:
        parse_agent_config(BASE + f"blocks: {blocks}\n", "agent.yaml")
    assert "agent.yaml:3:" in str(caught.value)


def test_node_records_carry_the_stream_address_and_old_ones_decode() -> None:
    record = NodeRecord(node="n1", block_stream="10.0.0.1:4250")
    assert NodeRecord.decode(record.encode()) == record
    old = NodeRecord(node="n1").encode()
    assert b"block_stream" not in old
    assert NodeRecord.decode(old).block_stream == ""

"""The block exchange wire format, and BlockServer against a real nats-server."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from memstore import MemoryBlockStore

from cim_place.cluster.exchange.block_wire import (
    MAX_REQUEST_CIDS,
    End,
    Missing,
    Part,
    ReplyWriter,
    Status,
    decode_reply,
    decode_request,
    encode_request,
)
from cim_place.cluster.exchange.blocks import BlockServer, VolumeSet
from cim_place.cluster.nats.subjects import Subjects
from cim_place.errors import ProtocolError
from cim_place.local.servers import NatsServer
from cim_place.objectstore.blockstore import FsBlockStore
from cim_place.objectstore.cid import DAG_PB, RAW, Cid, make_cid
from cim_place.testing import connected


def raw_block(n: int, size: int) -> tuple[Cid, bytes]:
    # Little endian: even a 1-byte block differs between n < 256, so CIDs are distinct.
    data = (n.to_bytes(4, "little") * (size // 4 + 1))[:size]
    return make_cid(RAW, data), data


def reassemble(messages: list[bytes]) -> tuple[dict[Cid, bytes], list[Cid], End]:
    """Decode a whole reply stream, checking sequence numbers and part order."""
    blocks: dict[Cid, bytearray] = {}
    missing: list[Cid] = []
    end: End | None = None
    for index, message in enumerate(messages):
        seq, records = decode_reply(message)
        assert seq == index
        for record in records:
            assert end is None, "records after END"
            if isinstance(record, Part):
                buffer = blocks.setdefault(record.cid, bytearray())
                assert record.offset == len(buffer)
                buffer += record.data
            elif isinstance(record, Missing):
                missing.append(record.cid)
            else:
                end = record
    assert end is not None
    assert end.messages == len(messages)
    return {cid: bytes(data) for cid, data in blocks.items()}, missing, end


# -- framing -----------------------------------------------------------------------------------


def test_request_round_trip() -> None:
    cids = [raw_block(i, 10)[0] for i in range(5)] + [make_cid(DAG_PB, b"x", 0)]
    assert decode_request(encode_request(cids, max_reply=1 << 20)) == (cids, 1 << 20)
    assert decode_request(encode_request([])) == ([], 0)


@pytest.mark.parametrize(
    "garbage",
    [
        b"",
        b"\x00",
        b"hello world",
        b"\xcb\x02\x10\x00\x00",  # another version
        b"\xcb\x01\x11\x00\x00",  # another kind
        b"\xcb\x01\x10\x00\x01",  # one CID announced, none there
        b"\xcb\x01\x10\x00\x01\x05abc",  # CID shorter than its length
        b"\xcb\x01\x10\x00\x01\x03abc",  # not a CID
        b"\xcb\x01\x10\x00\x00extra",  # trailing bytes
        b"\xcb\x01\x10\xff\xff\xff",  # truncated varints
    ],
)
def test_garbage_requests_are_protocol_errors(garbage: bytes) -> None:
    with pytest.raises(ProtocolError):
        decode_request(garbage)


def test_too_many_cids_is_refused() -> None:
    cid = raw_block(1, 1)[0]
    with pytest.raises(ValueError):
        encode_request([cid] * (MAX_REQUEST_CIDS + 1))
    with pytest.raises(ProtocolError, match="at most"):
        decode_request(b"\xcb\x01\x10\x00" + bytes([0x81, 0x10]))  # 2049 CIDs announced


@pytest.mark.parametrize("limit", [1024, 4096, 256 << 10, 1 << 20])
def test_writer_splits_blocks_larger_than_a_message(limit: int) -> None:
    blocks = [raw_block(i, size) for i, size in enumerate([1 << 20, 1, 0, 3000, 256 << 10])]
    absent = raw_block(99, 7)[0]
    writer = ReplyWriter(limit)
    messages: list[bytes] = []
    for cid, data in blocks:
        messages.extend(writer.block(cid, data))
    messages.extend(writer.missing(absent))
    messages.extend(writer.end())
    assert all(len(m) <= limit for m in messages)
    got, missing, end = reassemble(messages)
    assert got == dict(blocks)
    assert missing == [absent]
    assert end.status is Status.OK
    # Records are packed: every message but the last is (nearly) full.
    assert all(len(m) > limit - 200 for m in messages[:-1])


@settings(max_examples=40, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 20_000), max_size=8),
    limit=st.integers(1024, 70_000),
    absent=st.integers(0, 3),
)
def test_writer_round_trip(sizes: list[int], limit: int, absent: int) -> None:
    blocks = [raw_block(i, size) for i, size in enumerate(sizes)]
    gone = [raw_block(1000 + i, 1)[0] for i in range(absent)]
    writer = ReplyWriter(limit)
    messages: list[bytes] = []
    for cid, data in blocks:
        messages.extend(writer.block(cid, data))
    for cid in gone:
        messages.extend(writer.missing(cid))
    messages.extend(writer.end(Status.OK))
    assert all(len(m) <= limit for m in messages)
    got, missing, _ = reassemble(messages)
    assert got == dict(blocks)
    assert missing == gone


@pytest.mark.parametrize("garbage", [b"", b"\xcb", b"\xcb\x01\x00\x09", b"\xcb\x01\x00\x01\x05ab"])
def test_garbage_replies_are_protocol_errors(garbage: bytes) -> None:
    with pytest.raises(ProtocolError):
        decode_reply(garbage)


# -- the server, on a real nats-server -----------------------------------------------------------


async def ask(nc: Any, subject: str, payload: bytes, timeout: float = 5.0) -> list[bytes]:
    """Send one raw request and collect its reply stream up to the END record."""
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox, pending_bytes_limit=0)
    await nc.publish(subject, payload, reply=inbox)
    messages: list[bytes] = []
    try:
        while True:
            msg = await sub.next_msg(timeout)
            messages.append(msg.data)
            if any(isinstance(r, End) for r in decode_reply(msg.data)[1]):
                return messages
    finally:
        await sub.unsubscribe()


async def test_server_serves_blocks_and_reports_missing(nats_server: NatsServer) -> None:
    store = MemoryBlockStore()
    blocks = [raw_block(i, size) for i, size in enumerate([10, 1 << 20, 300_000])]
    for cid, data in blocks:
        store.put(cid, data)
    unknown = raw_block(77, 5)[0]
    async with connected(nats_server.url) as nc:
        server = BlockServer(nc, "node-a", store)
        await server.start()
        try:
            cids = [cid for cid, _ in blocks] + [unknown]
            messages = await ask(nc, Subjects().block_get("node-a"), encode_request(cids))
        finally:
            await server.stop()
    assert all(len(m) <= nc.max_payload for m in messages)
    got, missing, end = reassemble(messages)
    assert end.status is Status.OK
    assert got == dict(blocks)
    assert missing == [unknown]
    assert server.stats.blocks_served == 3
    assert server.stats.missing == 1


async def test_requester_max_payload_is_respected(nats_server: NatsServer) -> None:
    store = MemoryBlockStore()
    cid, data = raw_block(1, 1 << 20)
    store.put(cid, data)
    async with connected(nats_server.url) as nc:
        server = BlockServer(nc, "node-a", store, subjects=Subjects("test.prefix"))
        await server.start()
        try:
            subject = Subjects("test.prefix").block_get("node-a")
            messages = await ask(nc, subject, encode_request([cid], max_reply=64 << 10))
        finally:
            await server.stop()
    assert all(len(m) <= 64 << 10 for m in messages)
    assert len(messages) > 16
    assert reassemble(messages)[0] == {cid: data}


async def test_corrupt_local_block_is_reported_missing_not_served(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    with FsBlockStore(tmp_path / "vol", fsync="none") as store:
        good, good_data = raw_block(1, 1000)
        bad, bad_data = raw_block(2, 1000)
        store.put(good, good_data)
        store.put(bad, bad_data)
        path = store.block_path(bad)
        os.chmod(path, 0o644)
        path.write_bytes(b"rotten" + bad_data[6:])
        async with connected(nats_server.url) as nc:
            server = BlockServer(nc, "node-a", store)
            await server.start()
            try:
                messages = await ask(
                    nc, Subjects().block_get("node-a"), encode_request([bad, good])
                )
            finally:
                await server.stop()
    got, missing, end = reassemble(messages)
    assert got == {good: good_data}
    assert missing == [bad]
    assert end.status is Status.OK
    assert server.stats.corrupt == 1
    assert server.stats.corrupt_cids == [bad]


async def test_garbage_requests_do_not_kill_the_server(nats_server: NatsServer) -> None:
    store = MemoryBlockStore()
    cid, data = raw_block(1, 100)
    store.put(cid, data)
    subject = Subjects().block_get("node-a")
    async with connected(nats_server.url) as nc:
        server = BlockServer(nc, "node-a", store)
        await server.start()
        try:
            for garbage, status in [
                (b"", Status.MALFORMED),
                (b"\x00" * 100, Status.MALFORMED),
                (os.urandom(5000), Status.MALFORMED),
                (b'{"cids": ["bafy"]}', Status.MALFORMED),
                (b"\xcb\x01\x10\x00\x01\x03abc", Status.MALFORMED),
                (b"\xcb\x01\x10\x00" + bytes([0x81, 0x10]), Status.TOO_LARGE),
                (b"\xcb\x01\x10\x00\x00" + b"\x00" * 200_000, Status.TOO_LARGE),
            ]:
                messages = await ask(nc, subject, garbage)
                _, _, end = reassemble(messages)
                assert end.status is status
                assert end.reason
            # Without a reply subject there is no one to answer: counted, dropped.
            await nc.publish(subject, b"no reply")
            await nc.flush()
            # Still serving.
            got, _, _ = reassemble(await ask(nc, subject, encode_request([cid])))
            assert got == {cid: data}
            for _ in range(100):
                if server.stats.malformed == 8:
                    break
                await asyncio.sleep(0.02)
        finally:
            await server.stop()
    assert server.stats.malformed == 8
    assert server.stats.errors == 0


async def test_concurrent_requests_are_answered(nats_server: NatsServer) -> None:
    store = MemoryBlockStore()
    blocks = [raw_block(i, 200_000) for i in range(20)]
    for cid, data in blocks:
        store.put(cid, data)
    subject = Subjects().block_get("node-a")
    async with connected(nats_server.url) as nc:
        server = BlockServer(nc, "node-a", store, concurrency=3)
        await server.start()
        try:
            replies = await asyncio.gather(
                *(
                    ask(nc, subject, encode_request([cid for cid, _ in blocks[i::5]]))
                    for i in range(5)
                )
            )
        finally:
            await server.stop()
    got: dict[Cid, bytes] = {}
    for messages in replies:
        got.update(reassemble(messages)[0])
    assert got == dict(blocks)


async def test_one_server_serves_every_volume(nats_server: NatsServer, tmp_path: Path) -> None:
    with (
        FsBlockStore(tmp_path / "v1", fsync="none") as one,
        FsBlockStore(tmp_path / "v2", fsync="none") as two,
    ):
        first, first_data = raw_block(1, 5000)
        second, second_data = raw_block(2, 5000)
        one.put(first, first_data)
        two.put(second, second_data)
        # A rotten copy in the first volume, a good one in the second: the good one is served.
        one.put(second, second_data)
        one.block_path(second).write_bytes(b"rotten")
        async with connected(nats_server.url) as nc:
            server = BlockServer(nc, "node-a", VolumeSet([one, two]))
            await server.start()
            try:
                request = encode_request([first, second, raw_block(3, 1)[0]])
                messages = await ask(nc, Subjects().block_get("node-a"), request)
            finally:
                await server.stop()
    got, missing, _ = reassemble(messages)
    assert got == {first: first_data, second: second_data}
    assert len(missing) == 1
    assert server.stats.corrupt == 0

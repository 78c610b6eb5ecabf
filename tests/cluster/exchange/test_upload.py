"""Uploads through a running agent, against real nats-servers: hub1 and leaves, one of them with
a small max_payload so that a file crosses it in many chunks."""

from __future__ import annotations

import asyncio
import io
import random
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from cim_place.cli.app import app
from cim_place.cluster.exchange.upload_client import upload, wait_for_uploads
from cim_place.cluster.exchange.upload_pipe import ChunkPipe
from cim_place.cluster.exchange.upload_server import UploadService
from cim_place.cluster.exchange.upload_wire import (
    _ABORT,
    _DATA,
    _ERROR,
    _FINISH,
    _OPEN,
    _OPENED,
    BUSY,
    LOST,
    TIMEOUT,
    UploadAborted,
    UploadError,
    _body,
    _control,
    _data_head,
    _kind,
)
from cim_place.cluster.nats.subjects import Subjects
from cim_place.errors import StoreError, StoreFullError, TransportError
from cim_place.interfaces import Pin
from cim_place.local.servers import NatsServer
from cim_place.local.topologies import Hub, add_leaf
from cim_place.objectstore.cid import to_str
from cim_place.objectstore.dagcbor import Value
from cim_place.objectstore.store import ObjectStore
from cim_place.objectstore.unixfs import import_file
from cim_place.testing import LeafFactory, connected

SMALL_PAYLOAD = 64 * 1024
NODE = "leaf-a"


def payload(size: int, seed: int = 1) -> bytes:
    return random.Random(seed).randbytes(size)


def wait_idle(service: UploadService) -> Any:
    """Wait (bounded) until the service has no session left, e.g. after an abort."""

    async def waiting() -> None:
        for _ in range(400):
            if service.active == 0:
                return
            await asyncio.sleep(0.025)
        raise AssertionError(f"{service.active} upload sessions still open")

    return waiting()


@pytest.fixture
def leaf_a(hub1: Hub, tmp_path: Path) -> Iterator[NatsServer]:
    leaf = add_leaf(hub1, tmp_path / "leaf-a", NODE, max_payload=SMALL_PAYLOAD)
    try:
        yield leaf
    finally:
        leaf.stop()


@pytest.fixture
def store(tmp_path: Path) -> Iterator[ObjectStore]:
    with ObjectStore(tmp_path / "store-a") as opened:
        yield opened


@dataclass
class Agent:
    nc: Any
    service: UploadService
    pinned: list[Pin]


async def start_agent(leaf: NatsServer, store: ObjectStore, **options: Any) -> AsyncIterator[Agent]:
    pinned: list[Pin] = []

    async def on_pinned(pin: Pin) -> None:
        pinned.append(pin)

    async with connected(leaf.url, name="agent-a") as nc:
        service = UploadService(nc, NODE, store, on_pinned=on_pinned, **options)
        await service.start()
        try:
            yield Agent(nc, service, pinned)
        finally:
            await service.stop()


@pytest.fixture
async def agent(leaf_a: NatsServer, store: ObjectStore) -> AsyncIterator[Agent]:
    async for running in start_agent(leaf_a, store):
        yield running


# -- the pipe ------------------------------------------------------------------------------------


def test_pipe_reads_across_chunks_and_acknowledges_whole_chunks() -> None:
    consumed: list[int] = []
    pipe = ChunkPipe(consumed.append)
    for piece in (b"abc", b"", b"defgh", b"ij"):
        pipe.feed(piece)
    pipe.finish()
    assert pipe.read(4) == b"abcd"
    assert consumed == [1, 2]
    buffer = bytearray(10)
    assert pipe.readinto(buffer) == 6
    assert bytes(buffer[:6]) == b"efghij"
    assert consumed == [1, 2, 3, 4]
    assert pipe.read(5) == b""
    assert pipe.readinto(buffer) == 0
    assert pipe.pending == 0


def test_pipe_abort_fails_the_reader() -> None:
    pipe = ChunkPipe()
    pipe.feed(b"abc")
    pipe.abort(TIMEOUT, "no progress")
    assert pipe.read(3) == b"abc"
    with pytest.raises(UploadAborted) as caught:
        pipe.read(3)
    assert caught.value.code == TIMEOUT


def test_subjects() -> None:
    assert Subjects().agent_add("leaf-a") == "cim.place.agent.leaf-a.add"
    assert Subjects("x.y").has == "x.y.has"


# -- uploads -------------------------------------------------------------------------------------


async def test_upload_many_chunks_through_a_small_payload_leaf(
    agent: Agent, leaf_a: NatsServer, store: ObjectStore, tmp_path: Path
) -> None:
    data = payload(5 * 1024 * 1024 + 123)
    sample = tmp_path / "sample.bin"
    sample.write_bytes(data)
    sent: list[int] = []
    async with connected(leaf_a.url, name="cli") as nc:
        result = await upload(
            nc,
            NODE,
            io.BytesIO(data),
            name="report",
            owner="alice",
            metadata={"kind": "pdf"},
            progress=sent.append,
        )
    cli = CliRunner().invoke(app, ["cid", str(sample)])
    assert cli.exit_code == 0, cli.output
    assert result.cid_text == cli.stdout.strip()
    assert result.size == len(data)
    assert result.blocks == import_file(io.BytesIO(data), None).blocks
    assert sum(sent) == len(data)
    # Every chunk fits the leaf's 64 KiB max payload: many chunks.
    assert agent.service.stats.chunks_received >= len(data) // SMALL_PAYLOAD
    pin = store.stat(result.cid)
    assert pin is not None
    assert (pin.name, pin.owner, dict(pin.metadata)) == ("report", "alice", {"kind": "pdf"})
    assert b"".join(store.cat(result.cid)) == data
    assert [p.root for p in agent.pinned] == [result.cid]
    assert agent.service.active == 0


async def test_upload_from_another_leaf_with_the_v0_profile(
    agent: Agent, leaf_factory: LeafFactory, store: ObjectStore
) -> None:
    leaf_b = leaf_factory("leaf-b")  # default max payload: chunks are cut for leaf-a's 64 KiB
    data = payload(700 * 1024 + 5, seed=2)
    async with connected(leaf_b.url, name="cli-b") as nc:
        assert await wait_for_uploads(nc, NODE, timeout=10)
        result = await upload(nc, NODE, io.BytesIO(data), profile="unixfs-v0-2015", size=len(data))
    assert result.cid == import_file(io.BytesIO(data), None, "unixfs-v0-2015").root
    assert to_str(result.cid).startswith("Qm")
    assert store.stat(result.cid) is not None


async def test_empty_file(agent: Agent, leaf_a: NatsServer, store: ObjectStore) -> None:
    async with connected(leaf_a.url) as nc:
        result = await upload(nc, NODE, io.BytesIO(b""))
    assert result.cid == import_file(io.BytesIO(b""), None).root
    assert result.size == 0
    assert store.stat(result.cid) is not None


class FailingReader(io.RawIOBase):
    """A file that breaks after ``good`` bytes, as a disk read error would."""

    def __init__(self, good: int) -> None:
        self.left = good

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if self.left <= 0:
            raise OSError("read error on the source file")
        n = min(len(buffer), self.left)
        buffer[:n] = b"x" * n
        self.left -= n
        return n


async def test_aborted_upload_leaves_no_pin(
    agent: Agent, leaf_a: NatsServer, store: ObjectStore
) -> None:
    async with connected(leaf_a.url) as nc:
        with pytest.raises(OSError, match="read error"):
            await upload(nc, NODE, FailingReader(2 * 1024 * 1024 + 10))  # type: ignore[arg-type]
    await wait_idle(agent.service)
    assert store.pins.list() == []
    assert agent.pinned == []
    assert agent.service.stats.failed == 1
    # The blocks written before the abort are unreferenced: gc takes them all.
    assert store.blocks.used_bytes() > 0
    store.gc()
    assert store.blocks.used_bytes() == 0


async def test_full_volume_answers_full_and_pins_nothing(
    leaf_a: NatsServer, tmp_path: Path
) -> None:
    data = payload(3 * 1024 * 1024, seed=3)
    with ObjectStore(tmp_path / "small", capacity=1024 * 1024) as small:
        async for agent in start_agent(leaf_a, small):
            async with connected(leaf_a.url) as nc:
                # Size unknown: the volume fills part way.
                with pytest.raises(StoreFullError, match="capacity"):
                    await upload(nc, NODE, io.BytesIO(data))
                # Size announced: refused before any byte is sent.
                with pytest.raises(StoreFullError, match="bytes free"):
                    await upload(nc, NODE, io.BytesIO(data), size=len(data))
            await wait_idle(agent.service)
            assert small.pins.list() == []
            assert agent.pinned == []
            assert agent.service.stats.refused == 1


async def test_unknown_profile_is_refused(agent: Agent, leaf_a: NatsServer) -> None:
    async with connected(leaf_a.url) as nc:
        with pytest.raises(StoreError, match="unknown UnixFS profile"):
            await upload(nc, NODE, io.BytesIO(b"x"), profile="nope")


async def test_no_agent(leaf_a: NatsServer) -> None:
    async with connected(leaf_a.url) as nc:
        with pytest.raises(TransportError, match="no agent takes uploads"):
            await upload(nc, "leaf-z", io.BytesIO(b"x"), timeout=1)


# -- the raw protocol: a misbehaving or vanishing client -----------------------------------------


class RawSession:
    """A client speaking the protocol by hand, to break it on purpose."""

    def __init__(self, nc: Any) -> None:
        self.nc = nc
        self.subject = Subjects().agent_add(NODE)
        self.replies: asyncio.Queue[bytes] = asyncio.Queue()
        self.session = b""

    async def open(self) -> dict[str, Any]:
        inbox = self.nc.new_inbox()

        async def on_reply(msg: Any) -> None:
            self.replies.put_nowait(msg.data)

        await self.nc.subscribe(inbox, cb=on_reply)
        reply = await self.nc.request(
            self.subject, _control(_OPEN, {"inbox": inbox, "max_payload": 0}), timeout=5
        )
        assert _kind(reply.data) == _OPENED
        body = _body(reply.data)
        session = body["session"]
        assert isinstance(session, bytes)
        self.session = session
        return body

    async def data(self, seq: int, chunk: bytes) -> None:
        await self.nc.publish(self.subject, _data_head(self.session, seq) + chunk)

    async def finish(self, chunks: int, size: int) -> None:
        body: dict[str, Value] = {"session": self.session, "chunks": chunks, "size": size}
        await self.nc.publish(self.subject, _control(_FINISH, body))

    async def error(self) -> dict[str, Any]:
        """The next error the agent sends (acknowledgements are skipped)."""
        while True:
            data = await asyncio.wait_for(self.replies.get(), 10)
            if _kind(data) == _ERROR:
                return _body(data)


async def test_idle_session_times_out(leaf_a: NatsServer, store: ObjectStore) -> None:
    async for agent in start_agent(leaf_a, store, idle_timeout=0.3):
        async with connected(leaf_a.url) as nc:
            raw = RawSession(nc)
            await raw.open()
            await raw.data(0, b"some bytes, then silence")
            error = await raw.error()
        assert error["code"] == TIMEOUT
        await wait_idle(agent.service)
        assert store.pins.list() == []


async def test_lost_and_repeated_chunks(
    agent: Agent, leaf_a: NatsServer, store: ObjectStore
) -> None:
    async with connected(leaf_a.url) as nc:
        raw = RawSession(nc)
        await raw.open()
        await raw.data(0, b"a" * 100)
        await raw.data(0, b"a" * 100)  # repeated: ignored
        await raw.data(2, b"c" * 100)  # chunk 1 never came
        error = await raw.error()
        assert error["code"] == LOST
        assert "chunk 1" in error["message"]

        # A finish that counts more chunks than arrived is a loss too.
        raw = RawSession(nc)
        await raw.open()
        await raw.data(0, b"a" * 100)
        await raw.finish(2, 200)
        assert (await raw.error())["code"] == LOST
    await wait_idle(agent.service)
    assert agent.service.stats.duplicates == 1
    assert store.pins.list() == []


async def test_session_limit(leaf_a: NatsServer, store: ObjectStore) -> None:
    async for agent in start_agent(leaf_a, store, max_sessions=1):
        async with connected(leaf_a.url) as nc:
            raw = RawSession(nc)
            await raw.open()
            with pytest.raises(UploadError) as caught:
                await upload(nc, NODE, io.BytesIO(b"x"))
            assert caught.value.code == BUSY
            await nc.publish(raw.subject, _control(_ABORT, {"session": raw.session}))
            await wait_idle(agent.service)
            result = await upload(nc, NODE, io.BytesIO(b"now there is room"))
        assert store.stat(result.cid) is not None


async def test_garbage_does_not_kill_the_service(
    agent: Agent, leaf_a: NatsServer, store: ObjectStore
) -> None:
    subject = Subjects().agent_add(NODE)
    garbage = [
        b"",
        b"\x00",
        b"hello",
        b"\xca\x02\x01",  # another version
        b"\xca\x01\x7f",  # unknown kind
        b"\xca\x01\x01\xff\xff",  # open with a broken body
        b"\xca\x01\x01" + b"\xa0",  # open without an inbox
        bytes((0xCA, 1, _DATA)) + b"\x05abc",  # truncated data
        _data_head(b"no-such-session", 0) + b"data",
        _control(_FINISH, {"session": b"no-such-session", "chunks": 1, "size": 1}),
        _control(_ABORT, {"session": "not bytes"}),
    ]
    async with connected(leaf_a.url) as nc:
        for message in garbage:
            await nc.publish(subject, message)
        # A request with a reply subject hears why it was refused.
        reply = await nc.request(subject, b"garbage", timeout=5)
        assert _kind(reply.data) == _ERROR
        result = await upload(nc, NODE, io.BytesIO(b"still alive"))
    assert store.stat(result.cid) is not None
    assert agent.service.stats.malformed >= len(garbage)


async def test_volume_chooser_and_a_failing_hook(leaf_a: NatsServer, store: ObjectStore) -> None:
    asked: list[int | None] = []

    def choose(size: int | None) -> ObjectStore:
        asked.append(size)
        if size is not None and size > 1000:
            raise StoreFullError("no volume of leaf-a has 1001 bytes free; add a volume")
        return store

    def broken_hook(pin: Pin) -> None:
        raise RuntimeError("the event store is away")

    async with connected(leaf_a.url) as nc:
        service = UploadService(nc, NODE, choose, on_pinned=broken_hook)
        await service.start()
        try:
            with pytest.raises(StoreFullError, match="add a volume"):
                await upload(nc, NODE, io.BytesIO(b"x" * 1001), size=1001)
            # The hook failing does not undo the pin: the client hears "done".
            result = await upload(nc, NODE, io.BytesIO(b"small"))
        finally:
            await service.stop()
    assert asked == [1001, None]
    assert store.stat(result.cid) is not None
    assert service.stats.hook_errors == 1

"""Object access control in the block exchange, against a real server running generated users.

The requester's identity is the NATS user whose inbox its reply subject names; permissions let
each user subscribe under its own inbox only, so a claimed identity gets no data. A holder refuses
a requester the root's owner and readers do not include, with a clear "not allowed". The holder
runs a block stream too: its grants are checked the same way, and fetches use it.
"""

from __future__ import annotations

import asyncio
import io
import os
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import nats
import pytest
import pytest_asyncio
from nats.aio.client import Client

from cim_place.cluster.exchange.block_wire import (
    End,
    Grant,
    Status,
    decode_reply,
    encode_grant_request,
    encode_request,
)
from cim_place.cluster.exchange.blocks import BlockServer
from cim_place.cluster.exchange.fetch import fetch_dag
from cim_place.cluster.exchange.fetch_model import Holder
from cim_place.cluster.exchange.holders import HolderResponder
from cim_place.cluster.exchange.stream import BlockStreamServer
from cim_place.cluster.exchange.stream_client import StreamClient
from cim_place.cluster.exchange.stream_wire import Block
from cim_place.cluster.nats.connection import connect
from cim_place.cluster.nats.security import AccessDeniedError, ReadAccess, inbox_prefix
from cim_place.cluster.nats.users import plan_domain
from cim_place.interfaces import Pin
from cim_place.objectstore.blockstore import FsBlockStore
from cim_place.objectstore.cid import to_str
from cim_place.objectstore.store import ObjectStore
from cim_place.testing import SecuredServer, secured_server

pytestmark = pytest.mark.nats

NODE = "a"
CONTENT = os.urandom(3 * (1 << 20) + 12345)  # a root node and four leaves


Domain = SecuredServer


@pytest.fixture(scope="module")
def domain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Domain]:
    plan = plan_domain([NODE], readers={"alice": None, "bob": None, "carol": None})
    # One server holds every user here: the rules are the same on a leaf.
    domain = secured_server(
        tmp_path_factory.mktemp("acl"), [*plan.hub, *plan.leaves[NODE]], "acl-hub"
    )
    try:
        yield domain
    finally:
        domain.stop()


@dataclass
class Holding:
    store: ObjectStore
    owned: Pin
    """Owned by alice, readable by carol."""
    public: Pin
    """No owner: anyone may read it."""
    other: Pin
    """Owned by bob alone."""


@pytest_asyncio.fixture
async def holding(domain: Domain, tmp_path: Path) -> AsyncIterator[Holding]:
    store = ObjectStore(tmp_path / "volume")
    owned = store.add(io.BytesIO(CONTENT), owner="alice", metadata={"readers": "carol"})
    public = store.add(io.BytesIO(b"public " * 1000))
    other = store.add(io.BytesIO(b"bob's " * 1000), owner="bob")
    agent = await connect(domain.url(f"agent-{NODE}"), for_service=True)

    def pin_of(root: bytes) -> Pin | None:
        return store.pins.get(root)

    access = ReadAccess(pin_of, store.blocks)
    stream = BlockStreamServer(store.blocks, access=access)
    blocks = BlockServer(agent, NODE, store.blocks, access=access, stream=stream)
    services: list[BlockServer | HolderResponder | BlockStreamServer] = [
        stream,
        blocks,
        HolderResponder(agent, NODE, store.pins),
    ]
    for service in services:
        await service.start()
    try:
        yield Holding(store, owned, public, other)
    finally:
        for service in services:
            await service.stop()
        await agent.drain()
        store.close()


async def _fetch(domain: Domain, user: str, root: bytes, into: Path) -> int:
    nc = await connect(domain.url(user))
    blocks = FsBlockStore(into, fsync="none")
    try:
        result = await fetch_dag(nc, root, [Holder(NODE)], blocks, timeout=3.0)
        # Every block came over the holder's block stream, granted on NATS.
        assert result.holders[NODE].stream_blocks == result.blocks_fetched
        return result.blocks_fetched
    finally:
        blocks.close()
        await nc.close()


async def test_the_owner_and_listed_readers_may_get_it(
    domain: Domain, holding: Holding, tmp_path: Path
) -> None:
    root = holding.owned.root
    assert await _fetch(domain, "alice", root, tmp_path / "alice") == holding.owned.blocks
    assert await _fetch(domain, "carol", root, tmp_path / "carol") == holding.owned.blocks


async def test_an_unlisted_user_is_not_allowed(
    domain: Domain, holding: Holding, tmp_path: Path
) -> None:
    with pytest.raises(AccessDeniedError, match="not allowed: bob may not read") as caught:
        await _fetch(domain, "bob", holding.owned.root, tmp_path / "bob")
    assert to_str(holding.owned.root) in str(caught.value)
    assert "'alice'" in str(caught.value)  # the owner to ask
    blocks = FsBlockStore(tmp_path / "bob", fsync="none")
    try:
        assert not blocks.has(holding.owned.root)  # nothing was served
    finally:
        blocks.close()


async def test_public_objects_are_served_to_every_user(
    domain: Domain, holding: Holding, tmp_path: Path
) -> None:
    for user in ("alice", "bob"):
        assert await _fetch(domain, user, holding.public.root, tmp_path / user) >= 1


async def test_agents_may_read_everything_they_replicate(
    domain: Domain, holding: Holding, tmp_path: Path
) -> None:
    got = await _fetch(domain, f"agent-{NODE}", holding.other.root, tmp_path / "agent")
    assert got == holding.other.blocks


async def _ask(nc: Client, request: bytes) -> End:
    msg = await nc.request(f"cim.place.blk.{NODE}.get", request, timeout=3)
    ends = [r for r in decode_reply(msg.data)[1] if isinstance(r, End)]
    assert ends
    return ends[0]


async def test_a_readable_root_does_not_open_another_roots_blocks(
    domain: Domain, holding: Holding
) -> None:
    nc = await connect(domain.url("bob"))
    try:
        # bob may read his own root, but names alice's root block under it.
        end = await _ask(nc, encode_request([holding.owned.root], root=holding.other.root))
        assert end.status is Status.NOT_ALLOWED
        assert "is not part of" in end.reason
        # A request that names no root is refused to a reader (agents only).
        end = await _ask(nc, encode_request([holding.other.root]))
        assert end.status is Status.NOT_ALLOWED
        assert "did not name the root" in end.reason
    finally:
        await nc.close()


async def test_a_claimed_identity_gets_nothing(domain: Domain, holding: Holding) -> None:
    """bob claims alice's inbox: the server refuses the subscription, so no block reaches him."""
    violations: list[str] = []

    async def on_error(error: Exception) -> None:
        violations.append(str(error))

    bob = await nats.connect(
        domain.url("bob"),
        inbox_prefix=inbox_prefix("alice"),
        error_cb=on_error,
        allow_reconnect=False,
    )
    try:
        received: list[bytes] = []

        async def on_reply(msg: object) -> None:
            received.append(getattr(msg, "data", b""))

        inbox = bob.new_inbox()
        await bob.subscribe(f"{inbox}.*", cb=on_reply)
        await bob.publish(
            f"cim.place.blk.{NODE}.get",
            encode_request([holding.owned.root], root=holding.owned.root),
            reply=f"{inbox}.0",
        )
        await bob.flush()
        for _ in range(40):
            if violations:
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.3)
        assert any("permissions violation for subscription" in v.lower() for v in violations), (
            violations
        )
        assert received == []
    finally:
        await bob.close()


async def test_cli_get_says_not_allowed_or_writes_the_content(
    domain: Domain, holding: Holding, tmp_path: Path
) -> None:
    root = to_str(holding.owned.root)

    async def get(user: str, output: Path) -> tuple[int, str]:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "cim_place.cli",
            "get",
            root,
            "--server",
            domain.url(user),
            "--output",
            str(output),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        _, err = await process.communicate()
        return process.returncode or 0, err.decode()

    code, err = await get("bob", tmp_path / "bob.bin")
    assert code == 1
    assert err.startswith("error: not allowed: bob may not read"), err
    assert not (tmp_path / "bob.bin").exists()

    code, err = await get("alice", tmp_path / "alice.bin")
    assert code == 0, err
    assert (tmp_path / "alice.bin").read_bytes() == CONTENT


async def test_stream_grants_follow_the_read_rule(domain: Domain, holding: Holding) -> None:
    """bob gets no grant for alice's root; his grant for his own root opens only its blocks."""
    nc = await connect(domain.url("bob"))
    try:
        msg = await nc.request(
            f"cim.place.blk.{NODE}.get", encode_grant_request(holding.owned.root), timeout=3
        )
        records = decode_reply(msg.data)[1]
        assert not any(isinstance(r, Grant) for r in records)
        ends = [r for r in records if isinstance(r, End)]
        assert ends[0].status is Status.NOT_ALLOWED
        assert "not allowed: bob may not read" in ends[0].reason

        msg = await nc.request(
            f"cim.place.blk.{NODE}.get", encode_grant_request(holding.other.root), timeout=3
        )
        grants = [r for r in decode_reply(msg.data)[1] if isinstance(r, Grant)]
        assert len(grants) == 1
        client = await StreamClient.open(grants[0].address, grants[0].token, timeout=3.0)
        try:
            client.send_get([holding.owned.root, holding.other.root])
            records_ = [await client.read(3.0) for _ in range(3)]
        finally:
            await client.close()
        assert [type(r).__name__ for r in records_] == ["Missing", "Block", "End"]
        assert isinstance(records_[1], Block) and records_[1].cid == holding.other.root
    finally:
        await nc.close()

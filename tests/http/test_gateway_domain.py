"""The gateway of an agent in a domain (a 1-server hub, two leaves, an agent on each): content
held only by the other node is fetched through the domain and verified, child blocks are
served one at a time, corrupt local blocks are replaced, names redirect."""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

from cim_place.cluster.agent.config import AgentConfig, VolumeConfig
from cim_place.cluster.agent.service import Agent
from cim_place.cluster.events.store import ensure_event_store
from cim_place.cluster.exchange.fetch import wait_for_holder
from cim_place.cluster.exchange.upload import upload
from cim_place.cluster.nats.connection import connected, jetstream
from cim_place.cluster.state.names import NameRegistry
from cim_place.cluster.tasks.queue import ensure_task_stream
from cim_place.http.server import HttpSettings
from cim_place.local.servers import Hub
from cim_place.objectstore import car, dagpb
from cim_place.objectstore.cid import Cid, to_str
from cim_place.objectstore.testdata import chacha_stream
from cim_place.testing import LeafFactory

MiB = 1 << 20
SIZE = 5 * MiB + 7


def config(name: str, url: str, tmp: Path, zone: str) -> AgentConfig:
    return AgentConfig(
        node=name,
        volumes=(VolumeConfig("v0", tmp / name / "v0"),),
        servers=(url,),
        labels={"region": "eu", "zone": zone, "host": name},
        heartbeat=0.5,
        inventory=3600,
        http=HttpSettings(listen="127.0.0.1:0"),
    )


@dataclass
class Domain:
    hub: Hub
    a: Agent
    b: Agent

    def url(self, agent: Agent) -> str:
        assert agent.http is not None
        return agent.http.urls["gateway"]


@pytest.fixture
async def domain(hub1: Hub, leaf_factory: LeafFactory, tmp_path: Path) -> AsyncIterator[Domain]:
    leaf_a = leaf_factory("node-a")
    leaf_b = leaf_factory("node-b")
    async with connected(hub1.url) as nc:
        js_hub = jetstream(nc, "hub")
        await ensure_event_store(js_hub, replicas=1)
        await ensure_task_stream(js_hub, 1)
    agent_a = Agent(config("node-a", leaf_a.url, tmp_path, "z1"), fsync="none")
    agent_b = Agent(config("node-b", leaf_b.url, tmp_path, "z2"), fsync="none")
    await agent_a.start()
    await agent_b.start()
    try:
        yield Domain(hub1, agent_a, agent_b)
    finally:
        await agent_a.stop(grace=1)
        await agent_b.stop(grace=1)


async def _upload(domain: Domain, node: str, data: bytes) -> Cid:
    async with connected(domain.hub.url) as nc:
        assert await wait_for_holder(nc, node, timeout=10)
        return (await upload(nc, node, io.BytesIO(data), size=len(data))).cid


async def test_content_held_by_another_node(domain: Domain) -> None:
    data = chacha_stream("gateway-domain", SIZE).read()
    root = await _upload(domain, "node-a", data)
    assert domain.b.pinned_on(root) is None
    async with aiohttp.ClientSession(base_url=domain.url(domain.b)) as http:
        async with http.get(f"/ipfs/{to_str(root)}") as resp:
            assert resp.status == 200
            assert resp.headers["Content-Length"] == str(SIZE)
            assert await resp.read() == data
        # Cached now, not pinned: B serves a range from its own volume.
        async with http.get(f"/ipfs/{to_str(root)}", headers={"Range": "bytes=7-9"}) as resp:
            assert resp.status == 206 and await resp.read() == data[7:10]
        assert domain.b.pinned_on(root) is None
        async with http.get(f"/ipfs/{to_str(root)}?format=car") as resp:
            roots, sections = car.read_car(io.BytesIO(await resp.read()))
            assert roots == [root] and len(list(sections)) == 7


async def test_block_by_block_through_another_node(domain: Domain) -> None:
    """As a verifying client walks a DAG: the root raw, then each child raw."""
    data = chacha_stream("gateway-walk", SIZE).read()
    root = await _upload(domain, "node-a", data)
    async with aiohttp.ClientSession(base_url=domain.url(domain.b)) as http:
        async with http.get(f"/ipfs/{to_str(root)}?format=raw") as resp:
            assert resp.status == 200
            block = await resp.read()
        children = [link.hash for link in dagpb.decode_node(block).links]
        got = b""
        for child in children:
            headers = {"Accept": "application/vnd.ipld.raw"}
            async with http.get(f"/ipfs/{to_str(child)}", headers=headers) as resp:
                assert resp.status == 200
                got += await resp.read()
        assert got == data
        # A block of a DAG that nobody announced and nothing led to: not found.
        async with http.get(f"/ipfs/{to_str(chacha_cid())}?format=raw") as resp:
            assert resp.status == 404


def chacha_cid() -> Cid:
    from cim_place.objectstore.cid import RAW, make_cid

    return make_cid(RAW, b"never stored anywhere")


async def test_corrupt_local_block_is_replaced_from_another_node(domain: Domain) -> None:
    data = chacha_stream("gateway-heal", SIZE).read()
    root = await _upload(domain, "node-a", data)
    assert await _upload(domain, "node-b", data) == root
    store = domain.b.volumes["v0"]
    leaf = dagpb.decode_node(store.blocks.get(root)).links[2].hash
    path = store.blocks.block_path(leaf)
    damaged = bytearray(path.read_bytes())
    damaged[5] ^= 0x01
    path.write_bytes(bytes(damaged))
    async with aiohttp.ClientSession(base_url=domain.url(domain.b)) as http:
        async with http.get(f"/ipfs/{to_str(root)}") as resp:
            assert resp.status == 200 and await resp.read() == data
        async with http.get(f"/ipfs/{to_str(leaf)}?format=raw") as resp:
            assert await resp.read() == data[2 * MiB : 3 * MiB]
    assert store.blocks.get(leaf) == data[2 * MiB : 3 * MiB]  # repaired in place


async def test_names_redirect_and_unknown_content(domain: Domain) -> None:
    root = await _upload(domain, "node-a", b"named content\n")
    async with connected(domain.hub.url) as nc:
        await NameRegistry(jetstream(nc, "hub")).set("site/index", root)
    async with aiohttp.ClientSession(base_url=domain.url(domain.b)) as http:
        async with http.get("/name/site/index", allow_redirects=False) as resp:
            assert resp.status == 302
            assert resp.headers["Location"] == f"/ipfs/{to_str(root)}"
        async with http.get("/name/site/index") as resp:
            assert resp.status == 200 and await resp.read() == b"named content\n"
        async with http.get("/name/nobody") as resp:
            assert resp.status == 404
        async with http.get("/name/bad%20name") as resp:
            assert resp.status == 400
        for _ in range(3):
            async with http.get(f"/ipfs/{to_str(chacha_cid())}") as resp:
                assert resp.status == 404
            await asyncio.sleep(0)

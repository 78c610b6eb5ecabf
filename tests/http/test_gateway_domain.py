"""The gateway of an agent in a domain (a 1-server hub, two leaves, an agent on each): content
held only by the other node is fetched through the domain and verified, child blocks are
served one at a time, corrupt local blocks are replaced, names redirect."""

from __future__ import annotations

import asyncio
import io
from dataclasses import replace
from pathlib import Path

import aiohttp
from aiohttp import web
from http_domain import Domain, config, upload_to

from cim_place.cluster.agent.service import Agent
from cim_place.cluster.events.store import ensure_event_store
from cim_place.cluster.nats.connection import connected, jetstream
from cim_place.cluster.state.names import NameRegistry
from cim_place.http.server import HttpSettings, Listener
from cim_place.local.topologies import Hub
from cim_place.objectstore import car, dagpb
from cim_place.objectstore.cid import Cid, to_str
from cim_place.objectstore.testdata import chacha_stream
from cim_place.testing import LeafFactory

MiB = 1 << 20
SIZE = 5 * MiB + 7


async def test_content_held_by_another_node(domain: Domain) -> None:
    data = chacha_stream("gateway-domain", SIZE).read()
    root = await upload_to(domain, "node-a", data)
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
    root = await upload_to(domain, "node-a", data)
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
    root = await upload_to(domain, "node-a", data)
    assert await upload_to(domain, "node-b", data) == root
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
    root = await upload_to(domain, "node-a", b"named content\n")
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


async def test_further_listeners_bind_beside_the_gateway(
    hub1: Hub, leaf_factory: LeafFactory, tmp_path: Path
) -> None:
    """The hook the S3 API uses: a builder gets the running agent and returns its listener."""
    leaf = leaf_factory("node-c")
    async with connected(hub1.url) as nc:
        await ensure_event_store(jetstream(nc, "hub"), replicas=1)
    seen: list[str] = []

    def s3_like(agent: Agent) -> Listener:
        seen.append(agent.node)

        async def hello(_request: web.Request) -> web.Response:
            return web.Response(text=f"hello from {agent.node}")

        app = web.Application()
        app.router.add_get("/", hello)
        return Listener("s3", app, "127.0.0.1:0")

    for http in (HttpSettings(listen="127.0.0.1:0"), None):
        agent = Agent(replace(config("node-c", leaf.url, tmp_path, "z3"), http=http), fsync="none")
        agent.http_extra.append(s3_like)
        await agent.start()
        try:
            assert agent.http is not None
            assert ("gateway" in agent.http.urls) == (http is not None)
            async with (
                aiohttp.ClientSession() as session,
                session.get(agent.http.urls["s3"]) as resp,
            ):
                assert await resp.text() == "hello from node-c"
        finally:
            await agent.stop(grace=1)
        assert agent.http is None
    assert seen == ["node-c", "node-c"]


async def test_local_root_with_missing_children_fetches_them(domain: Domain) -> None:
    """The root is here (pinned, then two leaves lost), the rest only on the other node: the
    gateway fetches the missing blocks through the domain, verified, instead of answering 404."""
    data = chacha_stream("gateway-partial", SIZE).read()
    root = await upload_to(domain, "node-a", data)
    assert await upload_to(domain, "node-b", data) == root
    store = domain.b.volumes["v0"]
    links = dagpb.decode_node(store.blocks.get(root)).links
    for index in (1, 4):
        assert store.blocks.delete(links[index].hash)
    async with aiohttp.ClientSession(base_url=domain.url(domain.b)) as http:
        async with http.get(f"/ipfs/{to_str(root)}") as resp:
            assert resp.status == 200 and await resp.read() == data
        async with http.get(f"/ipfs/{to_str(root)}?format=car") as resp:
            roots, sections = car.read_car(io.BytesIO(await resp.read()))
            assert roots == [root] and len(list(sections)) == 7
    for index in (1, 4):
        assert store.blocks.has(links[index].hash)


async def test_child_block_alone_on_a_fresh_node(domain: Domain) -> None:
    """A verifying client that asks a node for a child block it never led there (another
    gateway served the root): the block is found in the domain and served, verified."""
    data = chacha_stream("gateway-child", SIZE).read()
    root = await upload_to(domain, "node-a", data)
    store = domain.a.volumes["v0"]
    leaf = dagpb.decode_node(store.blocks.get(root)).links[3].hash
    async with (
        aiohttp.ClientSession(base_url=domain.url(domain.b)) as http,
        http.get(f"/ipfs/{to_str(leaf)}?format=raw") as resp,
    ):
        assert resp.status == 200
        assert await resp.read() == data[3 * MiB : 4 * MiB]

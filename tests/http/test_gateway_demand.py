"""The gateway tells the demand counter of each object read (docs/DEMAND.md): a GET of a root,
with the requester and the size; not a HEAD, not a refusal, not a child block read alone."""

from __future__ import annotations

import asyncio
import io
import time
from pathlib import Path

import aiohttp
from http_domain import Domain, upload_to

from cim_place.cluster.controller.demand import DemandIntake
from cim_place.cluster.nats.connection import connected, flushed
from cim_place.cluster.nats.subjects import Subjects
from cim_place.http.gateway import Gateway
from cim_place.http.server import HttpServers, Listener
from cim_place.http.sources import Identify, LocalContent, token_digest
from cim_place.objectstore import dagpb
from cim_place.objectstore.cid import Cid, to_str
from cim_place.objectstore.store import ObjectStore
from cim_place.objectstore.testdata import chacha_stream
from cim_place.placement.demand_window import DemandWindow, Reads

SIZE = 2 * (1 << 20) + 7  # three leaves and a root


async def test_reads_of_roots_are_told_once_each(tmp_path: Path) -> None:
    store = ObjectStore(tmp_path / "v0", fsync="none")
    root = store.add(io.BytesIO(chacha_stream("demand", SIZE).read())).root
    node = dagpb.decode_node(store.blocks.get(root))
    child = node.links[0].hash
    reads: list[tuple[Cid, str | None, int]] = []
    gateway = Gateway(
        LocalContent(store.blocks),
        identify=Identify({token_digest("s3cret"): "shop-web"}),
        on_read=lambda cid, requester, size: reads.append((cid, requester, size)),
    )
    servers = HttpServers([Listener("gateway", gateway.app(), "127.0.0.1:0")])
    await servers.start()
    url = servers.urls["gateway"] + f"/ipfs/{to_str(root)}"
    try:
        async with aiohttp.ClientSession() as session:
            async with session.get(url) as resp:
                assert resp.status == 200 and len(await resp.read()) == SIZE
            auth = {"Authorization": "Bearer s3cret"}
            async with session.get(url + "?format=car", headers=auth) as resp:
                assert resp.status == 200
            async with session.head(url) as resp:
                assert resp.status == 200
            # A verifying client walking the DAG one raw block at a time.
            async with session.get(url + "?format=raw") as resp:
                assert resp.status == 200
            child_url = servers.urls["gateway"] + f"/ipfs/{to_str(child)}?format=raw"
            async with session.get(child_url) as resp:
                assert resp.status == 200
            missing = servers.urls["gateway"] + "/ipfs/" + to_str(root)[:-4] + "aaaa"
            async with session.get(missing) as resp:
                assert resp.status >= 400
    finally:
        await servers.stop()
        store.close()
    assert reads == [(root, None, SIZE), (root, "shop-web", SIZE), (root, None, SIZE)]


async def test_gateway_reads_reach_a_demand_window_on_the_hub(domain: Domain) -> None:
    """Reads through node-b's gateway of content held by node-a leave node-b as one report and
    are counted at node-b in a window fed from the hub (what the controller runs)."""
    data = chacha_stream("demand-domain", 300_000).read()
    root = await upload_to(domain, "node-a", data)
    window = DemandWindow(horizon=600, slot=60)
    async with connected(domain.hub.url) as nc:
        intake = DemandIntake(nc, Subjects(), window)
        await intake.start()
        await flushed(nc)
        async with aiohttp.ClientSession(base_url=domain.url(domain.b)) as http:
            for _ in range(5):
                async with http.get(f"/ipfs/{to_str(root)}") as resp:
                    assert resp.status == 200 and await resp.read() == data
        assert domain.b.demand is not None

        # The reporter flushes on its own every interval (5 s): wait for its report(s).
        def at_b() -> Reads:
            return window.by_node(root, time.time(), 600).get("node-b", Reads())

        for _ in range(3000):
            if at_b().count >= 5:
                break
            await asyncio.sleep(0.01)
        await intake.stop()
    assert intake.received >= 1 and intake.refused == 0
    assert at_b().count == 5 and at_b().bytes == 5 * len(data)
    assert set(window.by_node(root, time.time(), 600)) == {"node-b"}

"""Dead peers are noticed: a holder that stops answering mid-fetch is left for another holder.

Two holders serve the same DAG from two leaf servers; the fetcher, on the hub, prefers the first
(same zone). After the first block arrives, the first holder's leaf server is frozen (SIGSTOP):
its connections stay open and nothing answers, as with a node that hung or a link that went
silent, the case nats-server itself notices only minutes later. The fetch completes from the
second holder. Its per-request timeout is the agent's, derived from the heartbeat grace: a dead
holder costs at most two of them, which together fit in the grace.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from pathlib import Path

import pytest
from exchange import MiB, content, import_into
from memstore import MemoryBlockStore

from cim_place.cluster.agent.config import AgentConfig, VolumeConfig
from cim_place.cluster.agent.service import Agent
from cim_place.cluster.exchange.blocks import BlockServer
from cim_place.cluster.exchange.fetch import fetch_dag, wait_for_holder
from cim_place.cluster.exchange.fetch_model import MIN_TIMEOUT, Holder, Labels, request_timeout
from cim_place.cluster.exchange.ratelimit import BandwidthLimit
from cim_place.cluster.state.nodes import heartbeat_grace
from cim_place.local.topologies import Hub
from cim_place.objectstore.unixfs import read_file
from cim_place.testing import LeafFactory, connected

pytestmark = pytest.mark.timeout(240)


def test_the_request_timeout_follows_the_heartbeat_grace(tmp_path: Path) -> None:
    for interval in (5.0, 10.0, 2.0):
        grace = heartbeat_grace(interval)
        assert grace == 3 * interval  # the controller's default late_after at 5 s: 15 s
        # Two waits (stream grant, then the NATS request) fit in the grace.
        assert 2 * request_timeout(grace) <= max(grace, 2 * MIN_TIMEOUT)
    assert request_timeout(heartbeat_grace(5.0)) == 7.5
    # The agent's fetches use it.
    config = AgentConfig(
        node="n1", volumes=(VolumeConfig("v0", tmp_path / "v0"),), servers=(), heartbeat=10.0
    )
    assert Agent(config, fsync="none").fetch_timeout == request_timeout(30.0) == 15.0


async def test_a_fetch_fails_over_when_its_holder_stops_answering(
    hub1: Hub, leaf_factory: LeafFactory
) -> None:
    leaf_a = leaf_factory("leaf-a")
    leaf_b = leaf_factory("leaf-b")
    source = MemoryBlockStore()
    size = 6 * MiB
    root = import_into(source, size, "unixfs-v1-2025", seed="dead-holder")
    timeout = request_timeout(heartbeat_grace(1.0))
    frozen: list[int] = []

    def freeze_a(blocks: int, _bytes: int) -> None:
        if not frozen and blocks >= 1 and leaf_a.pid is not None:
            os.kill(leaf_a.pid, signal.SIGSTOP)
            frozen.append(leaf_a.pid)

    async with (
        connected(leaf_a.url) as nc_a,
        connected(leaf_b.url) as nc_b,
        connected(hub1.url) as nc,
    ):
        servers = [BlockServer(nc_a, "leaf-a", source), BlockServer(nc_b, "leaf-b", source)]
        for server in servers:
            await server.start()
        try:
            for node in ("leaf-a", "leaf-b"):
                assert await wait_for_holder(nc, node, timeout=10)
            store = MemoryBlockStore()
            result = await asyncio.wait_for(  # a hang guard, far above the expected seconds
                fetch_dag(
                    nc,
                    root,
                    [Holder("leaf-b", zone="z2"), Holder("leaf-a", zone="z1")],
                    store,
                    near=Labels(zone="z1"),
                    timeout=timeout,
                    # Slow enough that most blocks are still to come when leaf-a freezes.
                    bandwidth=BandwidthLimit(4 * MiB),
                    progress=freeze_a,
                    batch=1,
                    stream=False,
                ),
                timeout=120,
            )
        finally:
            for pid in frozen:
                os.kill(pid, signal.SIGCONT)
            for server in servers:
                with contextlib.suppress(Exception):
                    await server.stop()
    assert frozen, "leaf-a was never frozen"
    print(f"{size} bytes with leaf-a frozen: {result.seconds:.2f} s, timeout {timeout} s")
    assert b"".join(read_file(store, root)) == content("dead-holder", size)
    a, b = result.holders["leaf-a"], result.holders["leaf-b"]
    assert a.blocks >= 1 and a.failures >= 1  # it served, then stopped answering
    assert b.blocks >= 1 and a.blocks + b.blocks == result.blocks_fetched

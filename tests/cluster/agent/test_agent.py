"""The leaf agent as a whole, on real servers: a 1-server hub and two leaves, one agent on each.

Add through agent A, fetch to B by a task, drop from A by a task; every step is announced in the
hub's event store and the heartbeats show both nodes.
"""

from __future__ import annotations

import asyncio
import io
from pathlib import Path

import pytest

from cim_place.cluster.agent.config import AgentConfig, VolumeConfig
from cim_place.cluster.agent.service import Agent
from cim_place.cluster.events.readers import EventReader
from cim_place.cluster.events.types import ObjectRemoved, ObjectStored, TaskCompleted, parse_event
from cim_place.cluster.exchange.fetch import wait_for_holder
from cim_place.cluster.exchange.upload_client import upload
from cim_place.cluster.nats.connection import connected, jetstream
from cim_place.cluster.nats.envelope import Envelope
from cim_place.cluster.state.nodes import list_nodes
from cim_place.cluster.tasks.model import Task
from cim_place.cluster.tasks.queue import TaskQueue
from cim_place.errors import StoreFullError
from cim_place.local.topologies import Hub
from cim_place.objectstore.testdata import chacha_stream
from cim_place.testing import LeafFactory, agent_config

SIZE = 3 * 1024 * 1024 + 5


async def events_until(reader: EventReader, want: int, timeout: float = 30.0) -> list[Envelope]:
    seen: list[Envelope] = []
    deadline = asyncio.get_running_loop().time() + timeout
    while len(seen) < want and asyncio.get_running_loop().time() < deadline:
        seen.extend(await reader.fetch(timeout=0.5))
    return seen


async def test_add_fetch_drop_through_agents(
    agents: tuple[Hub, Agent, Agent],
) -> None:
    hub, agent_a, agent_b = agents
    data = chacha_stream("agent-e2e", SIZE).read()
    async with connected(hub.url) as nc:
        js_hub = jetstream(nc, "hub")
        assert await wait_for_holder(nc, "node-a", timeout=10)
        result = await upload(nc, "node-a", io.BytesIO(data), name="doc", owner="alice", size=SIZE)
        assert agent_a.pinned_on(result.cid) is not None

        queue = TaskQueue(js_hub)
        fetch = Task.create(
            "fetch",
            "node-b",
            result.cid,
            generation=1,
            holders=["node-a"],
            owner="alice",
            name="doc",
        )
        await queue.enqueue(fetch)
        for _ in range(200):
            if agent_b.pinned_on(result.cid) is not None:
                break
            await asyncio.sleep(0.1)
        located = agent_b.pinned_on(result.cid)
        assert located is not None
        assert located[1].owner == "alice" and located[1].size == SIZE
        # The blocks came over node-a's bulk block stream (on by default, on loopback).
        stream = agent_a.block_stream
        assert stream is not None and stream.stats.connections == 1
        assert stream.stats.bytes >= SIZE
        copy = b"".join(agent_b.volumes["v0"].cat(result.cid))
        assert copy == data

        drop = Task.create("drop", "node-a", result.cid, generation=2)
        await queue.enqueue(drop)
        for _ in range(200):
            if agent_a.pinned_on(result.cid) is None:
                break
            await asyncio.sleep(0.1)
        assert agent_a.pinned_on(result.cid) is None

        reader = EventReader(js_hub)
        envelopes = await events_until(reader, 6)
        await reader.close()
        events = [parse_event(e) for e in envelopes]
        stored = [e for e in events if isinstance(e, ObjectStored)]
        removed = [e for e in events if isinstance(e, ObjectRemoved)]
        completed = [e for e in events if isinstance(e, TaskCompleted)]
        assert {(e.root, e.volume) for e in stored} == {(result.cid, "v0")}
        assert len(stored) == 2 and len(removed) == 1 and len(completed) == 2
        causes = {e.causation_id for e in envelopes if e.content.type == "TaskCompleted"}
        assert causes == {fetch.id, drop.id}

        # The next heartbeat reports the fetched bytes on node-b's volume.
        for _ in range(100):
            nodes = {record.node: record for record in await list_nodes(js_hub)}
            if "node-b" in nodes and nodes["node-b"].volumes[0].used >= SIZE:
                break
            await asyncio.sleep(0.1)
        assert set(nodes) == {"node-a", "node-b"}
        assert nodes["node-b"].labels["zone"] == "z2"
        assert nodes["node-a"].block_stream == stream.address
        assert nodes["node-b"].volumes[0].used >= SIZE


async def test_fetch_task_is_idempotent(agents: tuple[Hub, Agent, Agent]) -> None:
    hub, _, agent_b = agents
    data = chacha_stream("agent-idem", 100_000).read()
    async with connected(hub.url) as nc:
        assert await wait_for_holder(nc, "node-a", timeout=10)
        result = await upload(nc, "node-a", io.BytesIO(data))
        task = Task.create("fetch", "node-b", result.cid, generation=1, holders=["node-a"])
        outcome = await agent_b.run_task(task)
        again = await agent_b.run_task(task)
        assert outcome.status == "completed" and again.status == "completed"
        assert agent_b.pinned_on(result.cid) is not None


async def test_a_full_volume_fails_the_fetch_and_pins_nothing(
    hub1: Hub, leaf_factory: LeafFactory, tmp_path: Path
) -> None:
    leaf_a, leaf_b = leaf_factory("full-a"), leaf_factory("full-b")
    small = AgentConfig(
        node="full-b",
        volumes=(VolumeConfig("v0", tmp_path / "full-b", capacity=100_000),),
        servers=(leaf_b.url,),
        heartbeat=0.5,
        inventory=3600,
    )
    async with (
        Agent(agent_config("full-a", leaf_a.url, tmp_path, "z1"), fsync="none") as agent_a,
        Agent(small, fsync="none") as agent_b,
        connected(hub1.url) as nc,
    ):
        assert await wait_for_holder(nc, "full-a", timeout=10)
        data = chacha_stream("too-big", 300_000).read()
        result = await upload(nc, "full-a", io.BytesIO(data))
        task = Task.create("fetch", "full-b", result.cid, generation=1, holders=["full-a"])
        with pytest.raises(StoreFullError, match="capacity"):
            await agent_b.run_task(task)
        assert agent_b.pinned_on(result.cid) is None
        agent_a.record()  # the heartbeat carries the services' counters into the metrics
        served = agent_a.metrics.registry.get_sample_value("cim_place_blocks_served_total")
        assert served is not None and served > 0

"""``repair.bandwidth`` on real servers (a 1-server hub, two leaves with agents): a repair task
carrying a rate limit moves its bytes at that rate.

The figure the policy promises is measured from the transfer itself: the bytes the repair
fetched and the seconds its fetch took, as the agent reports them in TaskCompleted. 8 MiB are
repaired at 2 MiB/s (about 4 s), long enough for the bucket's small burst not to count.
"""

from __future__ import annotations

import io
import os

import pytest

from cim_place.cluster.agent.service import Agent
from cim_place.cluster.events.readers import EventReader
from cim_place.cluster.events.types import TaskCompleted, parse_event
from cim_place.cluster.exchange.fetch import wait_for_holder
from cim_place.cluster.exchange.upload_client import upload
from cim_place.cluster.nats.connection import connected, jetstream
from cim_place.cluster.nats.subjects import Subjects
from cim_place.cluster.tasks.model import Task
from cim_place.cluster.tasks.queue import TaskQueue
from cim_place.local.topologies import Hub
from cim_place.objectstore import dag
from cim_place.objectstore.cid import RAW, codec_of
from cim_place.objectstore.testdata import chacha_stream
from cim_place.testing import until

pytestmark = pytest.mark.timeout(180)

MiB = 1 << 20
SIZE = 8 * MiB + 3
LIMIT = 2 * MiB


async def completed_repairs(js_hub: object, want: int) -> list[TaskCompleted]:
    reader = EventReader(js_hub, filter_subject=Subjects().events_of_type("TaskCompleted"))
    done: list[TaskCompleted] = []
    try:
        for _ in range(180):  # a hang guard: the repair itself takes about 4 s
            for envelope in await reader.fetch(timeout=0.5):
                event = parse_event(envelope)
                if isinstance(event, TaskCompleted) and event.action == "repair":
                    done.append(event)
            if len(done) >= want:
                return done
    finally:
        await reader.close()
    raise AssertionError(f"only {len(done)} of {want} repair tasks completed")


async def test_a_repair_moves_its_bytes_at_the_policy_bandwidth(
    agents: tuple[Hub, Agent, Agent],
) -> None:
    hub, _, agent_b = agents
    data = chacha_stream("repair-bandwidth", SIZE).read()
    async with connected(hub.url) as nc:
        js_hub = jetstream(nc, "hub")
        assert await wait_for_holder(nc, "node-a", timeout=10)
        root = (await upload(nc, "node-a", io.BytesIO(data), size=SIZE)).cid
        queue = TaskQueue(js_hub)
        await queue.enqueue(Task.create("fetch", "node-b", root, generation=1, holders=["node-a"]))
        await until(lambda: agent_b.pinned_on(root) is not None, "node-b holds the object")

        # Every leaf of node-b's replica is lost: the repair fetches the whole content again.
        store_b = agent_b.volumes["v0"]
        leaves = [c for c in dag.walk_cids(store_b.blocks, root) if codec_of(c) == RAW]
        for leaf in leaves:
            os.unlink(store_b.blocks.block_path(leaf))
        await queue.enqueue(
            Task.create(
                "repair", "node-b", root, generation=2, holders=["node-a"], rate_limit=LIMIT
            )
        )
        (repair,) = await completed_repairs(js_hub, 1)
    assert b"".join(store_b.cat(root)) == data
    moved = repair.result["bytes_fetched"]
    seconds = repair.result["fetch_seconds"]
    assert isinstance(moved, int) and isinstance(seconds, float)
    assert moved >= 8 * MiB
    rate = moved / seconds
    print(f"repair moved {moved} bytes in {seconds:.3f} s: {rate / MiB:.3f} MiB/s, limit 2 MiB/s")
    assert 0.9 * LIMIT <= rate <= 1.1 * LIMIT

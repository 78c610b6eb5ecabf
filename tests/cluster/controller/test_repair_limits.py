"""``repair.max_concurrent`` end to end on real servers: a hub, 3 leaves in 3 zones with agents,
a controller.

Nine placed objects each lose a block on one node (three per node); a scrub reports the damage
at once, so the controller has nine repairs to issue. The policy allows 2 at a time and makes
each slow (``bandwidth: 1MiB/s``, 1 MiB to move): every time the controller records a task, the
repair tasks it has in flight are counted. The count never exceeds 2, reaches 2 (the limit, not
something else, is what holds them back), and every object ends placed with its exact bytes.

Replacing the copies of a node lost past the grace is repair work too: when n3 is gone and a
new node n4 arrives, the six fetches to n4 run at most 2 at a time, under the same bandwidth.
"""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from cim_place.cluster.agent.service import Agent
from cim_place.cluster.controller.service import Controller
from cim_place.cluster.exchange.fetch import wait_for_holder
from cim_place.cluster.exchange.upload_client import upload
from cim_place.cluster.nats.connection import connected, jetstream
from cim_place.cluster.nats.subjects import Subjects
from cim_place.cluster.state.locations import LocationStore
from cim_place.cluster.tasks.model import Task
from cim_place.local.topologies import Hub
from cim_place.objectstore import dag
from cim_place.objectstore.cid import RAW, Cid, codec_of
from cim_place.objectstore.testdata import chacha_stream
from cim_place.testing import (
    NO_SCHEDULED_SCRUB,
    LeafFactory,
    agent_config,
    controlled_domain,
    until,
)

pytestmark = pytest.mark.timeout(300)

POLICY = """
name: limited-repairs
replicas: 3
spread: {domain: zone, max_per_domain: 1}
repair: {grace: 2s, max_concurrent: 2, bandwidth: 1MiB/s}
"""
SIZE = 2 * 1024 * 1024 + 5
OBJECTS = 9
LIMIT = 2


@pytest.fixture
async def domain(
    hub1: Hub, leaf_factory: LeafFactory, tmp_path: Path
) -> AsyncIterator[tuple[Hub, Controller, dict[str, Agent]]]:
    async with controlled_domain(
        hub1, leaf_factory, tmp_path, POLICY, scrub_interval=NO_SCHEDULED_SCRUB
    ) as (controller, agents):
        yield hub1, controller, agents


async def states(hub: Hub, roots: list[Cid]) -> dict[Cid, str]:
    async with connected(hub.url) as nc:
        store = await LocationStore(jetstream(nc, "hub")).open(create=False)
        out = {}
        for root in roots:
            status = await store.get(root)
            out[root] = "" if status is None else f"{status.state}/{status.pinned}"
        return out


async def all_placed(hub: Hub, roots: list[Cid], timeout: float = 120.0) -> None:
    last: dict[Cid, str] = {}
    for _ in range(int(timeout / 0.2)):  # a hang guard, not a speed requirement
        last = await states(hub, roots)
        if all(state == "placed/3" for state in last.values()):
            return
        await asyncio.sleep(0.2)
    raise AssertionError(f"not every object was placed: {sorted(last.values())}")


async def lost_on(hub: Hub, roots: list[Cid], node: str, timeout: float = 120.0) -> None:
    for _ in range(int(timeout / 0.2)):  # a hang guard
        async with connected(hub.url) as nc:
            store = await LocationStore(jetstream(nc, "hub")).open(create=False)
            statuses = [await store.get(root) for root in roots]
        if all(
            s is not None and any(loc.node == node and loc.state == "lost" for loc in s.locations)
            for s in statuses
        ):
            return
        await asyncio.sleep(0.2)
    raise AssertionError(f"the copies on {node} were never counted lost")


async def placed_objects(hub: Hub, seed: str, count: int) -> dict[Cid, bytes]:
    """``count`` objects added through n1, once each is placed with its 3 copies."""
    contents: dict[Cid, bytes] = {}
    async with connected(hub.url) as nc:
        assert await wait_for_holder(nc, "n1", timeout=10)
        for i in range(count):
            data = chacha_stream(f"{seed}-{i}", SIZE).read()
            result = await upload(nc, "n1", io.BytesIO(data), size=SIZE)
            contents[result.cid] = data
    await all_placed(hub, list(contents))
    return contents


def count_repairs(controller: Controller) -> tuple[list[int], list[Task]]:
    """From now on, each time the controller records a task it enqueued: the repair tasks then in
    flight (a count per enqueue) and every repair task enqueued."""
    projection = controller.projection
    record = projection.task_enqueued
    counts: list[int] = []
    repairs: list[Task] = []

    def counting(task: Task, now: float, *, repair_policy: str | None = None) -> None:
        record(task, now, repair_policy=repair_policy)
        if repair_policy is not None:
            repairs.append(task)
        counts.append(sum(1 for t in projection.in_flight() if t.repair_policy is not None))

    projection.task_enqueued = counting  # type: ignore[method-assign]
    return counts, repairs


async def test_repairs_never_exceed_max_concurrent_and_all_complete(
    domain: tuple[Hub, Controller, dict[str, Agent]],
) -> None:
    hub, controller, agents = domain
    contents = await placed_objects(hub, "repair-limit", OBJECTS)
    roots = list(contents)
    counts, repairs = count_repairs(controller)

    # One lost block per object, three objects per node.
    nodes = sorted(agents)
    damaged: dict[Cid, str] = {}
    for i, root in enumerate(roots):
        agent = agents[nodes[i % 3]]
        blocks = agent.volumes["v0"].blocks
        first = next(c for c in dag.walk_cids(blocks, root) if codec_of(c) == RAW)
        blocks.block_path(first).unlink()
        damaged[root] = agent.node
    async with connected(hub.url) as nc:
        for node in nodes:
            await nc.request(Subjects().agent_scrub(node), b"", timeout=60)

    await all_placed(hub, roots)
    assert {(t.node, t.root) for t in repairs} >= {(node, root) for root, node in damaged.items()}
    assert all(t.kind == "repair" and t.rate_limit == 1024 * 1024 for t in repairs)
    print(f"repair tasks in flight after each enqueue: {counts}")
    assert max(counts) == LIMIT
    for root, data in contents.items():
        for agent in agents.values():
            assert b"".join(agent.volumes["v0"].cat(root)) == data


async def test_replacing_copies_lost_with_a_node_is_repair_work_under_the_same_cap(
    domain: tuple[Hub, Controller, dict[str, Agent]], leaf_factory: LeafFactory, tmp_path: Path
) -> None:
    """n3 goes away for good; its copies are replaced on a new node n4 in its place. Those
    fetches are repairs: at most 2 in flight, each under the policy's bandwidth."""
    hub, controller, agents = domain
    contents = await placed_objects(hub, "repair-lost", 6)
    roots = list(contents)
    counts, repairs = count_repairs(controller)

    # n3 goes away and stays away past the grace: its copies are lost (with no fourth zone yet,
    # nowhere to replace them). Then n4 arrives in a zone of its own.
    await agents.pop("n3").stop(grace=1)
    await lost_on(hub, roots, "n3")
    leaf = leaf_factory("n4")
    n4 = Agent(
        agent_config("n4", leaf.url, tmp_path, "z4", scrub_interval=NO_SCHEDULED_SCRUB),
        fsync="none",
    )
    agents["n4"] = n4  # stopped by the fixture
    await n4.start()
    await until(lambda: all(n4.pinned_on(r) for r in roots), "n4 holds every object", 120)
    await all_placed(hub, roots)
    assert {(t.kind, t.node) for t in repairs} == {("fetch", "n4")}
    assert {t.root for t in repairs} == set(roots)
    assert all(t.rate_limit == 1024 * 1024 for t in repairs)
    print(f"replacement fetches in flight after each enqueue: {counts}")
    assert max(counts) == LIMIT
    for root, data in contents.items():
        assert b"".join(n4.volumes["v0"].cat(root)) == data

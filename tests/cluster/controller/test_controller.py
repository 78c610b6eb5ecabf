"""The controller end to end on real servers: a hub and 4 leaves with agents in different zones.

Each test starts its own domain (fixtures are function scoped) so that one scenario's copies never
leak into another's. Grace periods are shortened through the policy and the controller config.
"""

from __future__ import annotations

import asyncio
import io
import json
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from cim_place.cluster.agent.config import AgentConfig, VolumeConfig
from cim_place.cluster.agent.service import Agent
from cim_place.cluster.controller.service import Controller, ControllerConfig, set_drain
from cim_place.cluster.exchange.fetch import wait_for_holder
from cim_place.cluster.exchange.upload_client import upload
from cim_place.cluster.nats.connection import connected, jetstream
from cim_place.cluster.state.locations import LocationStore
from cim_place.cluster.state.policies import PolicyStore
from cim_place.local.servers import NatsServer
from cim_place.local.topologies import Hub
from cim_place.objectstore import cid as cids
from cim_place.objectstore.cid import Cid
from cim_place.objectstore.testdata import chacha_stream
from cim_place.placement.model import PlacedObject
from cim_place.placement.planner import plan
from cim_place.placement.status import ObjectStatus
from cim_place.policies.selectors import ObjectFacts
from cim_place.policies.validate import load_text
from cim_place.testing import LeafFactory

pytestmark = pytest.mark.timeout(300)

ZONE_SPREAD = """
name: three-zones
replicas: {copies}
spread: {{domain: zone, max_per_domain: 1}}
repair: {{grace: 2s}}
"""


def policy_text(copies: int) -> str:
    return ZONE_SPREAD.format(copies=copies)


@dataclass
class Domain:
    hub: Hub
    leaves: dict[str, NatsServer]
    agents: dict[str, Agent]
    controllers: list[Controller]
    tmp: Path
    make_agent: Callable[[str, str], Agent] = field(repr=False)

    def holders(self, cid: Cid) -> set[str]:
        return {node for node, agent in self.agents.items() if agent.pinned_on(cid) is not None}


def agent_config(name: str, leaf: NatsServer, tmp: Path, zone: str) -> AgentConfig:
    return AgentConfig(
        node=name,
        volumes=(VolumeConfig("v0", tmp / name / "v0"),),
        servers=(leaf.url,),
        labels={"region": "eu", "zone": zone, "host": name},
        heartbeat=0.5,
        inventory=3600,
    )


def controller_config(hub: Hub, identity: str = "ctl-a") -> ControllerConfig:
    return ControllerConfig(
        servers=(hub.url,),
        identity=identity,
        lease=3.0,
        late_after=1.5,
        down_after=3.0,
        full_pass_every=2.0,
        summary_every=0.5,
    )


async def apply_policy(hub: Hub, text: str) -> None:
    async with connected(hub.url) as nc:
        store = await PolicyStore.open(jetstream(nc, "hub"), create=True)
        await store.apply(load_text(text, "test.yaml"), actor="test")


@pytest.fixture
async def domain(hub1: Hub, leaf_factory: LeafFactory, tmp_path: Path) -> AsyncIterator[Domain]:
    await apply_policy(hub1, policy_text(3))
    leaves = {f"n{i}": leaf_factory(f"n{i}") for i in range(1, 5)}

    def make_agent(name: str, zone: str) -> Agent:
        return Agent(agent_config(name, leaves[name], tmp_path, zone), fsync="none")

    # The controller first, as `cim-place up` does: it creates the streams the agents use.
    controller = Controller(controller_config(hub1))
    await controller.start()
    agents = {name: make_agent(name, f"z{i}") for i, name in enumerate(leaves, start=1)}
    for agent in agents.values():
        await agent.start()
    state = Domain(hub1, leaves, agents, [controller], tmp_path, make_agent)
    try:
        yield state
    finally:
        for ctl in state.controllers:
            await ctl.stop()
        await asyncio.gather(*(agent.stop(grace=1) for agent in state.agents.values()))


async def until(predicate: Callable[[], bool], timeout: float = 120.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.1)


async def status_of(hub: Hub, cid: Cid) -> ObjectStatus | None:
    async with connected(hub.url) as nc:
        store = await LocationStore(jetstream(nc, "hub")).open(create=False)
        return await store.get(cid)


async def wait_status(
    hub: Hub, cid: Cid, state: str, pinned: int, timeout: float = 120.0
) -> ObjectStatus:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    last = None
    while loop.time() < deadline:
        last = await status_of(hub, cid)
        if last is not None and last.state == state and last.pinned == pinned:
            return last
        await asyncio.sleep(0.2)
    raise AssertionError(f"status never became {state} with {pinned} pinned: {last}")


async def add(domain: Domain, node: str, seed: str, size: int = 300_000) -> Cid:
    data = chacha_stream(seed, size).read()
    async with connected(domain.hub.url) as nc:
        assert await wait_for_holder(nc, node, timeout=10)
        result = await upload(nc, node, io.BytesIO(data), name=seed, owner="alice", size=size)
    return result.cid


async def test_three_copies_in_three_zones(domain: Domain) -> None:
    cid = await add(domain, "n1", "placed")
    status = await wait_status(domain.hub, cid, "placed", 3)
    zones = {loc.zone for loc in status.locations if loc.state == "pinned"}
    assert len(zones) == 3
    await until(lambda: len(domain.holders(cid)) == 3)
    assert status.desired == 3 and status.policy == "three-zones"
    assert cids.to_str(cid) == status.cid

    # `policy explain` against the domain shows the planner's choice and a reason per volume.
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "cim_place.cli",
        "policy",
        "explain",
        status.cid,
        "--server",
        domain.hub.url,
        "--json",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await process.communicate()
    assert process.returncode == 0, err.decode()
    explained = json.loads(out)
    placement = explained["placement"]
    assert placement["policy"] == "three-zones"
    assert sorted(placement["desired"]) == sorted(placement["current"])
    verdicts = {v["volume"]: v for v in placement["volumes"]}
    assert len(verdicts) == 4
    [refused] = [v for v in verdicts.values() if not v["taken"]]
    assert refused["verdict"]


async def test_a_lost_node_is_repaired_and_never_below_one_copy(domain: Domain) -> None:
    cid = await add(domain, "n1", "repair")
    await wait_status(domain.hub, cid, "placed", 3)
    await until(lambda: len(domain.holders(cid)) == 3)
    victim = sorted(domain.holders(cid) - {"n1"})[0]
    await domain.agents.pop(victim).stop(grace=0)
    seen_min = 3

    def watch() -> bool:
        nonlocal seen_min
        seen_min = min(seen_min, len(domain.holders(cid)))
        return len(domain.holders(cid)) == 3

    await until(watch, timeout=90)
    await wait_status(domain.hub, cid, "placed", 3, timeout=60)
    assert seen_min >= 1
    assert victim not in domain.holders(cid)


async def test_drain_moves_everything_off_a_node(domain: Domain) -> None:
    cid = await add(domain, "n1", "drain")
    await wait_status(domain.hub, cid, "placed", 3)
    await until(lambda: len(domain.holders(cid)) == 3)
    drained = sorted(domain.holders(cid))[0]
    async with connected(domain.hub.url) as nc:
        await set_drain(jetstream(nc, "hub"), drained, True)
    await until(lambda: drained not in domain.holders(cid) and len(domain.holders(cid)) == 3, 90)
    status = await wait_status(domain.hub, cid, "placed", 3)
    assert drained not in {loc.node for loc in status.locations}


async def test_policy_change_from_three_to_two_drops_one_copy(domain: Domain) -> None:
    cid = await add(domain, "n1", "trim")
    await wait_status(domain.hub, cid, "placed", 3)
    await until(lambda: len(domain.holders(cid)) == 3)
    await apply_policy(domain.hub, policy_text(2))
    seen_min = 3

    def watch() -> bool:
        nonlocal seen_min
        seen_min = min(seen_min, len(domain.holders(cid)))
        return len(domain.holders(cid)) == 2

    await until(watch, timeout=60)
    await wait_status(domain.hub, cid, "placed", 2)
    assert seen_min == 2


async def test_standby_takes_over_and_no_copy_is_dropped_twice(domain: Domain) -> None:
    standby = Controller(controller_config(domain.hub, identity="ctl-b"))
    await standby.start()
    domain.controllers.append(standby)
    leader = domain.controllers[0]
    await until(lambda: leader.is_leader)
    cid = await add(domain, "n1", "takeover")
    # Kill the leader mid-reconcile: stop it without releasing the lease, as a crash would.
    await until(lambda: leader.reconciled > 0)
    assert leader.election is not None
    await leader.election.stop(release=False)
    await leader.stop()
    domain.controllers.remove(leader)
    await until(lambda: standby.is_leader, timeout=30)
    await wait_status(domain.hub, cid, "placed", 3)
    await until(lambda: len(domain.holders(cid)) == 3)
    drops = [t for t in standby.projection.tasks_for(cid) if t.kind == "drop"]
    assert drops == []


async def test_a_new_leader_counts_the_tasks_its_predecessor_left_in_flight(
    domain: Domain,
) -> None:
    # The other nodes stay up (heartbeats) but run no task: what is enqueued stays in flight.
    for name in ("n2", "n3", "n4"):
        worker = domain.agents[name]._worker
        assert worker is not None
        await worker.stop(grace=0)
        domain.agents[name]._worker = None
    standby = Controller(controller_config(domain.hub, identity="ctl-b"))
    await standby.start()
    domain.controllers.append(standby)
    leader = domain.controllers[0]
    await until(lambda: leader.is_leader)
    cid = await add(domain, "n1", "in-flight")
    await until(lambda: len(leader.projection.tasks_for(cid)) == 2)  # two fetches: 3 copies
    enqueued = {task.id: task.enqueued_at for task in leader.projection.tasks_for(cid)}
    assert standby.projection.tasks_for(cid) == ()  # a standby knows only its own tasks
    assert leader.election is not None
    await leader.election.stop(release=False)  # a crash: the lease runs out
    await leader.stop()
    domain.controllers.remove(leader)
    await until(lambda: standby.is_leader, timeout=30)
    # Read back from the task stream, not enqueued again: the standby queued nothing itself.
    ids = set(enqueued)
    await until(lambda: {task.id for task in standby.projection.tasks_for(cid)} == ids)
    queued = standby.metrics.registry.get_sample_value
    assert not queued("cim_place_controller_tasks_queued_total", {"kind": "fetch"})
    assert standby.projection.tasks_in_flight == 2


async def test_a_new_leaf_receives_what_the_planner_says_copy_then_drop(
    domain: Domain, leaf_factory: LeafFactory
) -> None:
    objects = [await add(domain, "n1", f"rebalance-{i}", size=50_000) for i in range(6)]
    for cid in objects:
        await wait_status(domain.hub, cid, "placed", 3)
        await until(lambda cid=cid: len(domain.holders(cid)) == 3)

    domain.leaves["n5"] = leaf_factory("n5")
    domain.agents["n5"] = domain.make_agent("n5", "z5")
    await domain.agents["n5"].start()
    controller = domain.controllers[0]
    ideal = {}
    lowest = {cid: 3 for cid in objects}

    def settled() -> bool:
        node_map = controller.node_map(time.time())
        if len(node_map.volumes) < 5:
            return False
        for cid in objects:
            held = domain.holders(cid)
            lowest[cid] = min(lowest[cid], len(held))
            rule = controller.policy_for(ObjectFacts(cid=cids.to_str(cid))).rule
            wanted = plan(PlacedObject(cid, 50_000), rule, node_map, keep_current=False).desired
            ideal[cid] = {vid.split("/")[0] for vid in wanted}
            if held != ideal[cid]:
                return False
        return True

    await until(settled, timeout=120)
    assert any("n5" in ideal[cid] for cid in objects), "the planner sends nothing to n5"
    assert all(count >= 3 for count in lowest.values()), lowest  # copy first, then drop
    for cid in objects:
        await wait_status(domain.hub, cid, "placed", 3)


async def test_an_expired_object_is_expired_never_lost_and_leaves_the_listing(
    domain: Domain,
) -> None:
    await apply_policy(domain.hub, policy_text(2) + "expire_after: 4s\n")
    cid = await add(domain, "n1", "short-lived")
    seen: set[str] = set()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 120
    while loop.time() < deadline:
        status = await status_of(domain.hub, cid)
        if status is None and seen:
            break
        if status is not None:
            seen.add(status.state)
        await asyncio.sleep(0.1)
    else:
        raise AssertionError(f"the expired object is still listed (states seen: {seen})")
    # "expired" may last less than one poll (the drops are quick); it is never "lost".
    assert "lost" not in seen
    await until(lambda: not domain.holders(cid), timeout=30)
    async with connected(domain.hub.url) as nc:
        store = await LocationStore(jetstream(nc, "hub")).open(create=False)
        assert cids.to_str(cid) not in {s.cid async for s in store.list()}
    controller = domain.controllers[0]
    await until(lambda: controller.projection.object(cid) is None, timeout=10)
    assert controller.status_index.get(cids.to_str(cid)) is None  # gone from `status --state`
    summary = controller.summary()
    assert summary.by_state.get("lost") == 0 and summary.under_replicated == 0

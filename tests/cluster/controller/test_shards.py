"""Controller shards (`controller --shards 2`) on real servers: two controller processes share
the shards, the owner of one is killed (SIGKILL: its leases are never released), the other
takes its shard over within the lease's TTL, and nothing is placed or enqueued twice.

One controller runs in the test's process, the other as a real `cim-place controller`
subprocess on its own connection, so the kill is a real crash.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from nats.aio.msg import Msg

from cim_place.cluster.agent.config import AgentConfig, VolumeConfig
from cim_place.cluster.agent.service import Agent
from cim_place.cluster.controller.service import Controller, ControllerConfig
from cim_place.cluster.exchange.fetch import wait_for_holder
from cim_place.cluster.exchange.upload_client import upload
from cim_place.cluster.nats.connection import connected, jetstream
from cim_place.cluster.nats.envelope import decode
from cim_place.cluster.nats.subjects import Subjects
from cim_place.cluster.state.cid_shards import shard_key, shard_of, shard_owner
from cim_place.cluster.state.lease import LeaderRecord, read_leader
from cim_place.cluster.state.locations import LocationStore
from cim_place.cluster.state.policies import PolicyStore
from cim_place.cluster.tasks.model import decode_task
from cim_place.local.servers import NatsServer
from cim_place.local.topologies import Hub
from cim_place.objectstore import cid as cids
from cim_place.objectstore.cid import Cid
from cim_place.objectstore.testdata import chacha_stream
from cim_place.objectstore.unixfs import DEFAULT_PROFILE, get_profile, import_file
from cim_place.policies.validate import load_text
from cim_place.testing import LeafFactory, until

pytestmark = pytest.mark.timeout(300)

SHARDS = 2
LEASE = 3.0
SIZE = 100_000
POLICY = """
name: two-zones
replicas: 2
spread: {domain: zone, max_per_domain: 1}
repair: {grace: 60s}
"""
# No agent fails here: nodes turn late or down only after long silences, so that a loaded
# machine's late heartbeat never looks like a failure (whose repair copy would later be dropped
# as surplus, which this test counts as a copy placed twice).
CONFIG = """
lease: 3s
late_after: 10s
down_after: 20s
full_pass: 2s
"""


def data_in_shard(shard: int, prefix: str) -> tuple[str, bytes, Cid]:
    """A seed whose content's CID falls in ``shard`` (computed before any upload)."""
    for k in range(200):
        seed = f"{prefix}-{k}"
        data = chacha_stream(seed, SIZE).read()
        root = import_file(io.BytesIO(data), None, get_profile(DEFAULT_PROFILE)).root
        if shard_of(root, SHARDS) == shard:
            return seed, data, root
    raise AssertionError(f"no seed of {prefix} lands in shard {shard}")


@dataclass
class Domain:
    hub: Hub
    agents: dict[str, Agent]
    local: Controller
    remote: subprocess.Popen[bytes]
    tasks: list[tuple[str, str, str, str]] = field(default_factory=list)
    """(task id, kind, node, root) of every task published on the task subjects."""

    def holders(self, cid: Cid) -> set[str]:
        return {node for node, agent in self.agents.items() if agent.pinned_on(cid) is not None}


def start_remote(hub: Hub, config: Path, log: Path) -> subprocess.Popen[bytes]:
    command = [sys.executable, "-m", "cim_place.cli", "controller", "--config", str(config)]
    command += ["--server", hub.url, "--identity", "ctl-remote", "--shards", str(SHARDS)]
    with log.open("wb") as out:
        return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)


@pytest.fixture
def remote_log(tmp_path: Path) -> Iterator[Path]:
    log = tmp_path / "ctl-remote.log"
    yield log
    if log.exists():  # shown when the test fails
        print(log.read_text(errors="replace")[-4000:])


@pytest.fixture
async def domain(
    hub1: Hub, leaf_factory: LeafFactory, tmp_path: Path, remote_log: Path
) -> AsyncIterator[Domain]:
    async with connected(hub1.url) as nc:
        store = await PolicyStore.open(jetstream(nc, "hub"), create=True)
        await store.apply(load_text(POLICY, "test.yaml"), actor="test")
    leaves: dict[str, NatsServer] = {f"n{i}": leaf_factory(f"n{i}") for i in range(1, 4)}
    local = Controller(
        ControllerConfig(
            servers=(hub1.url,),
            identity="ctl-local",
            lease=LEASE,
            late_after=10.0,
            down_after=20.0,
            full_pass_every=2.0,
            summary_every=0.5,
            shards=SHARDS,
        )
    )
    await local.start()  # first, as `cim-place up` does: it creates the streams agents use
    agents = {
        name: Agent(
            AgentConfig(
                node=name,
                volumes=(VolumeConfig("v0", tmp_path / name / "v0"),),
                servers=(leaf.url,),
                labels={"region": "eu", "zone": f"z{i}", "host": name},
                heartbeat=0.5,
                inventory=3600,
            ),
            fsync="none",
        )
        for i, (name, leaf) in enumerate(leaves.items(), start=1)
    }
    for agent in agents.values():
        await agent.start()
    config = tmp_path / "controller.yaml"
    config.write_text(CONFIG)
    remote = start_remote(hub1, config, remote_log)
    state = Domain(hub1, agents, local, remote)

    async def on_task(msg: Msg) -> None:
        task = decode_task(decode(msg.data))
        state.tasks.append((task.id, task.kind, task.node, task.root.hex()))

    async with connected(hub1.url) as watcher:
        await watcher.subscribe(Subjects().all_tasks, cb=on_task)
        try:
            yield state
        finally:
            if remote.poll() is None:
                remote.send_signal(signal.SIGTERM)
                try:
                    remote.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    remote.kill()
                    remote.wait()
            await local.stop()
            await asyncio.gather(*(agent.stop(grace=1) for agent in agents.values()))


async def leaders(hub: Hub) -> list[LeaderRecord | None]:
    async with connected(hub.url) as nc:
        js = jetstream(nc, "hub")
        return [await read_leader(js, shard_key(i, SHARDS)) for i in range(SHARDS)]


async def wait_until(check: object, what: str, timeout: float = 90.0) -> None:
    """Await an async predicate until it holds (a hang guard, not a speed requirement)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await check():  # type: ignore[operator]
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.1)


async def add(domain: Domain, node: str, seed: str, data: bytes) -> Cid:
    async with connected(domain.hub.url) as nc:
        assert await wait_for_holder(nc, node, timeout=10)
        result = await upload(nc, node, io.BytesIO(data), name=seed, owner="alice", size=len(data))
    return result.cid


async def cli(hub: Hub, *args: str) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "cim_place.cli",
        *args,
        "--server",
        hub.url,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await process.communicate()
    return process.returncode or 0, out.decode()


async def placed(hub: Hub, cid: Cid, copies: int) -> bool:
    async with connected(hub.url) as nc:
        status = await (await LocationStore(jetstream(nc, "hub")).open(create=False)).get(cid)
    return status is not None and status.state == "placed" and status.pinned == copies


async def test_killing_a_shard_owner_hands_its_shard_over_and_nothing_is_placed_twice(
    domain: Domain,
) -> None:
    # Both processes up: each leads one shard (a starting process waits for its peers).
    async def split() -> bool:
        assert domain.remote.poll() is None, "the controller subprocess exited"
        held = await leaders(domain.hub)
        ids = {record.leader_id for record in held if record is not None}
        return None not in held and ids == {"ctl-local", "ctl-remote"}

    await wait_until(split, "each controller to lead one shard")
    before = await leaders(domain.hub)
    victim = next(i for i, r in enumerate(before) if r is not None and r.leader_id == "ctl-remote")
    term = before[victim].term  # type: ignore[union-attr]

    # Objects in both shards are placed, each by its own shard's leader.
    first = [data_in_shard(shard, f"before-{shard}") for shard in range(SHARDS)]
    roots = [await add(domain, "n1", seed, data) for seed, data, _ in first]
    assert roots == [root for _, _, root in first]
    for root in roots:
        await wait_until(lambda root=root: placed(domain.hub, root, 2), "placed before the kill")

    # `status CID` names the shard and the process leading it.
    async with connected(domain.hub.url) as nc:
        owner = await shard_owner(jetstream(nc, "hub"), roots[victim])
    assert owner is not None and owner.index == victim and owner.shards == SHARDS
    assert owner.leader is not None and owner.leader.leader_id == "ctl-remote"
    code, out = await cli(domain.hub, "status", cids.to_str(roots[victim]), "--json")
    assert code == 0, out
    assert json.loads(out)["shard"]["index"] == victim
    assert json.loads(out)["shard"]["leader"] == "ctl-remote"
    code, out = await cli(domain.hub, "status", cids.to_str(roots[victim]))
    assert code == 0 and f"controller shard: {victim} of {SHARDS}" in out, out
    assert "led by ctl-remote" in out

    # A listing gathers one page per shard's leader and merges them in CID order.
    code, out = await cli(domain.hub, "status", "--state", "placed", "--limit", "1", "--json")
    assert code == 0, out
    page = json.loads(out)
    assert page["source"] == "index" and "note" not in page
    assert [row["cid"] for row in page["objects"]] == [min(cids.to_str(r) for r in roots)]
    assert page["next"] is not None
    code, out = await cli(domain.hub, "status", "--state", "placed", "--all", "--json")
    assert code == 0, out
    listed = sorted(row["cid"] for row in json.loads(out)["objects"])
    assert listed == sorted(cids.to_str(r) for r in roots)

    # Kill the owner of the victim shard: a crash, its leases are never released.
    os.kill(domain.remote.pid, signal.SIGKILL)
    domain.remote.wait(timeout=30)

    async def taken_over() -> bool:
        record = (await leaders(domain.hub))[victim]
        return record is not None and record.leader_id == "ctl-local" and record.term > term

    await wait_until(taken_over, "the surviving controller to take the killed one's shard")
    await until(lambda: domain.local.sharding is not None and victim in domain.local.sharding.led)

    # New objects of that shard are placed by the survivor; the others' copies stay as they are.
    seed, data, expected = data_in_shard(victim, "after")
    root = await add(domain, "n2", seed, data)
    assert root == expected
    await wait_until(lambda: placed(domain.hub, root, 2), "placed after the takeover")
    everything = [*roots, root]
    for cid in everything:
        await until(lambda cid=cid: len(domain.holders(cid)) == 2, "two holders", timeout=60)

    # Give a late duplicate time to show up (a full pass is 2 s): nothing may change.
    await asyncio.sleep(2 * LEASE)
    for cid in everything:
        assert len(domain.holders(cid)) == 2, f"{cid.hex()} holds more copies than desired"
        assert await placed(domain.hub, cid, 2)
    replicas: dict[tuple[str, str, str], set[str]] = {}
    for task_id, kind, node, cid_hex in domain.tasks:
        replicas.setdefault((kind, node, cid_hex), set()).add(task_id)
    twice = {key: ids for key, ids in replicas.items() if len(ids) > 1}
    assert twice == {}, f"tasks enqueued twice for the same replica: {twice}"
    assert not [key for key in replicas if key[0] == "drop"], "a copy was dropped"
    assert {key[2] for key in replicas} >= {cid.hex() for cid in everything}

    # The summary `status` prints sums the shards' summaries.
    async def summed() -> bool:
        code, out = await cli(domain.hub, "status", "--json")
        assert code == 0, out
        doc = json.loads(out)
        return bool(doc["objects"] == len(everything) and doc["by_state"]["placed"] == 3)

    await wait_until(summed, "the shards' summaries to add up")


async def test_a_sharded_controller_leads_nothing_while_an_unsharded_lease_is_held(
    hub1: Hub,
) -> None:
    from cim_place.cluster.controller.shards import ShardLeadership
    from cim_place.cluster.state.leader import LeaderElection

    async with connected(hub1.url) as nc:
        js = jetstream(nc, "hub")
        single = LeaderElection(js, "ctl-single", lease=LEASE)
        await single.start()
        await single.wait_elected(timeout=30)
        events: list[tuple[str, int]] = []
        sharded = ShardLeadership(
            js,
            "ctl-sharded",
            SHARDS,
            lease=LEASE,
            on_elected=lambda i: events.append(("elected", i)),
            on_deposed=lambda i: events.append(("deposed", i)),
        )
        await sharded.start()
        try:
            await until(lambda: bool(sharded.conflict), "the other layout's lease to be seen", 30)
            assert "controller" in sharded.conflict
            await asyncio.sleep(2 * LEASE)  # several rounds: still nothing led
            assert sharded.led == set() and events == []
            await single.stop()  # releases its lease: the sharded process may lead now
            await until(lambda: sharded.led == {0, 1}, "both shards led", 60)
            assert sharded.conflict == ""
        finally:
            await sharded.stop()
            await single.stop()

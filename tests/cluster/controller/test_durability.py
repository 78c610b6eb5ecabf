"""Durability end to end on real servers: a hub, 3 leaves in 3 zones with agents, a controller.

- A block corrupted on one replica and another deleted on a second: ``cim-place scrub`` finds
  both, the status shows the replicas damaged (the object degraded), repairs restore the exact
  block files, and the status returns to ``placed`` with 3 verified copies.
- The same block corrupted on every replica: status ``lost`` (every copy damaged), no repair,
  nothing dropped, and ``cim-place get`` exits 1 with one line naming the object and the nodes.
- Corruption met by a peer's fetch (no scrub) is reported and repaired the same way.
"""

from __future__ import annotations

import asyncio
import io
import json
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from cim_place.cluster.agent.service import Agent
from cim_place.cluster.events.publisher import EventPublisher
from cim_place.cluster.events.types import ObjectRemoved
from cim_place.cluster.exchange.fetch import fetch_dag, wait_for_holder
from cim_place.cluster.exchange.fetch_model import BlockUnavailableError, Holder
from cim_place.cluster.exchange.upload_client import upload
from cim_place.cluster.nats.connection import connected, jetstream
from cim_place.cluster.state.locations import LocationStore
from cim_place.local.topologies import Hub
from cim_place.objectstore import dag
from cim_place.objectstore.blockstore import FsBlockStore
from cim_place.objectstore.cid import RAW, Cid, codec_of, to_str
from cim_place.objectstore.testdata import chacha_stream
from cim_place.placement.status import ObjectStatus
from cim_place.testing import LeafFactory, controlled_domain

pytestmark = pytest.mark.timeout(300)

POLICY = """
name: three-zones
replicas: 3
spread: {domain: zone, max_per_domain: 1}
repair: {grace: 2s}
"""
SIZE = 3 * 1024 * 1024 + 11
CLI = str(Path(sys.executable).parent / "cim-place")


@pytest.fixture
async def domain(
    hub1: Hub, leaf_factory: LeafFactory, tmp_path: Path
) -> AsyncIterator[tuple[Hub, dict[str, Agent]]]:
    async with controlled_domain(hub1, leaf_factory, tmp_path, POLICY) as (_, agents):
        yield hub1, agents


async def status_of(hub: Hub, cid: Cid) -> ObjectStatus | None:
    async with connected(hub.url) as nc:
        store = await LocationStore(jetstream(nc, "hub")).open(create=False)
        return await store.get(cid)


async def wait_for(hub: Hub, cid: Cid, check: object, timeout: float = 120.0) -> ObjectStatus:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    last = None
    while loop.time() < deadline:
        last = await status_of(hub, cid)
        if last is not None and check(last):  # type: ignore[operator]
            return last
        await asyncio.sleep(0.05)
    raise AssertionError(f"status never reached the expected state: {last}")


def placed(status: ObjectStatus) -> bool:
    return status.state == "placed" and status.pinned == 3


async def add(hub: Hub, seed: str) -> tuple[Cid, bytes]:
    data = chacha_stream(seed, SIZE).read()
    async with connected(hub.url) as nc:
        assert await wait_for_holder(nc, "n1", timeout=10)
        result = await upload(nc, "n1", io.BytesIO(data), size=SIZE)
    return result.cid, data


def leaves(agent: Agent, root: Cid) -> list[Cid]:
    blocks = agent.volumes["v0"].blocks
    return [c for c in dag.walk_cids(blocks, root) if codec_of(c) == RAW]


def corrupt(agent: Agent, block: Cid) -> None:
    path = agent.volumes["v0"].blocks.block_path(block)
    data = bytearray(path.read_bytes())
    data[7] ^= 0x40
    path.write_bytes(bytes(data))


async def cli(*args: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        CLI, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await process.communicate()
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_scrub_finds_damage_and_repair_restores_placed(
    domain: tuple[Hub, dict[str, Agent]],
) -> None:
    hub, agents = domain
    root, data = await add(hub, "durability-repair")
    before = await wait_for(hub, root, placed)
    verified = {loc.node: loc.verified_at or 0.0 for loc in before.locations}
    bad, gone = leaves(agents["n2"], root)[:2]
    blocks2, blocks3 = agents["n2"].volumes["v0"].blocks, agents["n3"].volumes["v0"].blocks
    good = {bad: blocks2.block_path(bad).read_bytes(), gone: blocks3.block_path(gone).read_bytes()}
    corrupt(agents["n2"], bad)
    blocks3.block_path(gone).unlink()

    code, out, err = await cli("scrub", "--json", "--server", hub.url)
    assert code == 0, err
    report = json.loads(out)["nodes"]
    assert set(report) == {"n1", "n2", "n3"}
    assert report["n1"]["damaged"] == []
    assert report["n2"]["damaged"] == [
        {"root": to_str(root), "block": to_str(bad), "problem": "corrupt"}
    ]
    assert report["n3"]["damaged"] == [
        {"root": to_str(root), "block": to_str(gone), "problem": "missing"}
    ]
    assert report["n1"]["blocks_checked"] == 5 and report["n1"]["bytes_checked"] > SIZE
    assert report["n3"]["blocks_checked"] == 4  # the deleted one is not read

    # The controller counts them as damaged at once (and repairs them at once: a poll may miss
    # the damaged state, but not the repaired copies verified again since).
    def damaged_or_repaired(status: ObjectStatus) -> bool:
        again = {
            loc.node for loc in status.locations if (loc.verified_at or 0) > verified[loc.node]
        }
        return status.damaged > 0 or status.state == "degraded" or {"n2", "n3"} <= again

    seen = await wait_for(hub, root, damaged_or_repaired)
    assert seen.state in ("degraded", "placed")
    final = await wait_for(hub, root, placed)
    assert all(loc.verified_at for loc in final.locations)
    assert blocks2.block_path(bad).read_bytes() == good[bad]
    assert blocks3.block_path(gone).read_bytes() == good[gone]
    for agent in agents.values():
        assert b"".join(agent.volumes["v0"].cat(root)) == data


async def test_every_copy_damaged_is_lost_and_get_says_so(
    domain: tuple[Hub, dict[str, Agent]], tmp_path: Path
) -> None:
    hub, agents = domain
    root, _ = await add(hub, "durability-lost")
    await wait_for(hub, root, placed)
    block = leaves(agents["n1"], root)[1]
    for agent in agents.values():
        corrupt(agent, block)
    code, out, err = await cli("scrub", "--server", hub.url)
    assert code == 0, err
    assert out.count("1 damaged") == 3
    lost = await wait_for(hub, root, lambda s: s.state == "lost")
    assert {loc.state for loc in lost.locations} <= {"damaged", "repairing"}
    assert "every remaining copy is damaged" in lost.conditions[-1].message
    # Nothing dropped: every replica is still pinned where it was.
    assert all(agent.pinned_on(root) is not None for agent in agents.values())

    target = tmp_path / "out.bin"
    code, out, err = await cli("get", to_str(root), "-o", str(target), "--server", hub.url)
    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert to_str(root) in lines[0] and "corrupt or missing on every node tried" in lines[0]
    assert all(node in lines[0] for node in ("n1", "n2", "n3"))
    assert "status lost" in lines[0]
    assert not target.exists() and not list(tmp_path.glob("out.bin*"))


async def test_corruption_met_by_a_peer_fetch_is_repaired(
    domain: tuple[Hub, dict[str, Agent]], tmp_path: Path
) -> None:
    hub, agents = domain
    root, data = await add(hub, "durability-serve")
    await wait_for(hub, root, placed)
    block = leaves(agents["n3"], root)[0]
    original = agents["n3"].volumes["v0"].blocks.block_path(block).read_bytes()
    corrupt(agents["n3"], block)
    async with connected(hub.url) as nc:
        with (
            FsBlockStore(tmp_path / "peer", fsync="none") as store,
            pytest.raises(BlockUnavailableError),
        ):
            await fetch_dag(nc, root, [Holder("n3")], store, stream=False)
    await wait_for(hub, root, lambda s: s.damaged > 0 or s.state == "degraded")
    await wait_for(hub, root, placed)
    for _ in range(100):
        path = agents["n3"].volumes["v0"].blocks.block_path(block)
        if path.exists() and path.read_bytes() == original:
            break
        await asyncio.sleep(0.1)
    assert b"".join(agents["n3"].volumes["v0"].cat(root)) == data


async def test_inventory_drift_is_reconciled_not_only_noticed(
    domain: tuple[Hub, dict[str, Agent]],
) -> None:
    hub, agents = domain
    root, data = await add(hub, "durability-drift")
    await wait_for(hub, root, placed)
    # A pin lost without its event (a restored disk, a hand-made unpin): n2 no longer holds it,
    # and it holds another root nobody was told about.
    store2 = agents["n2"].volumes["v0"]
    assert store2.pins.remove(root)
    unknown = store2.add(io.BytesIO(b"held but never announced"))
    await agents["n2"].publish_inventory()
    # The controller asks n2, which announces the truth: the missing copy is fetched again...
    await wait_for(hub, root, placed)
    for _ in range(300):
        if agents["n2"].pinned_on(root) is not None:
            break
        await asyncio.sleep(0.1)
    assert b"".join(agents["n2"].volumes["v0"].cat(root)) == data
    # ...and the unannounced root is known now.
    found = await wait_for(
        hub, unknown.root, lambda s: any(loc.node == "n2" for loc in s.locations)
    )
    assert found.state in ("progressing", "placed", "degraded")


async def test_scrub_of_a_node_without_an_agent_exits_1(hub1: Hub) -> None:
    code, _out, err = await cli("scrub", "--node", "nobody", "--server", hub1.url)
    assert code == 1
    assert err.strip().splitlines() == [
        "error: nobody: no agent of node nobody answers (is it running?)"
    ]


@pytest.mark.parametrize("digest", [True, False], ids=["next-digest", "fetch-answered"])
async def test_a_forged_removal_is_corrected_while_the_node_holds_the_content(
    domain: tuple[Hub, dict[str, Agent]], digest: bool
) -> None:
    """An ObjectRemoved for a copy n2 still holds (forged with n2's name, or stale) is believed
    for a moment. n2's next inventory digest disagrees with the view, so n2 is asked and
    announces the copy again; without a digest (agents here send one an hour), the fetch the
    controller sends n2 to replace the copy finds it pinned and n2 announces it then (it used
    to complete without an announcement, and the controller to ask again and again). Either
    way the object is placed with n2's copy, which is never fetched again."""
    hub, agents = domain
    root, data = await add(hub, "durability-forged-removal")
    await wait_for(hub, root, placed)
    n2 = agents["n2"]
    pin = n2.volumes["v0"].pins.get(root)
    assert pin is not None
    fetched_before = n2.metrics.bytes_fetched._value.get()
    async with connected(n2.config.servers[0]) as nc:
        publisher = EventPublisher(nc.jetstream(), "n2")
        await publisher.publish_event(
            ObjectRemoved(root=root, size=pin.size, blocks=pin.blocks, volume="v0", owner="")
        )
    if digest:
        await n2.publish_inventory()
    final = await wait_for(
        hub,
        root,
        lambda s: (
            placed(s) and any(loc.node == "n2" and loc.state == "pinned" for loc in s.locations)
        ),
    )
    assert {loc.node for loc in final.locations} == {"n1", "n2", "n3"}
    assert n2.volumes["v0"].pins.get(root) is not None
    assert b"".join(n2.volumes["v0"].cat(root)) == data
    assert n2.metrics.bytes_fetched._value.get() == fetched_before  # nothing moved again

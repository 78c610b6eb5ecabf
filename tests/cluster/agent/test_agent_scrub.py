"""Scrub, damage reports and repair by the agents, on real servers (a 1-server hub, two leaves).

A block corrupted on node-a and another deleted on node-b are found by a scrub requested over
NATS, announced as ReplicaDamaged, and repaired by repair tasks that fetch only those blocks
from the other node: the block files are byte-identical afterwards. A peer's fetch that meets
the corrupt block (no scrub) also gets the replica reported.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
from dataclasses import replace
from pathlib import Path

import pytest

from cim_place.cluster.agent.service import Agent
from cim_place.cluster.events.readers import EventReader
from cim_place.cluster.events.store import ensure_event_store
from cim_place.cluster.events.types import ReplicaDamaged, TaskCompleted, parse_event
from cim_place.cluster.exchange.fetch import wait_for_holder
from cim_place.cluster.exchange.upload_client import upload
from cim_place.cluster.nats.connection import connected, jetstream
from cim_place.cluster.nats.subjects import Subjects
from cim_place.cluster.tasks.model import Task
from cim_place.cluster.tasks.queue import TaskQueue, ensure_task_stream
from cim_place.local.topologies import Hub
from cim_place.objectstore import dag
from cim_place.objectstore.cid import RAW, codec_of, to_str
from cim_place.objectstore.testdata import chacha_stream
from cim_place.testing import NO_SCHEDULED_SCRUB, LeafFactory, agent_config

SIZE = 4 * 1024 * 1024 + 7


async def until(check: object, timeout: float = 30.0) -> None:
    for _ in range(int(timeout * 10)):
        if check():  # type: ignore[operator]
            return
        await asyncio.sleep(0.1)
    raise AssertionError("condition not met in time")


async def damaged_events(js_hub: object, want: int) -> list[ReplicaDamaged]:
    reader = EventReader(js_hub, filter_subject=Subjects().events_of_type("ReplicaDamaged"))
    seen: list[ReplicaDamaged] = []
    try:
        for _ in range(60):
            for envelope in await reader.fetch(timeout=0.5):
                event = parse_event(envelope)
                assert isinstance(event, ReplicaDamaged)
                seen.append(event)
            if len(seen) >= want:
                break
    finally:
        await reader.close()
    return seen


async def test_scrub_finds_damage_and_repair_restores_exact_bytes(
    agents: tuple[Hub, Agent, Agent],
) -> None:
    hub, agent_a, agent_b = agents
    data = chacha_stream("scrub-e2e", SIZE).read()
    async with connected(hub.url) as nc:
        js_hub = jetstream(nc, "hub")
        assert await wait_for_holder(nc, "node-a", timeout=10)
        root = (await upload(nc, "node-a", io.BytesIO(data), size=SIZE)).cid
        queue = TaskQueue(js_hub)
        await queue.enqueue(Task.create("fetch", "node-b", root, generation=1, holders=["node-a"]))
        await until(lambda: agent_b.pinned_on(root) is not None)

        store_a, store_b = agent_a.volumes["v0"], agent_b.volumes["v0"]
        leaves = [c for c in dag.walk_cids(store_a.blocks, root) if codec_of(c) == RAW]
        bad, gone = leaves[1], leaves[2]
        originals = {c: store_a.blocks.block_path(c).read_bytes() for c in (bad, gone)}
        path = store_a.blocks.block_path(bad)
        damaged = bytearray(originals[bad])
        damaged[100] ^= 0x01
        path.write_bytes(bytes(damaged))
        os.unlink(store_b.blocks.block_path(gone))

        answers = {}
        for node in ("node-a", "node-b"):
            reply = await nc.request(Subjects().agent_scrub(node), b"", timeout=30)
            answers[node] = json.loads(reply.data)
        assert answers["node-a"]["damaged"] == [
            {"root": to_str(root), "block": to_str(bad), "problem": "corrupt"}
        ]
        assert answers["node-b"]["damaged"] == [
            {"root": to_str(root), "block": to_str(gone), "problem": "missing"}
        ]
        assert answers["node-a"]["blocks_checked"] >= len(leaves)

        events = await damaged_events(js_hub, 2)
        assert {(e.node, e.problem, e.blocks, e.found_by) for e in events} == {
            ("node-a", "corrupt", (bad,), "scrub"),
            ("node-b", "missing", (gone,), "scrub"),
        }

        await queue.enqueue(Task.create("repair", "node-a", root, generation=2, holders=["node-b"]))
        await queue.enqueue(Task.create("repair", "node-b", root, generation=2, holders=["node-a"]))

        def repaired() -> bool:
            try:  # the damaged file is set aside and rewritten while the repair runs
                return (
                    store_a.blocks.block_path(bad).read_bytes() == originals[bad]
                    and store_b.blocks.block_path(gone).exists()
                )
            except FileNotFoundError:
                return False

        await until(repaired)
        assert store_b.blocks.block_path(gone).read_bytes() == originals[gone]
        for store in (store_a, store_b):
            assert b"".join(store.cat(root)) == data
        await until(
            lambda: (
                agent_a.scrub is not None
                and agent_b.scrub is not None
                and agent_a.scrub.scrubbers["v0"].state.damaged() == {}
                and agent_b.scrub.scrubbers["v0"].state.damaged() == {}
            )
        )
        reader = EventReader(js_hub, filter_subject=Subjects().events_of_type("TaskCompleted"))
        done: list[TaskCompleted] = []
        for _ in range(40):
            done += [parse_event(e) for e in await reader.fetch(timeout=0.5)]  # type: ignore[misc]
            if sum(1 for e in done if e.action == "repair") >= 2:
                break
        await reader.close()
        repairs = [e for e in done if e.action == "repair"]
        assert {e.node for e in repairs} == {"node-a", "node-b"}
        assert all(e.result["blocks_repaired"] == 1 for e in repairs)


async def test_a_peer_fetch_meeting_a_corrupt_block_reports_the_replica(
    agents: tuple[Hub, Agent, Agent],
) -> None:
    hub, agent_a, agent_b = agents
    data = chacha_stream("serve-damage", SIZE).read()
    async with connected(hub.url) as nc:
        js_hub = jetstream(nc, "hub")
        assert await wait_for_holder(nc, "node-a", timeout=10)
        root = (await upload(nc, "node-a", io.BytesIO(data), size=SIZE)).cid
        store_a = agent_a.volumes["v0"]
        leaves = [c for c in dag.walk_cids(store_a.blocks, root) if codec_of(c) == RAW]
        path = store_a.blocks.block_path(leaves[0])
        path.write_bytes(b"x" + path.read_bytes()[1:])

        queue = TaskQueue(js_hub)
        await queue.enqueue(Task.create("fetch", "node-b", root, generation=1, holders=["node-a"]))
        events = await damaged_events(js_hub, 1)
        assert [(e.node, e.root, e.blocks, e.problem, e.found_by) for e in events] == [
            ("node-a", root, (leaves[0],), "corrupt", "serve")
        ]
        assert agent_b.pinned_on(root) is None  # no good copy anywhere: nothing pinned


def test_scrub_settings_are_read_from_the_agent_file(tmp_path: Path) -> None:
    from cim_place.cluster.agent.config import AgentConfigError, load_agent_config

    good = tmp_path / "agent.yaml"
    good.write_text(
        "node: n1\nvolumes: [{name: v0, path: %s}]\nscrub: {rate: 10MiB/s, interval: 12h}\n"
        % (tmp_path / "v0")
    )
    loaded = load_agent_config(good)
    assert (loaded.scrub_rate, loaded.scrub_interval) == (10 * 1024 * 1024, 12 * 3600.0)
    bad = tmp_path / "bad.yaml"
    bad.write_text("node: n1\nvolumes: [{name: v0, path: /tmp/v0}]\nscrub: {rate: fast}\n")
    with pytest.raises(AgentConfigError, match=r"scrub\.rate"):
        load_agent_config(bad)


async def test_the_background_scrub_reports_damage_without_being_asked(
    hub1: Hub, leaf_factory: LeafFactory, tmp_path: Path
) -> None:
    leaf = leaf_factory("node-s")
    async with connected(hub1.url) as nc:
        js_hub = jetstream(nc, "hub")
        await ensure_event_store(js_hub, replicas=1)
        await ensure_task_stream(js_hub, 1)
    base = agent_config("node-s", leaf.url, tmp_path, "z1", scrub_interval=NO_SCHEDULED_SCRUB)
    # A pass every 2 s, so the second one runs while the test waits.
    agent = Agent(replace(base, scrub_interval=2.0), fsync="none")
    await agent.start()
    try:
        store = agent.volumes["v0"]
        root = store.add(io.BytesIO(chacha_stream("background", SIZE).read())).root
        block = [c for c in dag.walk_cids(store.blocks, root) if codec_of(c) == RAW][-1]
        store.blocks.block_path(block).unlink()
        async with connected(hub1.url) as nc:
            events = await damaged_events(jetstream(nc, "hub"), 1)
        assert [(e.root, e.blocks, e.problem, e.found_by) for e in events[:1]] == [
            (root, (block,), "missing", "scrub")
        ]
        assert agent.scrub is not None
        assert agent.scrub.scrubbers["v0"].last_full_pass() is not None
        metrics = agent.metrics.registry
        assert metrics.get_sample_value("cim_place_damaged_blocks_total", {"problem": "missing"})
        # The pass counts its blocks once it ends, which may be just after the event left.
        for _ in range(200):
            if metrics.get_sample_value("cim_place_scrub_blocks_total", {"volume": "v0"}):
                break
            await asyncio.sleep(0.05)
        assert metrics.get_sample_value("cim_place_scrub_blocks_total", {"volume": "v0"})
    finally:
        await agent.stop(grace=1)

"""`cim-place status --state/--node/--policy/--name/--after/--limit` through a real controller:
the listing comes from its status index over `<prefix>.api.status`, pages visit every object
once, and bad filters are usage errors naming the flag.

Objects are announced with ObjectStored events from two leaves and node heartbeats are written
to the bucket, so no agent is needed: the controller reconciles them as it would any object.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from cim_place.cluster.controller.service import Controller, ControllerConfig
from cim_place.cluster.events.publisher import EventPublisher
from cim_place.cluster.events.sources import attach_leaf
from cim_place.cluster.events.store import ensure_outbox
from cim_place.cluster.events.types import ObjectStored
from cim_place.cluster.nats.connection import connected, jetstream
from cim_place.cluster.state.nodes import NodeRecord, VolumeStatus, nodes_bucket
from cim_place.cluster.state.policies import PolicyStore
from cim_place.local.topologies import Hub
from cim_place.objectstore.cid import RAW, make_cid, to_str
from cim_place.policies.validate import load_text
from cim_place.testing import LeafFactory, until

pytestmark = pytest.mark.timeout(300)

CLI = [sys.executable, "-m", "cim_place.cli"]
POLICIES = """
name: docs
match: {name: 'docs/*'}
replicas: 1
---
name: rest
replicas: 1
"""
OBJECTS = 23


def cim(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args], cwd=cwd, capture_output=True, text=True, timeout=120, check=False
    )


def listed(*args: str, server: str, cwd: Path) -> dict[str, Any]:
    done = cim("status", *args, "--json", "--server", server, cwd=cwd)
    assert done.returncode == 0, done.stderr
    doc: dict[str, Any] = json.loads(done.stdout)
    assert doc["source"] == "index"
    return doc


def object_name(i: int) -> str:
    return f"docs/{i:02d}" if i % 2 == 0 else f"misc/{i:02d}"


async def heartbeats(hub: Hub) -> None:
    """Both nodes beat every second, as their agents would: the objects' states stay put."""
    async with connected(hub.url) as nc:
        bucket = await nodes_bucket(jetstream(nc, "hub"))
        started = time.time()
        while True:
            for zone, node in enumerate(("n1", "n2")):
                record = NodeRecord(
                    node=node,
                    labels={"zone": f"z{zone}"},
                    volumes=(VolumeStatus("v0", 1 << 30, 0, 1 << 30),),
                    version="test",
                    started_at=started,
                    heartbeat_at=time.time(),
                )
                await bucket.put(node, record.encode())
            await asyncio.sleep(1.0)


async def announce(hub: Hub, leaf_factory: LeafFactory) -> dict[str, str]:
    """ObjectStored for OBJECTS objects: even ones on n1, odd ones on n2."""
    placed: dict[str, str] = {}
    for node in ("n1", "n2"):
        leaf = leaf_factory(node)
        async with connected(leaf.url) as leaf_nc:
            js_leaf = jetstream(leaf_nc)
            await ensure_outbox(js_leaf, node)
            await attach_leaf(jetstream(leaf_nc, "hub"), node)
            publisher = EventPublisher(js_leaf, node)
            for i in range(OBJECTS):
                if (i % 2 == 0) != (node == "n1"):
                    continue
                root = make_cid(RAW, f"listed object {i}".encode())
                await publisher.publish_event(
                    ObjectStored(
                        root=root,
                        size=10 + i,
                        blocks=1,
                        volume="v0",
                        owner="t",
                        name=object_name(i),
                    )
                )
                placed[to_str(root)] = node
    return placed


@pytest.fixture
async def indexed(
    hub1: Hub, leaf_factory: LeafFactory
) -> AsyncIterator[tuple[Hub, Controller, dict[str, str]]]:
    async with connected(hub1.url) as nc:
        store = await PolicyStore.open(jetstream(nc, "hub"), create=True)
        await store.apply(load_text(POLICIES, "test.yaml"), actor="test")
    controller = Controller(
        ControllerConfig(servers=(hub1.url,), identity="ctl-list", lease=3.0, full_pass_every=2.0)
    )
    beating = asyncio.create_task(heartbeats(hub1))
    await controller.start()
    try:
        placed = await announce(hub1, leaf_factory)
        await until(
            lambda: controller.is_leader and len(controller.status_index) == OBJECTS,
            "the controller indexed every object",
        )
        yield hub1, controller, placed
    finally:
        beating.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await beating
        await controller.stop()


async def test_listing_filters_and_pages_through_the_controller(
    indexed: tuple[Hub, Controller, dict[str, str]], tmp_path: Path
) -> None:
    hub, _controller, placed = indexed
    url = hub.url

    def run(*args: str) -> dict[str, Any]:
        return listed(*args, server=url, cwd=tmp_path)

    everything = await asyncio.to_thread(run, "--limit", "1000")
    rows = {row["cid"]: row for row in everything["objects"]}
    assert sorted(rows) == sorted(placed) and everything["next"] is None
    assert [row["cid"] for row in everything["objects"]] == sorted(placed)
    assert everything["indexed"] == everything["tracked"] == OBJECTS

    # Pages of 4, each after the last CID of the previous one: every object exactly once.
    seen: list[str] = []
    after: list[str] = []
    while True:
        page = await asyncio.to_thread(run, "--limit", "4", *after)
        assert len(page["objects"]) <= 4
        seen.extend(row["cid"] for row in page["objects"])
        if page["next"] is None:
            break
        assert page["next"] == page["objects"][-1]["cid"]
        after = ["--after", page["next"]]
    assert seen == sorted(placed)
    every = await asyncio.to_thread(run, "--all", "--limit", "5")
    assert [row["cid"] for row in every["objects"]] == sorted(placed)

    docs = await asyncio.to_thread(run, "--policy", "docs")
    expected_docs = sorted(c for c, row in rows.items() if row["name"].startswith("docs/"))
    assert [row["cid"] for row in docs["objects"]] == expected_docs
    assert {row["policy"] for row in everything["objects"]} == {"docs", "rest"}
    by_name = await asyncio.to_thread(run, "--name", "docs/*")
    assert [row["cid"] for row in by_name["objects"]] == expected_docs
    one = await asyncio.to_thread(run, "--name", "misc/0[3-5]")
    assert {row["name"] for row in one["objects"]} == {"misc/03", "misc/05"}

    on_n2 = await asyncio.to_thread(run, "--node", "n2", "--limit", "1000")
    assert {row["cid"] for row in on_n2["objects"]} >= {c for c, n in placed.items() if n == "n2"}
    assert all("n2" in row["nodes"] for row in on_n2["objects"])
    for state in {row["state"] for row in rows.values()}:
        now = await asyncio.to_thread(run, "--limit", "1000")
        in_state = await asyncio.to_thread(run, "--state", state, "--limit", "1000")
        assert {row["cid"] for row in in_state["objects"]} == {
            row["cid"] for row in now["objects"] if row["state"] == state
        }
    combined = await asyncio.to_thread(run, "--policy", "rest", "--name", "docs/*")
    assert combined["objects"] == []

    quiet = await asyncio.to_thread(
        cim, "status", "--policy", "docs", "-q", "--server", url, cwd=tmp_path
    )
    assert quiet.returncode == 0 and quiet.stdout.split() == expected_docs
    text = await asyncio.to_thread(
        cim, "status", "--name", "docs/*", "--limit", "3", "--server", url, cwd=tmp_path
    )
    assert text.returncode == 0 and "3 object(s)" in text.stdout and "--after" in text.stdout


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (("--state", "sideways"), "--state"),
        (("--filter", "sideways"), "sideways"),
        (("--limit", "0"), "--limit"),
        (("--limit", "1001"), "--limit"),
        (("--limit", "many"), "--limit"),
        (("--node", "no.such/node"), "--node"),
        (("--name", "x" * 2000), "--name"),
        (("--after", "y" * 300), "--after"),
        (
            ("bafkreifzjut3te2nhyekklss27nh3k72ysco7y32koao5eei66wof36n5e", "--state", "lost"),
            "not both",
        ),
    ],
)
def test_bad_filters_are_usage_errors_naming_the_flag(
    flags: tuple[str, ...], named: str, tmp_path: Path
) -> None:
    # Checked before connecting: the server named here does not exist.
    done = cim("status", *flags, "--server", "nats://127.0.0.1:9", cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert named in done.stderr and "Traceback" not in done.stderr
    assert done.stdout == ""

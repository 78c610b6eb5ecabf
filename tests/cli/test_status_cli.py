"""`cim-place status`, `nodes` and `tasks` as an operator runs them, against a real hub.

The state they read (locations, heartbeats, tasks, TaskFailed events) is written here with the
library the controller and agents use, so these tests need neither.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from cim_place.cli.context import DomainContext, NodeEntry, write_context
from cim_place.cluster.events.publisher import EventPublisher
from cim_place.cluster.events.sources import attach_leaf
from cim_place.cluster.events.store import ensure_event_store, ensure_outbox
from cim_place.cluster.events.types import TaskFailed
from cim_place.cluster.nats.connection import connected, jetstream
from cim_place.cluster.state.locations import LocationStore
from cim_place.cluster.state.names import NameRegistry
from cim_place.cluster.state.nodes import NodeRecord, VolumeStatus, nodes_bucket
from cim_place.cluster.tasks.model import Task
from cim_place.cluster.tasks.queue import TaskQueue, ensure_task_stream
from cim_place.local.server_spec import free_port
from cim_place.local.topologies import Hub
from cim_place.objectstore import cid as cids
from cim_place.placement.status import Condition, Location, ObjectStatus, Summary
from cim_place.testing import LeafFactory

CLI = [sys.executable, "-m", "cim_place.cli"]
PLACED = "bafkreifzjut3te2nhyekklss27nh3k72ysco7y32koao5eei66wof36n5e"
DEGRADED = "bafkreigh2akiscaildcqabsyg3dfr6chu3fgpregiymsck7e7aqa4s52zy"
UNKNOWN = "bafkreie5cvv4h45feadgeuwhbcutmh6t2ceseocckahdoe6uat64zmz454"


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("CIM_PLACE_SERVER", "CIM_PLACE_DIR")}
    env.update(extra)
    return env


def run(
    *args: str, cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args],
        cwd=cwd,
        env=env or clean_env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def ok(*args: str, cwd: Path) -> str:
    done = run(*args, cwd=cwd)
    assert done.returncode == 0, f"cim-place {' '.join(args)}: {done.stderr}"
    return done.stdout


async def eventually(check: Callable[[], Awaitable[bool]], tries: int = 200) -> None:
    for _ in range(tries):
        if await check():
            return
        await asyncio.sleep(0.05)
    raise AssertionError("condition not met")


def placed() -> ObjectStatus:
    return ObjectStatus(
        cid=PLACED,
        state="placed",
        locations=(
            Location("n1", "v0", "zone-1"),
            Location("n2", "v0", "zone-2"),
            Location("n3", "v0", "zone-3", "fetching"),
        ),
        desired=3,
        policy="default",
        name="reports/q3",
        size=4096,
        conditions=(Condition("Placed", True, "Enough", "3 of 3 copies", 1.0e9),),
        updated_at=1.0e9,
    )


def degraded() -> ObjectStatus:
    return ObjectStatus(
        cid=DEGRADED,
        state="degraded",
        locations=(Location("n1", "v0", "zone-1"),),
        desired=3,
        policy="default",
        size=10,
    )


@pytest.fixture
def domain_state(hub1: Hub) -> Hub:
    """A hub holding two object statuses, a summary, a name and two node heartbeats."""

    async def write() -> None:
        async with connected(hub1.url) as nc:
            js = jetstream(nc, "hub")
            store = await LocationStore(js).open()
            await store.put(placed())
            await store.put(degraded())
            await store.put_summary(
                Summary(
                    objects=2,
                    by_state={"placed": 1, "degraded": 1},
                    under_replicated=1,
                    total_bytes=4106,
                    nodes_up=2,
                    updated_at=time.time(),
                )
            )
            await NameRegistry(js).set("reports/q3", PLACED)
            nodes = await nodes_bucket(js)
            now = time.time()
            for node, zone, beat in (("n1", "zone-1", now), ("n2", "zone-2", now - 20)):
                record = NodeRecord(
                    node=node,
                    labels={"zone": zone, "host": node},
                    volumes=(VolumeStatus("v0", 1000, 250, 750),),
                    version="test",
                    started_at=now - 60,
                    heartbeat_at=beat,
                )
                await nodes.put(node, record.encode())

    asyncio.run(write())
    return hub1


def test_status_of_an_object_by_cid_and_by_name(domain_state: Hub, tmp_path: Path) -> None:
    url = domain_state.url
    doc = json.loads(ok("status", PLACED, "--json", "--server", url, cwd=tmp_path))
    assert doc == placed().to_dict()
    assert doc["state"] == "placed"
    assert {"node": "n1", "volume": "v0", "zone": "zone-1", "state": "pinned"} in doc["locations"]

    by_name = json.loads(ok("status", "reports/q3", "--json", "--server", url, cwd=tmp_path))
    assert by_name["cid"] == PLACED

    text = ok("status", PLACED, "--server", url, cwd=tmp_path)
    assert "placed" in text and "zone-3" in text and "fetching" in text and "Enough" in text
    assert ok("status", "reports/q3", "-q", "--server", url, cwd=tmp_path).strip() == "placed"


def test_unknown_cid_or_name_says_so(domain_state: Hub, tmp_path: Path) -> None:
    done = run("status", UNKNOWN, "--server", domain_state.url, cwd=tmp_path)
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1 and UNKNOWN in done.stderr and "unknown" in done.stderr

    done = run("status", "no/such/name", "--server", domain_state.url, cwd=tmp_path)
    assert done.returncode == 1
    assert "no/such/name" in done.stderr and done.stderr.count("\n") == 1


def test_summary_and_filter(domain_state: Hub, tmp_path: Path) -> None:
    url = domain_state.url
    summary = json.loads(ok("status", "--json", "--server", url, cwd=tmp_path))
    assert summary["objects"] == 2
    assert summary["by_state"] == {
        "placed": 1,
        "progressing": 0,
        "degraded": 1,
        "lost": 0,
        "removed": 0,
        "expired": 0,
    }
    assert summary["under_replicated"] == 1 and summary["bytes"] == 4106
    assert summary["nodes"]["up"] == 1 and summary["nodes"]["late"] == 1
    assert "under-replicated: 1" in ok("status", "--server", url, cwd=tmp_path)

    # No controller runs here: the listing is read by a scan of the locations, said on stderr.
    done = run("status", "--filter", "degraded", "--json", "--server", url, cwd=tmp_path)
    assert done.returncode == 0 and "scan" in done.stderr
    listed = json.loads(done.stdout)
    assert [s["cid"] for s in listed["objects"]] == [DEGRADED] and listed["source"] == "scan"
    named = json.loads(ok("status", "--name", "reports/*", "--json", "--server", url, cwd=tmp_path))
    assert [s["cid"] for s in named["objects"]] == [PLACED]
    assert named["objects"][0]["nodes"] == ["n1", "n2", "n3"]
    quiet = ok("status", "--filter", "placed", "-q", "--server", url, cwd=tmp_path)
    assert quiet.split() == [PLACED]

    bad = run("status", "--filter", "sideways", "--server", url, cwd=tmp_path)
    assert bad.returncode == 2 and "sideways" in bad.stderr


def test_nodes_lists_labels_volumes_and_state(domain_state: Hub, tmp_path: Path) -> None:
    nodes = json.loads(ok("nodes", "--json", "--server", domain_state.url, cwd=tmp_path))
    assert [n["node"] for n in nodes] == ["n1", "n2"]
    n1, n2 = nodes
    assert n1["labels"] == {"zone": "zone-1", "host": "n1"}
    assert n1["volumes"] == [{"name": "v0", "capacity": 1000, "used": 250, "free": 750}]
    assert (n1["used"], n1["free"]) == (250, 750)
    assert n1["state"] == "up" and n2["state"] == "late"
    text = ok("nodes", "--server", domain_state.url, cwd=tmp_path)
    assert "zone=zone-2" in text and "late" in text


def test_watch_refreshes_until_interrupted(domain_state: Hub, tmp_path: Path) -> None:
    process = subprocess.Popen(
        [*CLI, "status", PLACED, "--watch", "--json", "--server", domain_state.url],
        cwd=tmp_path,
        env=clean_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        seen = 0
        while seen < 2:
            line = process.stdout.readline()
            assert line, process.stderr.read() if process.stderr else ""
            seen += line.startswith("{")
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_tasks_shows_queued_and_failed_with_reasons(
    hub1: Hub, leaf_factory: LeafFactory, tmp_path: Path
) -> None:
    leaf = leaf_factory("tasks-leaf")
    root = cids.parse(PLACED)

    async def prepare() -> None:
        async with connected(hub1.url) as hub_nc, connected(leaf.url) as leaf_nc:
            js_hub = jetstream(hub_nc, "hub")
            await ensure_task_stream(js_hub, 1)
            await ensure_event_store(js_hub, replicas=1)
            queue = TaskQueue(js_hub)
            # The same task twice is one task (deterministic ids).
            for node in ("n1", "n1", "n2"):
                await queue.enqueue(Task.create("fetch", node, root, generation=1))
            js_leaf = jetstream(leaf_nc)
            await ensure_outbox(js_leaf, leaf.name)
            await attach_leaf(jetstream(leaf_nc, "hub"), leaf.name)
            publisher = EventPublisher(js_leaf, leaf.name)
            await publisher.publish_event(
                TaskFailed(
                    task_id="t1",
                    action="fetch",
                    node=leaf.name,
                    root=root,
                    volume="v0",
                    attempts=5,
                    reason="no holder of the object answers",
                )
            )

            async def arrived() -> bool:
                info = await js_hub.stream_info("CIM_PLACE_EVENTS")
                return int(info.state.messages) >= 1

            await eventually(arrived)

    asyncio.run(prepare())
    doc: dict[str, Any] = json.loads(ok("tasks", "--json", "--server", hub1.url, cwd=tmp_path))
    assert doc["nodes"] == {"n1": {"queued": 1, "running": 0}, "n2": {"queued": 1, "running": 0}}
    assert (doc["queued"], doc["running"]) == (2, 0)
    assert [f["reason"] for f in doc["failed"]] == ["no holder of the object answers"]
    assert doc["failed"][0]["node"] == leaf.name and doc["failed"][0]["root"] == PLACED
    text = ok("tasks", "--server", hub1.url, cwd=tmp_path)
    assert "no holder of the object answers" in text and "n2" in text


def test_no_domain_is_one_line_naming_the_url(tmp_path: Path) -> None:
    url = f"nats://127.0.0.1:{free_port()}"
    for command in (["status"], ["status", PLACED], ["nodes"], ["tasks"]):
        done = run(*command, cwd=tmp_path, env=clean_env(CIM_PLACE_SERVER=url))
        assert done.returncode == 1, command
        assert done.stderr.count("\n") == 1, done.stderr
        assert url in done.stderr and "cim-place up" in done.stderr


def test_a_stale_context_names_its_url(tmp_path: Path) -> None:
    url = f"nats://127.0.0.1:{free_port()}"
    state = tmp_path / ".cim-place"
    state.mkdir()
    write_context(
        state,
        DomainContext(
            hub_url=url,
            nodes=(NodeEntry("leaf-1", url, "zone-1", str(state / "v0")),),
            pid=2**22 + 1,
            started_at=0.0,
        ),
    )
    below = tmp_path / "work"
    below.mkdir()
    done = run("status", cwd=below)
    assert done.returncode == 1 and url in done.stderr and "cim-place up" in done.stderr
    # --server wins over the context file.
    other = f"nats://127.0.0.1:{free_port()}"
    done = run("nodes", "--server", other, cwd=below)
    assert done.returncode == 1 and other in done.stderr and url not in done.stderr

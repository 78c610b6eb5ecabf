"""`cim-place up` / `down` with real processes: start, find without flags, stop, resume."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cim_place.cli.context import pid_alive, read_context
from cim_place.cluster.nats.connection import connected, jetstream
from cim_place.cluster.state.lease import read_leader
from cim_place.cluster.state.nodes import list_nodes
from cim_place.cluster.state.policies import PolicyStore
from cim_place.local.domain import LocalDomain
from cim_place.objectstore import cid as cids
from cim_place.objectstore.store import ObjectStore
from cim_place.objectstore.testdata import chacha_stream

pytestmark = pytest.mark.nats

CLI = [sys.executable, "-m", "cim_place.cli"]


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in ("CIM_PLACE_SERVER", "CIM_PLACE_DIR")}


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args],
        cwd=cwd,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def ok(*args: str, cwd: Path) -> str:
    done = run(*args, cwd=cwd)
    assert done.returncode == 0, f"cim-place {' '.join(args)}: {done.stderr}{done.stdout}"
    return done.stdout


def our_servers(directory: Path) -> list[int]:
    """PIDs of nats-server processes whose config lives under ``directory``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            comm = (entry / "comm").read_text().strip()
            cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if comm == "nats-server" and str(directory) in cmdline:
            found.append(int(entry.name))
    return found


def wait_gone(pids: list[int]) -> None:
    for _ in range(400):
        if not any(pid_alive(pid) for pid in pids):
            return
        time.sleep(0.05)
    raise AssertionError(f"processes {pids} still run")


def eventually_placed(cid: str, cwd: Path, tries: int = 600) -> dict[str, Any]:
    """``status CID --json`` once the object is placed with every replica pinned."""
    doc: dict[str, Any] = {}
    for _ in range(tries):
        done = run("status", cid, "--json", cwd=cwd)
        if done.returncode == 0:
            doc = json.loads(done.stdout)
            pinned = [loc for loc in doc["locations"] if loc["state"] == "pinned"]
            if doc["state"] == "placed" and len(pinned) == doc["desired"]:
                return doc
        time.sleep(0.1)
    raise AssertionError(f"{cid} not placed: {doc}")


@pytest.fixture
def workdir(tmp_path: Path) -> Iterator[Path]:
    """A working directory whose domain (if any) is stopped at teardown, whatever happened."""
    yield tmp_path
    context = read_context(tmp_path / ".cim-place")
    if context is not None and pid_alive(context.pid):
        os.kill(context.pid, signal.SIGTERM)
        wait_gone([context.pid])
    leftovers = our_servers(tmp_path)
    for pid in leftovers:
        os.kill(pid, signal.SIGKILL)
    assert not leftovers, f"nats-server processes left behind: {leftovers}"


def test_up_status_down_and_resume(workdir: Path) -> None:
    state = workdir / ".cim-place"
    out = ok("up", "--leaves", "3", "--detach", "--dir", str(state), cwd=workdir)
    assert "leaf-3" in out and "zone-3" in out
    first = read_context(state)
    assert first is not None and pid_alive(first.pid)
    assert len(our_servers(workdir)) == 4
    # The domain's S3 operator key (docs/S3.md).
    assert first.s3 is not None and set(first.s3) == {"access_key", "secret_key", "region"}
    assert all(n.s3.startswith("http://127.0.0.1:") for n in first.nodes)  # each node's S3

    # Later commands here find the domain through the context file: no flags.
    nodes = json.loads(ok("nodes", "--json", cwd=workdir))
    assert [n["node"] for n in nodes] == ["leaf-1", "leaf-2", "leaf-3"]
    assert {n["labels"]["zone"] for n in nodes} == {"zone-1", "zone-2", "zone-3"}
    assert all(n["state"] == "up" and n["volumes"][0]["name"] == "v0" for n in nodes)
    summary = json.loads(ok("status", "--json", cwd=workdir))
    assert summary["nodes"]["up"] == 3
    ok("status", cwd=workdir)
    ok("tasks", cwd=workdir)
    # The default policy was applied.
    assert "default" in ok("policy", "ls", cwd=workdir)

    # Starting twice in one directory is refused.
    again = run("up", "--detach", "--dir", str(state), cwd=workdir)
    assert again.returncode == 1 and "already running" in again.stderr

    sample = workdir / "sample.bin"
    sample.write_bytes(chacha_stream("cim-place up", 1_500_000).read())
    leaf_1 = first.leaf_url("leaf-1")
    assert leaf_1 is not None
    cid = ok("add", "--server", leaf_1, str(sample), "--name", "sample", cwd=workdir).strip()
    # --node alone goes through the domain of the context file.
    other = workdir / "other.bin"
    other.write_bytes(b"stored on leaf-2")
    other_cid = ok("add", str(other), "--node", "leaf-2", cwd=workdir).strip()
    # Every node serves a gateway; context.json names it. leaf-3 holds neither object yet
    # (unless the controller was quick): it fetches through the domain.
    gateways = {entry.node: entry.http for entry in first.nodes}
    assert all(url.startswith("http://127.0.0.1:") for url in gateways.values())
    with urllib.request.urlopen(f"{gateways['leaf-3']}/ipfs/{other_cid}", timeout=60) as resp:
        assert resp.read() == b"stored on leaf-2"
    # The dashboard: named in the summary and in context.json, served by every gateway.
    doc = json.loads((state / "context.json").read_text())
    assert doc["dashboard"].startswith(f"{gateways['leaf-1']}/ui/?token=")
    assert f"dashboard: {doc['dashboard']}" in out
    token = doc["dashboard"].split("?token=")[1]
    assert [n["dashboard"] for n in doc["nodes"]] == [
        f"{url}/ui/?token={token}" for url in gateways.values()
    ]
    # The domain has users: the operator's token opens the API, nothing else does.
    with pytest.raises(urllib.error.HTTPError, match="401"):
        urllib.request.urlopen(f"{gateways['leaf-2']}/ui/api/nodes", timeout=30)
    asked = urllib.request.Request(
        f"{gateways['leaf-2']}/ui/api/nodes", headers={"Authorization": f"Bearer {token}"}
    )
    with urllib.request.urlopen(asked, timeout=30) as resp:
        assert len(json.loads(resp.read())) == 3

    assert "stopped" in ok("down", "--dir", str(state), cwd=workdir)
    wait_gone([first.pid])
    assert not our_servers(workdir)
    assert read_context(state) is None
    for node, root in (("leaf-1", cid), ("leaf-2", other_cid)):
        store = ObjectStore(state / "nodes" / node / "v0")
        try:
            assert store.pins.get(cids.parse(root)) is not None
        finally:
            store.close()

    # Resume over the same directory while another process holds the hub's old client port.
    hub_port = int(first.hub_url.rsplit(":", 1)[1])
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", hub_port))
        squatter.listen()
        out = ok("up", "--leaves", "3", "--detach", "--dir", str(state), cwd=workdir)
        assert f"hub client port {hub_port} is in use" in out
    second = read_context(state)
    assert second is not None and second.hub_url != first.hub_url
    assert second.leaf_url("leaf-2") == first.leaf_url("leaf-2")  # the free ones are reused
    copy = subprocess.run(
        [*CLI, "get", cid], cwd=workdir, env=clean_env(), capture_output=True, timeout=120
    )
    assert copy.returncode == 0, copy.stderr
    assert copy.stdout == sample.read_bytes()
    # The controller keeps it on 3 leaves in 3 zones (the default policy `up` applied).
    placed = eventually_placed(cid, workdir)
    assert {(loc["node"], loc["zone"]) for loc in placed["locations"]} == {
        ("leaf-1", "zone-1"),
        ("leaf-2", "zone-2"),
        ("leaf-3", "zone-3"),
    }
    ok("down", "--dir", str(state), cwd=workdir)
    wait_gone([second.pid])
    assert not our_servers(workdir)


def test_up_with_a_three_server_hub(workdir: Path) -> None:
    """`up --hub-servers 3`: a clustered hub, its members listed in context.json, and the CLI
    given every member (its credentials file names all three); `down` stops them all."""
    state = workdir / ".cim-place"
    ok("up", "--leaves", "2", "--hub-servers", "3", "--detach", "--dir", str(state), cwd=workdir)
    context = read_context(state)
    assert context is not None
    hubs = [p for p in context.processes if p.role == "hub"]
    assert [p.node for p in hubs] == ["hub-1", "hub-2", "hub-3"]
    assert all(p.pid is not None and pid_alive(p.pid) for p in hubs)
    assert len(our_servers(workdir)) == 5
    assert context.client_url().count(",") == 2
    summary = json.loads(ok("status", "--json", cwd=workdir))
    assert summary["nodes"]["up"] == 2
    ok("down", "--dir", str(state), cwd=workdir)
    wait_gone([context.pid, *(p.pid for p in hubs if p.pid is not None)])
    assert not our_servers(workdir)


def test_foreground_up_stops_on_ctrl_c(workdir: Path) -> None:
    state = workdir / ".cim-place"
    process = subprocess.Popen(
        [*CLI, "up", "--leaves", "1", "--zones", "1"],
        cwd=workdir,
        env=clean_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        lines: list[str] = []
        while not any(line.startswith("ready") for line in lines):
            line = process.stdout.readline()
            assert line, f"up exited: {process.stderr.read() if process.stderr else ''}"
            lines.append(line)
        assert read_context(state) is not None
        assert len(our_servers(workdir)) == 2
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=60) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert read_context(state) is None
    assert not our_servers(workdir)


def test_asked_for_port_in_use_is_named(workdir: Path) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        done = run("up", "--port", str(port), "--detach", cwd=workdir)
    assert done.returncode == 1
    assert f"port {port}" in done.stderr and "in use" in done.stderr
    assert not our_servers(workdir)


def test_down_without_a_domain_says_so(workdir: Path) -> None:
    done = run("down", cwd=workdir)
    assert done.returncode == 1
    assert "no domain is running" in done.stderr and done.stderr.count("\n") == 1


async def test_library_runs_every_part_as_a_supervised_process(workdir: Path) -> None:
    domain = LocalDomain(workdir / "domain", leaves=2, zones=2, heartbeat=1.0, controllers=2)
    await domain.start()
    try:
        assert [n.zone for n in domain.nodes] == ["zone-1", "zone-2"]
        roles = [(p["role"], p["node"]) for p in domain.processes()]
        assert roles == [
            ("hub", None),
            ("leaf-server", "leaf-1"),
            ("leaf-server", "leaf-2"),
            ("agent", "leaf-1"),
            ("agent", "leaf-2"),
            ("controller", None),
            ("controller", None),
        ]
        pids = [p["pid"] for p in domain.processes()]
        assert all(isinstance(pid, int) and pid_alive(pid) for pid in pids)
        assert domain.http_url("leaf-1").startswith("http://127.0.0.1:")
        # The domain admits only its users: the CLI's own.
        async with connected(domain.credentials.url("admin", domain.hub_url)) as nc:
            js = jetstream(nc, "hub")
            assert [r.node for r in await list_nodes(js)] == ["leaf-1", "leaf-2"]
            applied = await (await PolicyStore.open(js, create=False)).load()
            assert [p.name for p in applied.policy_set.policies] == ["default"]
            leader = await read_leader(js)
            assert leader is not None and leader.leader_id.startswith("cim-place-up")

            # kill -9 of an agent: the supervisor starts it again and it heartbeats again.
            changed: list[int] = []
            domain.on_change = lambda: changed.append(1)
            agent_pid = pids[3]
            assert isinstance(agent_pid, int)
            killed_at = time.time()
            os.kill(agent_pid, signal.SIGKILL)
            for _ in range(600):
                fresh = [r for r in await list_nodes(js) if r.node == "leaf-1"]
                if changed and fresh and fresh[0].started_at > killed_at:
                    break
                await asyncio.sleep(0.05)
            else:
                raise AssertionError("the killed agent did not come back")
            again = domain.processes()[3]
            assert again["role"] == "agent" and again["pid"] != agent_pid
    finally:
        await domain.stop()
    assert not our_servers(workdir)
    assert not any(pid_alive(pid) for pid in pids if isinstance(pid, int))


def test_ctrl_c_while_starting_stops_what_started(workdir: Path) -> None:
    process = subprocess.Popen(
        [*CLI, "up", "--leaves", "2"],
        cwd=workdir,
        env=clean_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stderr is not None
        while "leaf server" not in (line := process.stderr.readline()):
            assert line, "up exited before starting its leaves"
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 1 and "interrupted while starting" in err
    assert read_context(workdir / ".cim-place") is None
    assert not our_servers(workdir)

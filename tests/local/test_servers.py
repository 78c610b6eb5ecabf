"""Real nats-server topologies: single server, 3-server hub, leaves with their own domains."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import textwrap
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import TypeVar

import pytest
from nats.errors import ConnectionReconnectingError, NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.api import StreamConfig
from nats.js.errors import NoStreamResponseError, ServiceUnavailableError

from cim_place.cluster.nats.connection import connected, jetstream
from cim_place.errors import TransportError
from cim_place.local import server_spec
from cim_place.local.link_proxy import LinkProxy
from cim_place.local.server_spec import ServerSpec, free_port, port_free
from cim_place.local.servers import NatsServer
from cim_place.local.topologies import Hub, add_leaf, start_hub, start_single
from cim_place.testing import LeafFactory, nats_server_children

pytestmark = pytest.mark.nats

T = TypeVar("T")

# Errors a client sees while a domain is unreachable across a (cut or reconnecting) leaf link.
_UNREACHABLE = (
    ConnectionReconnectingError,
    NoRespondersError,
    NoStreamResponseError,
    ServiceUnavailableError,
    NatsTimeoutError,
    asyncio.TimeoutError,
)


async def eventually(action: Callable[[], Awaitable[T]], attempts: int = 300) -> T:
    """Retry ``action`` until it stops failing with an unreachable-domain error."""
    for _ in range(attempts - 1):
        try:
            return await action()
        except _UNREACHABLE:
            await asyncio.sleep(0.1)
    return await action()


def test_spec_renders_every_section(tmp_path: Path) -> None:
    spec = ServerSpec(
        server_name="n1",
        store_dir=tmp_path / "js",
        port=14222,
        http_port=18222,
        domain="hub",
        cluster_name="cim-hub",
        cluster_port=16222,
        routes=["nats-route://127.0.0.1:16223"],
        leafnode_port=17422,
        max_payload=1 << 20,
    )
    text = spec.render()
    assert 'server_name: "n1"' in text
    assert 'domain: "hub"' in text
    assert 'routes: ["nats-route://127.0.0.1:16223"]' in text
    assert 'listen: "127.0.0.1:17422"' in text
    assert "max_payload: 1048576" in text


def test_leaf_spec_renders_remotes_and_a_subsecond_reconnect(tmp_path: Path) -> None:
    spec = ServerSpec(
        server_name="leaf1",
        store_dir=tmp_path / "js",
        domain="leaf1",
        leaf_remotes=["nats-leaf://127.0.0.1:17422", "nats-leaf://127.0.0.1:17423"],
        leaf_reconnect=0.25,
    )
    text = spec.render()
    assert (
        'remotes: [ { urls: ["nats-leaf://127.0.0.1:17422", "nats-leaf://127.0.0.1:17423"] } ]'
        in (text)
    )
    assert 'reconnect: "250ms"' in text
    assert "ignore_discovered_servers" not in text
    spec.leaf_ignore_discovered = True
    assert "ignore_discovered_servers: true" in spec.render()
    assert "cluster" not in text


def test_free_port_never_returns_the_default_nats_port() -> None:
    assert all(free_port() != 4222 for _ in range(50))


def test_free_ports_are_chosen_below_the_ephemeral_range(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A port chosen now and bound later by another process: never one a socket bound to port
    0 (an outgoing connection) can take in between, when the kernel says which those are."""
    ranges = tmp_path / "ip_local_port_range"
    ranges.write_text("32768\t60999\n")
    monkeypatch.setattr(server_spec, "_EPHEMERAL", ranges)
    ports = [free_port() for _ in range(50)]
    assert all(10_000 <= port < 32768 and port not in (4222, 6222, 7422, 8222) for port in ports)
    assert len(set(ports)) > 40  # at random, not in one order every run
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", ports[0]))  # free indeed
    ranges.write_text("1024\t65535\n")  # no room below: what the kernel gives
    assert 1 <= free_port() < 65536
    monkeypatch.setattr(server_spec, "_EPHEMERAL", tmp_path / "absent")
    assert 1 <= free_port() < 65536


def test_a_listening_port_is_not_free_and_a_closed_one_is() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(1)
        port = sock.getsockname()[1]
        assert not port_free(port) and not port_free(port, reuse=False)
    assert port_free(port)


async def test_single_server_pubsub_and_kv(nats_server: NatsServer) -> None:
    assert nats_server.port != 4222
    async with connected(nats_server.url) as nc:
        sub = await nc.subscribe("greet.*")
        await nc.publish("greet.joe", b"hello")
        msg = await sub.next_msg(timeout=5)
        assert msg.data == b"hello"

        kv = await jetstream(nc).create_key_value(bucket="single")
        await kv.put("k", b"v1")
        entry = await kv.get("k")
        assert entry.value == b"v1"


async def test_single_server_restart_keeps_the_store(nats_server: NatsServer) -> None:
    async with connected(nats_server.url) as nc:
        kv = await jetstream(nc).create_key_value(bucket="kept")
        await kv.put("k", b"before")
    nats_server.restart()
    async with connected(nats_server.url) as nc:
        kv = await jetstream(nc).key_value("kept")
        assert (await kv.get("k")).value == b"before"


async def test_hub_of_three_replicates_a_stream(hub_cluster: Hub) -> None:
    assert len(hub_cluster.servers) == 3
    assert len(hub_cluster.leaf_urls) == 3
    async with connected(hub_cluster.urls) as nc:
        js = jetstream(nc, "hub")
        await js.add_stream(StreamConfig(name="R3", subjects=["r3.>"], num_replicas=3))
        # A new stream's subject interest reaches the other members a moment after creation.
        for i in range(5):
            ack = await eventually(partial(js.publish, "r3.item", f"m{i}".encode()))
            assert ack.stream == "R3"
            assert ack.domain == "hub"
        info = await js.stream_info("R3")
        assert info.state.messages == 5
        assert info.cluster is not None
        assert len(info.cluster.replicas or []) == 2
        msg = await js.get_msg("R3", seq=3)
        assert msg.data == b"m2"


async def test_hub_of_three_keeps_quorum_with_one_member_down(hub: Hub) -> None:
    async with connected(hub.urls, name="quorum-test") as nc:
        js = jetstream(nc, "hub")
        await js.add_stream(StreamConfig(name="Q", subjects=["q.>"], num_replicas=3))
        await eventually(lambda: js.publish("q.one", b"1"))
        down = hub.servers[2]
        await asyncio.to_thread(down.stop)
        # Two of three replicas still form a quorum; a client on a stopped member fails over.
        ack = await eventually(lambda: js.publish("q.two", b"2"))
        assert ack.seq == 2
        await asyncio.to_thread(down.restart)
        await asyncio.to_thread(hub.wait_ready)
        info = await eventually(lambda: js.stream_info("Q"))
        assert info.state.messages == 2


async def test_hub_client_reads_and_writes_a_kv_bucket_in_a_leaf_domain(
    hub_cluster: Hub, leaf_factory: LeafFactory
) -> None:
    leaf = leaf_factory("leaf1", hub=hub_cluster)
    assert leaf.domain == "leaf1"
    async with connected(hub_cluster.urls) as nc:
        js = jetstream(nc, "leaf1")
        kv = await eventually(lambda: js.create_key_value(bucket="leafkv"))
        revision = await kv.put("volume", b"v-1")
        assert (await kv.get("volume")).value == b"v-1"
        again = await js.key_value("leafkv")
        await again.update("volume", b"v-2", last=revision)
        assert (await again.get("volume")).value == b"v-2"
    # The bucket lives in the leaf's own domain, not in the hub's.
    async with connected(leaf.url) as nc:
        local = await jetstream(nc).key_value("leafkv")
        assert (await local.get("volume")).value == b"v-2"
        info = await jetstream(nc).account_info()
        assert info.domain == "leaf1"


@pytest.mark.parametrize("hub_fixture", ["hub1", "hub_cluster"])
async def test_cut_leaf_keeps_its_domain_and_rejoins_after_restore(
    hub_fixture: str, request: pytest.FixtureRequest, leaf_factory: LeafFactory
) -> None:
    hub1: Hub = request.getfixturevalue(hub_fixture)
    # With three members the hub advertises the other two; the leaf must still use the proxy.
    leaf = leaf_factory("leaf2", hub=hub1, via_proxy=True)
    assert leaf.link is not None
    async with connected(leaf.url) as local_nc, connected(hub1.urls) as hub_nc:
        local = jetstream(local_nc)
        await local.add_stream(StreamConfig(name="OUTBOX_leaf2", subjects=["evt.leaf2.>"]))
        remote = jetstream(hub_nc, "leaf2")
        assert (await eventually(lambda: remote.stream_info("OUTBOX_leaf2"))).state.messages == 0

        leaf.link.cut()
        await asyncio.to_thread(_wait_for, lambda: leaf.leafnode_count() == 0)
        for i in range(3):
            ack = await local.publish("evt.leaf2.stored", f"e{i}".encode())
            assert ack.domain == "leaf2"
        with pytest.raises(_UNREACHABLE):
            await remote.stream_info("OUTBOX_leaf2")

        leaf.link.restore()
        await asyncio.to_thread(leaf.wait_leaf_connected)
        info = await eventually(lambda: remote.stream_info("OUTBOX_leaf2"))
        assert info.state.messages == 3
        ack = await eventually(lambda: remote.publish("evt.leaf2.stored", b"from-hub"))
        assert ack.stream == "OUTBOX_leaf2"
        assert ack.seq == 4


def _wait_for(predicate: Callable[[], bool], attempts: int = 600) -> None:
    import time

    for _ in range(attempts):
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError("condition not reached")


def test_link_proxy_cut_refuses_and_restore_relays(tmp_path: Path) -> None:
    hub = start_hub(tmp_path / "hub", size=1)
    try:
        leaf = add_leaf(hub, tmp_path / "leaf", "leaf3", via_proxy=True)
        link = leaf.link
        assert isinstance(link, LinkProxy)
        assert hub.servers[0].leafnode_count() == 1
        link.cut()
        _wait_for(lambda: hub.servers[0].leafnode_count() == 0)
        assert link.connection_count == 0
        link.restore()
        leaf.wait_leaf_connected()
        _wait_for(lambda: hub.servers[0].leafnode_count() == 1)
        leaf.stop()
        assert not leaf.is_running()
    finally:
        hub.stop()


def test_a_taken_port_fails_with_the_log_tail(tmp_path: Path) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen(1)
        spec = ServerSpec(
            server_name="squeezed", store_dir=tmp_path / "js", port=squatter.getsockname()[1]
        )
        server = NatsServer(spec, tmp_path)
        with pytest.raises(TransportError, match="address already in use"):
            server.start().wait_ready()
        assert not server.is_running()


def test_stopping_leaves_no_process(tmp_path: Path) -> None:
    before = set(nats_server_children())
    with start_hub(tmp_path / "hub", size=3) as hub:
        leaf = add_leaf(hub, tmp_path / "leaf", "leaf4", via_proxy=True)
        pids = {s.pid for s in [*hub.servers, leaf]}
        assert pids <= set(nats_server_children())
        leaf.stop()
    assert set(nats_server_children()) == before
    single = start_single(tmp_path / "single")
    single.stop()
    assert set(nats_server_children()) == before


_KILLED_OWNER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from cim_place.local.topologies import start_single
    server = start_single(Path(sys.argv[1]))
    print(server.pid, flush=True)
    time.sleep(600)
    """
)


def test_a_killed_owner_takes_its_servers_down(tmp_path: Path) -> None:
    owner = subprocess.Popen(
        [sys.executable, "-c", _KILLED_OWNER, str(tmp_path / "single")],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert owner.stdout is not None
        server_pid = int(owner.stdout.readline())
        owner.kill()  # SIGKILL: no atexit, no cleanup code runs in the owner
        owner.wait()
        _wait_for(lambda: not _is_running(server_pid))
    finally:
        if owner.poll() is None:
            owner.kill()
            owner.wait()


def _is_running(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    # A zombie (state Z) has exited; it only waits for a parent to collect it.
    return stat[stat.rfind(")") + 2] != "Z"


_FAILING_TEST = textwrap.dedent(
    """
    def test_fails_with_servers_running(nats_server, hub1, leaf_factory):
        leaf_factory("leafx", via_proxy=True)
        raise AssertionError("deliberate failure")
    """
)


def test_fixture_teardown_stops_servers_when_a_test_fails(tmp_path: Path) -> None:
    (tmp_path / "test_inner.py").write_text(_FAILING_TEST)
    basetemp = tmp_path / "basetemp"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "cim_place.testing",
            "-p",
            "no:cacheprovider",
            "--rootdir",
            str(tmp_path),
            "-c",
            os.devnull,
            "--basetemp",
            str(basetemp),
            str(tmp_path / "test_inner.py"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "1 failed" in result.stdout, result.stdout + result.stderr
    # Any server the inner run leaked would still be running with a config under basetemp.
    assert _servers_with_config_under(basetemp) == []


def _servers_with_config_under(directory: Path) -> list[int]:
    leaked: list[int] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if "nats-server" in cmdline and str(directory) in cmdline:
            leaked.append(int(entry.name))
    return leaked


@pytest.mark.parametrize("size", [1, 3])
def test_hub_members_accept_leaves(tmp_path: Path, size: int) -> None:
    with start_hub(tmp_path / "hub", size=size) as hub:
        assert hub.domain == "hub"
        leaf = add_leaf(hub, tmp_path / "leaf", "leaf5")
        try:
            _wait_for(lambda: sum(s.leafnode_count() for s in hub.servers) == 1)
        finally:
            leaf.stop()

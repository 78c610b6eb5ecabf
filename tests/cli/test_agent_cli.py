"""`cim-place agent`, `add --server` and `get` as an operator runs them, on real servers."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cim_place.local.servers import NatsServer
from cim_place.local.topologies import Hub
from cim_place.objectstore.testdata import chacha_stream
from cim_place.testing import LeafFactory

CLI = [sys.executable, "-m", "cim_place.cli"]


def run(*args: str, check: bool = True) -> subprocess.CompletedProcess[bytes]:
    done = subprocess.run([*CLI, *args], capture_output=True, timeout=120, check=False)
    if check and done.returncode != 0:
        raise AssertionError(f"cim-place {' '.join(args)}: {done.stderr.decode()}")
    return done


@pytest.fixture
def agents(
    hub1: Hub, leaf_factory: LeafFactory, tmp_path: Path
) -> Iterator[tuple[NatsServer, NatsServer]]:
    leaves = (leaf_factory("cli-a"), leaf_factory("cli-b"))
    processes = []
    for leaf, zone in zip(leaves, ("z1", "z2"), strict=True):
        log = (tmp_path / f"{leaf.name}.log").open("wb")
        processes.append(
            subprocess.Popen(
                [
                    *CLI,
                    "agent",
                    "--node",
                    leaf.name,
                    "--server",
                    leaf.url,
                    "--volume",
                    str(tmp_path / leaf.name / "v0") + ":1GiB",
                    "--label",
                    f"zone={zone}",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        )
    try:
        yield leaves
    finally:
        for process in processes:
            process.send_signal(signal.SIGTERM)
        for process in processes:
            try:
                assert process.wait(timeout=30) == 0
            except subprocess.TimeoutExpired:
                process.kill()
                raise


def eventually(args: list[str], tries: int = 100) -> subprocess.CompletedProcess[bytes]:
    """Agents need a moment to start; retry a command until it succeeds."""
    for _ in range(tries):
        done = run(*args, check=False)
        if done.returncode == 0:
            return done
        time.sleep(0.2)
    raise AssertionError(done.stderr.decode())


def test_add_through_an_agent_and_get_from_another_leaf(
    agents: tuple[NatsServer, NatsServer], tmp_path: Path
) -> None:
    leaf_a, leaf_b = agents
    sample = tmp_path / "doc.bin"
    sample.write_bytes(chacha_stream("agent-cli", 2 * 1024 * 1024 + 3).read())
    cid = eventually(["add", "--server", leaf_a.url, str(sample), "--name", "doc"]).stdout
    cid_text = cid.decode().strip()
    assert cid_text == run("cid", str(sample)).stdout.decode().strip()

    run("name", "set", "reports/doc", cid_text, "--server", leaf_a.url)
    out = tmp_path / "copy.bin"
    eventually(["get", "reports/doc", "--server", leaf_b.url, "-o", str(out)])
    assert out.read_bytes() == sample.read_bytes()
    piped = run("get", cid_text, "--server", leaf_b.url)
    assert piped.stdout == sample.read_bytes()


def test_get_of_unknown_content_says_so(agents: tuple[NatsServer, NatsServer]) -> None:
    leaf_a, _ = agents
    done = run("get", "no-such-name", "--server", leaf_a.url, check=False)
    assert done.returncode == 1
    assert b"no-such-name" in done.stderr
    missing = "bafkreifzjut3te2nhyekklss27nh3k72ysco7y32koao5eei66wof36n5e"
    done = run("get", missing, "--server", leaf_a.url, check=False)
    assert done.returncode == 1
    assert missing.encode() in done.stderr


def test_bad_agent_config_is_reported_with_positions(tmp_path: Path) -> None:
    config = tmp_path / "agent.yaml"
    config.write_text("node: a.b\nvolume: []\ntasks: {concurrency: 0}\n")
    done = run("agent", "--config", str(config), check=False)
    assert done.returncode == 1
    err = done.stderr.decode()
    assert f"{config}:1:7" in err and "node id" in err
    assert f"{config}:2:1" in err and "unknown key 'volume'" in err
    assert f"{config}:3:22" in err
    assert "missing `volumes`" in err


def test_agent_without_config_or_flags_explains_what_to_give() -> None:
    done = run("agent", check=False)
    assert done.returncode == 1
    assert b"--config" in done.stderr and b"--node" in done.stderr


def test_no_domain_reachable_names_the_url(tmp_path: Path) -> None:
    sample = tmp_path / "x"
    sample.write_bytes(b"x")
    env_url = "nats://127.0.0.1:1"
    done = subprocess.run(
        [*CLI, "add", "--server", env_url, str(sample)],
        capture_output=True,
        timeout=60,
        check=False,
        env={**os.environ},
    )
    assert done.returncode == 1
    assert env_url.encode() in done.stderr
    assert b"cim-place up" in done.stderr


def test_stream_flags_are_checked_like_the_config_file(tmp_path: Path) -> None:
    volume = str(tmp_path / "v0")
    done = run("agent", "--node", "a", "--volume", volume, "--stream-listen", "nope", check=False)
    assert done.returncode == 1
    assert b"--stream-listen: 'nope' is not host:port" in done.stderr
    done = run(
        "agent", "--node", "a", "--volume", volume, "--stream-listen", "0.0.0.0:4250", check=False
    )
    assert done.returncode == 1
    assert b"add --stream-advertise" in done.stderr


def test_stream_flags_reach_the_agent_config() -> None:
    from cim_place.cli.agent import _Stream

    assert _Stream(None, None).checked() == ("127.0.0.1:0", None)
    assert _Stream("off", None).checked() == (None, None)
    assert _Stream("0.0.0.0:4250", "web1:4250").checked() == ("0.0.0.0:4250", "web1:4250")

"""The supervisor of a local domain's processes: a killed child comes back with a new pid, the
restart is logged with the exit status, context listeners hear of it, back-off grows for a
child that keeps dying, a server killed again while it starts comes back too, a chaos run names
a process left down, and stop leaves nothing running."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from cim_place.local import chaos_checks
from cim_place.local import supervisor as sup
from cim_place.local.chaos_report import Report
from cim_place.local.server_spec import ServerSpec
from cim_place.local.servers import NatsServer
from cim_place.local.supervisor import Command, Supervised, Supervisor, backoff, describe_exit

SLEEPER = [sys.executable, "-c", "import time; time.sleep(120)"]


def _alive(pid: int | None) -> bool:
    if pid is None:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0); its state in /proc says it is gone.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


async def _until(condition: object, what: str, tries: int = 300) -> None:
    for _ in range(tries):
        if callable(condition) and condition():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"never happened: {what}")


def test_backoff_doubles_up_to_its_cap() -> None:
    assert [backoff(n) for n in (1, 2, 3, 4)] == [0.5, 1.0, 2.0, 4.0]
    assert backoff(30) == sup.MAX_DELAY


def test_exit_descriptions() -> None:
    assert describe_exit(3) == "exited with status 3"
    assert describe_exit(-signal.SIGKILL) == "killed by SIGKILL"


async def test_a_killed_child_is_restarted_and_listed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sup, "FIRST_DELAY", 0.05)
    changes: list[list[dict[str, object]]] = []
    supervisor = Supervisor()
    supervisor.on_change = lambda: changes.append(supervisor.processes())
    agent = supervisor.add("agent", "leaf-1", Command(SLEEPER, tmp_path / "agent.log"))
    other = supervisor.add("controller", None, Command(SLEEPER, tmp_path / "controller.log"))
    first, untouched = agent.child.pid, other.child.pid
    assert supervisor.processes() == [
        {"role": "agent", "node": "leaf-1", "pid": first},
        {"role": "controller", "node": None, "pid": untouched},
    ]
    supervisor.start()
    try:
        with caplog.at_level(logging.WARNING, logger="cim_place.local.supervisor"):
            assert first is not None
            os.kill(first, signal.SIGKILL)
            await _until(lambda: agent.restarts == 1 and changes, "the agent restarted")
        second = agent.child.pid
        assert second != first and _alive(second)
        assert other.child.pid == untouched and other.restarts == 0
        assert changes[-1][0] == {"role": "agent", "node": "leaf-1", "pid": second}
        text = caplog.text
        assert "agent leaf-1" in text and "killed by SIGKILL" in text and "restarted agent" in text
    finally:
        await supervisor.stop(timeout=5)
    assert not _alive(agent.child.pid) and not _alive(other.child.pid)


async def test_a_child_that_keeps_dying_backs_off(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sup, "FIRST_DELAY", 0.05)
    supervisor = Supervisor()
    failing = supervisor.add(
        "agent",
        "leaf-2",
        Command([sys.executable, "-c", "raise SystemExit(3)"], tmp_path / "a.log"),
    )
    supervisor.start()
    try:
        await _until(lambda: failing.restarts >= 3, "three restarts", tries=600)
        assert failing.last_exit == 3
        assert failing.failures_in_a_row >= 3  # each wait longer than the one before
    finally:
        await supervisor.stop(timeout=5)


async def test_stop_ends_every_child_in_reverse_order(tmp_path: Path) -> None:
    supervisor = Supervisor()
    children = [
        supervisor.add("leaf-server", f"leaf-{i}", Command(SLEEPER, tmp_path / f"{i}.log"))
        for i in range(3)
    ]
    supervisor.start()
    pids = [c.child.pid for c in children]
    assert all(_alive(pid) for pid in pids)
    await supervisor.stop(timeout=5)
    assert not any(_alive(pid) for pid in pids)


@pytest.mark.nats
async def test_a_server_killed_again_while_it_starts_is_restarted_once_more(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A leaf server killed twice in a row: the second kill lands while the supervisor waits for
    # the restarted process to be ready. That wait cleans the dead process up; the server must
    # still count as exited, or it is never started again.
    monkeypatch.setattr(sup, "FIRST_DELAY", 0.05)
    killed_while_starting: list[int] = []

    def ready_again(supervised: Supervised) -> None:
        server = supervised.child
        assert isinstance(server, NatsServer) and server.pid is not None
        if not killed_while_starting:
            killed_while_starting.append(server.pid)
            os.kill(server.pid, signal.SIGKILL)
            while _alive(killed_while_starting[0]):
                time.sleep(0.01)
        server.wait_ready(30)

    server = NatsServer(ServerSpec(server_name="leaf-1", store_dir=tmp_path / "js"), tmp_path)
    supervisor = Supervisor(after_restart=ready_again)
    entry = supervisor.add("leaf-server", "leaf-1", server)
    supervisor.start()
    try:
        server.wait_ready(30)
        first = server.pid
        assert first is not None
        with caplog.at_level(logging.WARNING, logger="cim_place.local.supervisor"):
            os.kill(first, signal.SIGKILL)
            await _until(lambda: entry.restarts == 2, "a second restart", tries=600)
        assert killed_while_starting and server.pid not in (first, killed_while_starting[0])
        assert server.returncode() is None
        await asyncio.to_thread(server.wait_ready, 30)
        assert "restarted but not ready" in caplog.text
    finally:
        await supervisor.stop(timeout=5)
    assert not server.is_running()


async def test_a_chaos_run_names_a_process_the_supervisor_did_not_bring_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(chaos_checks, "RESTART_BOUND", 0.5)
    supervisor = Supervisor()  # not started: nothing brings the dead one back
    running = supervisor.add("agent", "leaf-1", Command(SLEEPER, tmp_path / "a.log"))
    dead = supervisor.add(
        "leaf-server", "leaf-4", Command([sys.executable, "-c", "pass"], tmp_path / "b.log")
    )
    dead.last_exit = -9
    checks = chaos_checks.RunChecks()
    checks.domain = SimpleNamespace(supervisor=supervisor)  # type: ignore[assignment]
    checks.report = Report(seed=1, faults=[])
    try:
        await _until(lambda: dead.child.returncode() is not None, "the short one ended")
        await checks._check_running()
    finally:
        await supervisor.stop(timeout=5)
    assert checks.report.down == ["leaf-server leaf-4 (last exit -9, 0 restart(s))"]
    assert running.child.pid is not None
    assert any("not running again" in p for p in checks.report.violations())

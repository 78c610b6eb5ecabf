"""Supervising the processes of a local domain: restart what dies, with back-off, and say so.

``cim-place up`` runs every part of a domain as its own OS process (the hub's servers, one
nats-server per leaf, one agent per leaf, the controllers). :class:`Supervisor` watches them: a
process that exits while the domain is not stopping is started again after a back-off (0.5 s,
doubling up to 30 s; a process that stayed up for a minute starts again from 0.5 s), and the
restart is logged with the exit status (``up.log`` under ``up``). :meth:`Supervisor.processes`
lists what runs now, for ``context.json``; ``on_change`` is called after every restart so the
file stays current. :meth:`Supervisor.stop` stops everything in the reverse order of adding,
the children of one role together.

A :class:`Child` is anything that can be started, polled and stopped: a :class:`NatsServer` or a
:class:`Command` (a cim-place process such as ``cim-place agent --config FILE``).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Protocol

from cim_place.local.spawn import spawn
from cim_place.runtime.lifecycle import cancel_and_wait

_log = logging.getLogger(__name__)

FIRST_DELAY = 0.5
MAX_DELAY = 30.0
STABLE_AFTER = 60.0
"""A process that ran this long is healthy again: its next restart waits FIRST_DELAY."""
POLL = 0.2


class Child(Protocol):
    """One supervised process."""

    @property
    def pid(self) -> int | None:
        """The running process's id; None before the first start."""
        ...

    def start(self) -> object:
        """Start the process (it need not be ready when this returns)."""
        ...

    def returncode(self) -> int | None:
        """The exit status once it ended (negative: the signal); None while it runs."""
        ...

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, then SIGKILL after ``timeout``; safe when not running."""
        ...


class Command:
    """A process of ours (an agent, a controller): ``argv``, its output appended to ``log_path``."""

    def __init__(
        self, argv: Sequence[str], log_path: Path, *, env: dict[str, str] | None = None
    ) -> None:
        self.argv = list(argv)
        self.log_path = log_path
        self.env = env
        self._process: subprocess.Popen[bytes] | None = None
        self._log: BinaryIO | None = None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def start(self) -> Command:
        if self._process is not None and self._process.poll() is None:
            return self
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        if self._log is None:
            self._log = self.log_path.open("ab")
        self._process = spawn(self.argv, self._log, env=self.env)
        return self

    def returncode(self) -> int | None:
        return self._process.poll() if self._process is not None else None

    def stop(self, timeout: float = 10.0) -> None:
        process = self._process
        # Only a live leader is signalled: once reaped, its pid (and group id) may be reused.
        if process is not None and process.poll() is None:
            _signal_group(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                _signal_group(process.pid, signal.SIGKILL)
                process.wait()
        if self._log is not None:
            self._log.close()
            self._log = None

    def __repr__(self) -> str:
        return f"Command({' '.join(self.argv)!r}, pid={self.pid})"


def _signal_group(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


@dataclass
class Supervised:
    """One child under supervision, with its restart history."""

    role: str
    """hub, leaf-server, agent or controller."""
    node: str | None
    child: Child
    restarts: int = 0
    started_at: float = field(default_factory=time.monotonic)
    failures_in_a_row: int = 0
    last_exit: int | None = None
    held: bool = False
    """Kept down when it exits (a fault test holding a killed controller out of the election);
    supervision resumes when this turns False again."""

    def entry(self) -> dict[str, object]:
        return {"role": self.role, "node": self.node, "pid": self.child.pid}


def backoff(failures_in_a_row: int) -> float:
    """Seconds to wait before the next start after ``failures_in_a_row`` quick exits (>= 1)."""
    return float(min(MAX_DELAY, FIRST_DELAY * 2 ** max(0, failures_in_a_row - 1)))


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with status {code}"


class Supervisor:
    """Restarts the children it was given when they exit, until :meth:`stop`."""

    def __init__(
        self,
        *,
        on_change: Callable[[], None] | None = None,
        after_restart: Callable[[Supervised], None] | None = None,
    ) -> None:
        self.children: list[Supervised] = []
        self.on_change = on_change
        # Called in a thread after a child was started again (e.g. to wait until it is ready).
        self.after_restart = after_restart
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    def add(self, role: str, node: str | None, child: Child) -> Supervised:
        """Supervise ``child`` (already started by the caller, or started here if not)."""
        if child.pid is None or child.returncode() is not None:
            child.start()
        supervised = Supervised(role, node, child)
        self.children.append(supervised)
        return supervised

    def processes(self) -> list[dict[str, object]]:
        """What runs now: role, node and pid of every child, in start order."""
        return [s.entry() for s in self.children]

    def start(self) -> None:
        if self._task is None:
            self._stopping = False
            self._task = asyncio.create_task(self._watch(), name="cim-place-supervisor")

    async def _watch(self) -> None:
        due: dict[int, float] = {}
        while True:
            now = time.monotonic()
            for index, supervised in enumerate(self.children):
                code = supervised.child.returncode()
                if code is None or self._stopping or supervised.held:
                    continue
                if index not in due:
                    ran = now - supervised.started_at
                    supervised.failures_in_a_row = (
                        1 if ran >= STABLE_AFTER else supervised.failures_in_a_row + 1
                    )
                    supervised.last_exit = code
                    delay = backoff(supervised.failures_in_a_row)
                    due[index] = now + delay
                    _log.warning(
                        "%s%s (pid %s) %s after %.1f s; restarting in %.1f s",
                        supervised.role,
                        f" {supervised.node}" if supervised.node else "",
                        supervised.child.pid,
                        describe_exit(code),
                        ran,
                        delay,
                    )
                elif now >= due[index]:
                    del due[index]
                    await self._restart(supervised)
            await asyncio.sleep(POLL)

    async def _restart(self, supervised: Supervised) -> None:
        try:
            await asyncio.to_thread(supervised.child.start)
        except Exception as exc:
            _log.error("could not restart %s %s: %s", supervised.role, supervised.node, exc)
            return
        supervised.restarts += 1
        supervised.started_at = time.monotonic()
        _log.warning(
            "restarted %s%s: pid %s (restart %d)",
            supervised.role,
            f" {supervised.node}" if supervised.node else "",
            supervised.child.pid,
            supervised.restarts,
        )
        if self.after_restart is not None:
            try:
                await asyncio.to_thread(self.after_restart, supervised)
            except Exception as exc:
                _log.warning(
                    "%s %s restarted but not ready: %s", supervised.role, supervised.node, exc
                )
        if self.on_change is not None:
            self.on_change()

    async def stop(self, timeout: float = 10.0) -> None:
        """Stop watching, then stop every child in the reverse order of adding."""
        self._stopping = True
        if self._task is not None:
            await cancel_and_wait([self._task])
            self._task = None
        # Children of one role stop together (an agent may take up to its task pull's 2 s to
        # end): the order between roles holds (controllers, agents, leaf servers, the hub).
        for _, layer in itertools.groupby(reversed(self.children), key=lambda s: s.role):
            await asyncio.gather(
                *(asyncio.to_thread(supervised.child.stop, timeout) for supervised in layer)
            )

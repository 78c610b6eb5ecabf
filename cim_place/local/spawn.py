"""Starting child processes that never outlive cim-place: own session, parent-death signal.

This module owns ``spawn``: a child in a process group of its own (a stop signals the whole
group; a Ctrl-C meant for the caller does not reach it first), forked from one long-lived thread
so that on Linux the kernel stops it when this process dies, even by SIGKILL. nats-server
processes (``servers.py``) and the supervised agents and controllers (``supervisor.py``) start
through it.
"""

from __future__ import annotations

import ctypes
import queue
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, BinaryIO

__all__ = ["spawn"]


def _die_with_parent() -> None:
    """In the child before exec: ask Linux to SIGTERM it when the spawning thread dies.

    atexit does not run when the owner is killed by a signal (a timed-out test run, a killed
    job); this makes the kernel stop the server then.
    """
    if _prctl is not None:
        _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


_PR_SET_PDEATHSIG = 1
# Resolved once in the parent, so the child between fork and exec only makes the call.
_prctl: Any = ctypes.CDLL(None).prctl if sys.platform == "linux" else None


class _Spawner:
    """Starts processes from one long-lived daemon thread.

    The parent-death signal fires when the *thread* that forked the child exits, so servers
    started from a short-lived thread (``asyncio.to_thread``, a thread pool) would die with it.
    Forking from this thread, which lives as long as the interpreter, ties them to the process.
    """

    def __init__(self) -> None:
        self._requests: queue.SimpleQueue[
            tuple[Callable[[], subprocess.Popen[bytes]], Future[subprocess.Popen[bytes]]]
        ] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def run(self, start: Callable[[], subprocess.Popen[bytes]]) -> subprocess.Popen[bytes]:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._serve, name="cim-place-spawner", daemon=True
                )
                self._thread.start()
        result: Future[subprocess.Popen[bytes]] = Future()
        self._requests.put((start, result))
        return result.result()

    def _serve(self) -> None:
        while True:
            start, result = self._requests.get()
            try:
                result.set_result(start())
            except BaseException as error:
                result.set_exception(error)


_SPAWNER = _Spawner()


def spawn(
    argv: list[str],
    log_file: BinaryIO,
    *,
    die_with_parent: bool = True,
    env: dict[str, str] | None = None,
) -> subprocess.Popen[bytes]:
    """Start ``argv`` with its output appended to ``log_file``, in a session of its own.

    A new session makes the child its own process-group leader, so a stop can signal the whole
    group and a Ctrl-C meant for the caller does not reach it first. With ``die_with_parent``
    (Linux) the kernel stops it when this process dies, even by SIGKILL.
    """
    tie = _die_with_parent if die_with_parent and sys.platform == "linux" else None

    def popen() -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=tie,
            env=env,
        )

    return _SPAWNER.run(popen)

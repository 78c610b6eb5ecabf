"""One real nats-server process: its config file, store directory, log, readiness and stop.

This module owns ``NatsServer``: writing the configuration a ``ServerSpec`` renders, starting
the process (through ``spawn``), waiting until it is healthy or has its leafnode links, reading
its monitoring endpoints, and stopping or restarting it. Topologies of several servers are in
``topologies.py``, the fault-injection proxy in ``link_proxy.py``.

Every process runs in its own process group and is registered for stopping at interpreter exit,
so a crashed test run or CLI does not leave servers behind.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, BinaryIO, Self

from cim_place.closing import Closing
from cim_place.errors import PortTakenError, TransportError
from cim_place.local.link_proxy import LinkProxy
from cim_place.local.server_spec import ServerSpec, find_nats_server
from cim_place.local.spawn import spawn

__all__ = ["READY_TIMEOUT", "NatsServer"]

READY_TIMEOUT = 30.0

_LIVE: set[NatsServer] = set()
_LIVE_LOCK = threading.Lock()


@atexit.register
def _stop_all_at_exit() -> None:
    with _LIVE_LOCK:
        servers = list(_LIVE)
    for server in servers:
        with contextlib.suppress(Exception):
            server.stop(timeout=2.0)


def _http_json(url: str, timeout: float = 1.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return json.loads(response.read().decode())


class NatsServer(Closing):
    """One nats-server process with its config file, store directory and log under ``directory``."""

    def __init__(self, spec: ServerSpec, directory: Path, *, die_with_parent: bool = True) -> None:
        self.spec = spec
        # Stop the server when this process dies, even by a signal (Linux only).
        self.die_with_parent = die_with_parent
        self.directory = Path(directory)
        self.config_path = self.directory / "nats-server.conf"
        self.log_path = self.directory / "nats-server.log"
        # The fault-injection proxy in front of this leaf's hub link, if it was started with one.
        self.link: LinkProxy | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._log_file: BinaryIO | None = None
        # The status of a process that ended by itself while it was awaited (see
        # _raise_if_exited): it is cleaned up at once, but its exit must still show in
        # returncode(), or a supervisor would take the server for running and never restart it.
        self._ended: int | None = None

    # -- identity ---------------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.spec.server_name

    @property
    def domain(self) -> str | None:
        return self.spec.domain

    @property
    def port(self) -> int:
        return self.spec.port

    @property
    def url(self) -> str:
        return f"nats://{self.spec.host}:{self.spec.port}"

    @property
    def monitor_url(self) -> str:
        return f"http://{self.spec.host}:{self.spec.http_port}"

    @property
    def leaf_url(self) -> str | None:
        """The URL leaf servers dial to reach this server, if it accepts leaf connections."""
        if self.spec.leafnode_port is None:
            return None
        return f"nats-leaf://{self.spec.host}:{self.spec.leafnode_port}"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def is_running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def returncode(self) -> int | None:
        """The exit status once the process has ended (negative: the signal); None while it runs."""
        if self._process is None:
            return self._ended
        return self._process.poll()

    def __repr__(self) -> str:
        return f"NatsServer(name={self.name!r}, url={self.url!r}, domain={self.domain!r})"

    # -- lifecycle --------------------------------------------------------------------------------
    def start(self) -> Self:
        """Write the config and start the process (does not wait for readiness)."""
        if self.is_running():
            return self
        binary = find_nats_server()
        self._ended = None
        self.directory.mkdir(parents=True, exist_ok=True)
        self.spec.store_dir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(self.spec.render())
        self._log_file = self.log_path.open("ab")
        log_file = self._log_file
        self._process = spawn(
            [str(binary), "-c", str(self.config_path)],
            log_file,
            die_with_parent=self.die_with_parent,
        )
        with _LIVE_LOCK:
            _LIVE.add(self)
        return self

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> Self:
        """Block until the server answers healthy (with JetStream, if enabled), or raise."""
        deadline = time.monotonic() + timeout
        # /healthz checks that JetStream is up and, in a cluster, that a meta leader is known.
        health = f"{self.monitor_url}/healthz"
        while True:
            self._raise_if_exited()
            try:
                status = _http_json(health)
                if status.get("status") == "ok":
                    return self
            except (OSError, ValueError, urllib.error.URLError):
                pass
            if time.monotonic() > deadline:
                raise TransportError(
                    f"nats-server {self.name} at {self.url} was not ready after {timeout:.0f} s; "
                    f"log {self.log_path} ends with:\n{self.log_tail()}"
                )
            time.sleep(0.05)

    def wait_leaf_connected(self, count: int = 1, timeout: float = READY_TIMEOUT) -> Self:
        """Block until this server has ``count`` leafnode connections (either direction)."""
        deadline = time.monotonic() + timeout
        while True:
            self._raise_if_exited()
            with contextlib.suppress(OSError, ValueError, urllib.error.URLError):
                if self.leafnode_count() >= count:
                    return self
            if time.monotonic() > deadline:
                raise TransportError(
                    f"nats-server {self.name} did not get {count} leafnode connection(s) within "
                    f"{timeout:.0f} s; log {self.log_path} ends with:\n{self.log_tail()}"
                )
            time.sleep(0.05)

    def leafnode_count(self) -> int:
        """Number of leafnode connections the server reports on its monitoring port."""
        leafz = _http_json(f"{self.monitor_url}/leafz")
        return int(leafz.get("leafnodes", 0))

    def monitor(self, endpoint: str) -> Any:
        """GET a monitoring endpoint (``varz``, ``jsz``, ``leafz``...) and return its JSON."""
        return _http_json(f"{self.monitor_url}/{endpoint.lstrip('/')}")

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the server (SIGTERM, then SIGKILL after ``timeout``) and its link proxy."""
        self._terminate(timeout)
        if self.link is not None:
            self.link.close()

    def restart(self, timeout: float = READY_TIMEOUT) -> Self:
        """Stop and start again on the same ports and store directory, then wait until ready."""
        self._terminate(10.0)
        self.start()
        return self.wait_ready(timeout)

    def _terminate(self, timeout: float) -> None:
        process = self._process
        # Only a live leader is signalled: once reaped, its pid (and group id) may be reused.
        if process is not None and process.poll() is None:
            self._signal_group(process, signal.SIGTERM)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                self._signal_group(process, signal.SIGKILL)
                process.wait()
        self._process = None
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        with _LIVE_LOCK:
            _LIVE.discard(self)

    @staticmethod
    def _signal_group(process: subprocess.Popen[bytes], sig: signal.Signals) -> None:
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            pass
        except PermissionError:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(sig)

    def _raise_if_exited(self) -> None:
        if self._process is None:
            raise TransportError(f"nats-server {self.name} is not started; call start() first")
        code = self._process.poll()
        if code is None:
            return
        tail = self.log_tail()
        self._terminate(1.0)
        self._ended = code
        if "address already in use" in tail:
            raise PortTakenError(f"nats-server {self.name}: a port was taken:\n{tail}")
        raise TransportError(
            f"nats-server {self.name} exited with code {code} during startup; "
            f"log {self.log_path} ends with:\n{tail}"
        )

    def log_tail(self, lines: int = 20) -> str:
        """Return the last lines of the server log (for error messages)."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    close = stop  # what ``with`` calls on the way out (Closing)

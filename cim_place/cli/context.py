"""The context file: how later commands find the domain that `cim-place up` started.

``cim-place up`` writes ``<dir>/context.json`` once its domain is ready and removes it when the
domain stops. It names the hub's client URL, a client URL per leaf node, the pid of the process
that runs the domain and when it started. Commands run afterwards in the same working directory
(or below it) find it without flags: the nearest ``.cim-place/context.json`` walking up from the
working directory, or ``$CIM_PLACE_DIR/context.json``. ``--server`` and ``$CIM_PLACE_SERVER``
always win over it.

This module is imported by every command that takes ``--server``, so it imports nothing heavy.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cim_place.cluster.nats.subjects import HUB_DOMAIN
from cim_place.errors import CimPlaceError

__all__ = [
    "CONTEXT_FILE",
    "DEFAULT_DIR",
    "DIR_ENV",
    "DomainContext",
    "NodeEntry",
    "ProcessEntry",
    "find_context",
    "pid_alive",
    "read_context",
    "remove_context",
    "server_default",
    "write_context",
]

CONTEXT_FILE = "context.json"
CLI_USER = "admin"
"""The user the CLI connects as in a local domain (cim_place.local.credentials)."""
_SERVER_VARIABLE = "CIM_PLACE_SERVER="
DEFAULT_DIR = ".cim-place"
DIR_ENV = "CIM_PLACE_DIR"
FORMAT = 1


@dataclass(frozen=True, slots=True)
class NodeEntry:
    """One leaf node of a local domain: its id, client URL, zone and volume directory."""

    node: str
    url: str
    zone: str
    volume: str
    http: str = ""
    """Base URL of the node's gateway (``http://127.0.0.1:PORT``); "" when it has none."""
    s3: str = ""
    """Base URL of the node's S3-compatible API; "" when it has none."""
    credentials: str | None = None
    """Path of the node agent's credentials file (``CIM_PLACE_SERVER=<url with password>``)."""

    dashboard: str = ""
    """The node's web dashboard (``<http>/ui/``, with the operator's ``?token=`` in a domain
    with users); "" without HTTP."""


@dataclass(frozen=True, slots=True)
class ProcessEntry:
    """One supervised process of a local domain."""

    role: str
    """hub, leaf-server, agent or controller."""
    node: str | None
    pid: int | None


@dataclass(frozen=True, slots=True)
class DomainContext:
    """What ``context.json`` holds (plus where it was read from)."""

    hub_url: str
    nodes: tuple[NodeEntry, ...]
    pid: int
    started_at: float
    hub_domain: str = HUB_DOMAIN
    controller: bool = False
    notes: tuple[str, ...] = ()
    processes: tuple[ProcessEntry, ...] = ()
    """Every supervised process (role, node, pid), as of the last restart."""
    s3: dict[str, str] | None = None
    """The S3 operator key: access_key, secret_key, region (docs/S3.md)."""
    credentials: dict[str, str] = field(default_factory=dict)
    """Credentials file per hub user: ``admin`` (the CLI), ``operator``, ``controller``."""
    path: Path | None = field(default=None, compare=False)

    def client_url(self) -> str:
        """The hub URL with the CLI's user and password (the bare URL in an open domain).

        A credentials file that cannot be read is an error naming it: connecting without it
        would only fail later with "authorization violation".
        """
        creds = self.credentials.get(CLI_USER)
        if creds is None:
            return self.hub_url
        return _credentialed(creds)

    def leaf_url(self, node: str) -> str | None:
        for entry in self.nodes:
            if entry.node == node:
                return entry.url
        return None

    @property
    def dashboard(self) -> str:
        """The web dashboard of the first node that serves HTTP ("" when none does); every
        node's gateway serves the same dashboard at ``<http>/ui/``."""
        for entry in self.nodes:
            if entry.http:
                return entry.dashboard
        return ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "server": self.hub_url,
            "hub_domain": self.hub_domain,
            "leaves": {e.node: e.url for e in self.nodes},
            "nodes": [
                {
                    "node": e.node,
                    "url": e.url,
                    "zone": e.zone,
                    "volume": e.volume,
                    "http": e.http,
                    "s3": e.s3,
                    **({"credentials": e.credentials} if e.credentials else {}),
                    "dashboard": e.dashboard,
                }
                for e in self.nodes
            ],
            "credentials": dict(self.credentials),
            "dashboard": self.dashboard,
            "pid": self.pid,
            "started_at": self.started_at,
            "controller": self.controller,
            "notes": list(self.notes),
            "processes": [{"role": e.role, "node": e.node, "pid": e.pid} for e in self.processes],
            **({"s3": dict(self.s3)} if self.s3 else {}),
        }

    @classmethod
    def from_dict(cls, doc: Any, path: Path | None = None) -> DomainContext:
        try:
            return cls(
                hub_url=str(doc["server"]),
                nodes=tuple(
                    NodeEntry(
                        str(n["node"]),
                        str(n["url"]),
                        str(n["zone"]),
                        str(n["volume"]),
                        str(n.get("http", "")),
                        str(n.get("s3", "")),
                        None if n.get("credentials") is None else str(n["credentials"]),
                        dashboard=str(n.get("dashboard", "")),
                    )
                    for n in doc.get("nodes", [])
                ),
                credentials={str(k): str(v) for k, v in dict(doc.get("credentials") or {}).items()},
                pid=int(doc["pid"]),
                started_at=float(doc["started_at"]),
                hub_domain=str(doc.get("hub_domain", HUB_DOMAIN)),
                controller=bool(doc.get("controller", False)),
                notes=tuple(str(n) for n in doc.get("notes", [])),
                processes=tuple(
                    ProcessEntry(
                        str(e["role"]),
                        None if e.get("node") is None else str(e["node"]),
                        None if e.get("pid") is None else int(e["pid"]),
                    )
                    for e in doc.get("processes", [])
                ),
                s3={str(k): str(v) for k, v in doc["s3"].items()} if doc.get("s3") else None,
                path=path,
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            where = path or CONTEXT_FILE
            raise CimPlaceError(
                f"{where} is not a cim-place context file ({exc!r}); remove it, or start the "
                "domain again with `cim-place up`"
            ) from None


def write_context(directory: Path, context: DomainContext) -> Path:
    """Write ``<directory>/context.json`` atomically (readers never see half a file)."""
    path = Path(directory) / CONTEXT_FILE
    partial = path.with_name(CONTEXT_FILE + ".partial")
    partial.write_text(json.dumps(context.to_dict(), indent=2, sort_keys=True) + "\n")
    partial.replace(path)
    return path


def read_context(directory: Path) -> DomainContext | None:
    """The context in ``directory``, or None when there is none."""
    path = Path(directory) / CONTEXT_FILE
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise CimPlaceError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        doc = json.loads(text)
    except ValueError as exc:
        raise CimPlaceError(
            f"{path} is not valid JSON ({exc}); remove it, or start the domain again with "
            "`cim-place up`"
        ) from None
    return DomainContext.from_dict(doc, path)


def remove_context(directory: Path, *, pid: int | None = None) -> None:
    """Remove the context file (only if it still names ``pid``, when given)."""
    path = Path(directory) / CONTEXT_FILE
    if pid is not None:
        with contextlib.suppress(CimPlaceError):
            current = read_context(directory)
            if current is not None and current.pid != pid:
                return  # a newer domain wrote it
    path.unlink(missing_ok=True)


def find_context(start: Path | None = None) -> DomainContext | None:
    """The context commands use by default: ``$CIM_PLACE_DIR``'s, else the nearest
    ``.cim-place/context.json`` in the working directory or one of its parents."""
    env = os.environ.get(DIR_ENV)
    if env:
        return read_context(Path(env))
    here = (start or Path.cwd()).resolve()
    for directory in (here, *here.parents):
        candidate = directory / DEFAULT_DIR
        if (candidate / CONTEXT_FILE).is_file():
            return read_context(candidate)
    return None


def _credentialed(path: str) -> str:
    """The server URL in a credentials file written by `cim-place up`."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise CimPlaceError(
            f"cannot read the CLI's credentials file {path}: {exc.strerror or exc}; start the "
            "domain again with `cim-place up`, or pass --server with a user"
        ) from None
    for line in text.splitlines():
        if line.startswith(_SERVER_VARIABLE):
            return line[len(_SERVER_VARIABLE) :].strip()
    raise CimPlaceError(f"{path} names no server URL; start the domain again with `cim-place up`")


def pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists (and is not a zombie)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no /proc: trust kill(0)
    return stat[stat.rfind(")") + 2 :].split()[0] != "Z"


def server_default(value: str | None) -> str | None:
    """The ``--server`` value when none was given: the hub URL of the context, if any.

    A Typer callback of the shared ``--server`` option; ``--server`` and ``$CIM_PLACE_SERVER``
    arrive here as ``value`` and are returned unchanged.
    """
    try:
        context = find_context()
    except CimPlaceError:
        return value  # a broken context file: the command reports the URL it tried
    if context is None:
        return value
    try:
        if not value:
            return context.client_url()
        # The domain's own hub named without a user (`--server nats://127.0.0.1:PORT`): it
        # admits only users, so the CLI's credentials go with it.
        if "@" not in value and value.rstrip("/") == context.hub_url:
            return context.client_url()
        if "@" not in value:
            for entry in context.nodes:
                # A leaf of the domain: its own CLI user (a reader homed there).
                key = f"{CLI_USER}@{entry.node}"
                if value.rstrip("/") == entry.url and key in context.credentials:
                    return _credentialed(context.credentials[key])
    except CimPlaceError as exc:
        # A callback of every command: report it as the commands do, without a traceback.
        sys.stderr.write(f"error: {exc}\n")
        raise SystemExit(1) from None
    return value

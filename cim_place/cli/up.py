"""`cim-place up` and `cim-place down`: a whole domain on this machine, started and stopped.

``up`` runs the domain (:class:`cim_place.local.domain.LocalDomain`) in the foreground until
Ctrl-C, or with ``--detach`` in a background process (its output in ``<dir>/up.log``) and returns
once it is ready. Either way it writes ``<dir>/context.json`` (see :mod:`cim_place.cli.context`)
so later commands in this directory find the domain, and removes it when the domain stops.
``down`` signals the process named in the context file and waits until it has stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from cim_place.cli._domain import LogJsonOption, LogLevelOption
from cim_place.cli._output import fail, handles_errors, print_json
from cim_place.cli.context import (
    CONTEXT_FILE,
    DEFAULT_DIR,
    DomainContext,
    NodeEntry,
    ProcessEntry,
    pid_alive,
    read_context,
    remove_context,
    write_context,
)
from cim_place.cluster.nats.security import CONTROLLER, OPERATOR, agent_user
from cim_place.errors import CimPlaceError
from cim_place.http.settings import DEFAULT_LISTEN as DEFAULT_HTTP
from cim_place.http.settings import OFF, parse_listen
from cim_place.local.credentials import ADMIN, leaf_cli_key

if TYPE_CHECKING:
    from cim_place.local.domain import LocalDomain

LOG_FILE = "up.log"
_DETACH_TIMEOUT = 180.0
_DOWN_TIMEOUT = 60.0
_POLL = 0.05

DirOption = Annotated[
    Path,
    typer.Option("--dir", "-d", help="Where the domain keeps its servers, volumes and context."),
]
QuietOption = Annotated[bool, typer.Option("--quiet", "-q", help="Print nothing on success.")]
JsonOption = Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")]


def _running_context(directory: Path) -> DomainContext | None:
    """The context of a domain running from ``directory``; a stale one is removed."""
    context = read_context(directory)
    if context is None:
        return None
    if pid_alive(context.pid):
        return context
    remove_context(directory, pid=context.pid)
    typer.echo(
        f"note: removed a stale {directory / CONTEXT_FILE} (process {context.pid} is gone)",
        err=True,
    )
    return None


@handles_errors
def up_command(
    leaves: Annotated[
        int, typer.Option("--leaves", "-n", min=1, max=64, help="Number of leaf nodes.")
    ] = 3,
    zones: Annotated[
        int, typer.Option("--zones", "-z", min=1, max=64, help="Zones, assigned round robin.")
    ] = 3,
    directory: DirOption = Path(DEFAULT_DIR),
    detach: Annotated[
        bool, typer.Option("--detach", help="Run in the background; return once it is ready.")
    ] = False,
    port: Annotated[
        int | None,
        typer.Option("--port", min=1, max=65535, help="Client port of the hub (default: free)."),
    ] = None,
    http_listen: Annotated[
        str,
        typer.Option(
            "--http-listen",
            help="Where the nodes' IPFS gateways listen: HOST:0 (free ports, the default "
            "127.0.0.1:0), HOST:PORT (PORT, PORT+1, ... per node) or off.",
        ),
    ] = DEFAULT_HTTP,
    quiet: QuietOption = False,
    as_json: JsonOption = False,
    controllers: Annotated[
        int,
        typer.Option(
            "--controllers", min=1, max=5, help="Controllers to run (one leads, others stand by)."
        ),
    ] = 1,
    hub_servers: Annotated[
        int,
        typer.Option(
            "--hub-servers",
            min=1,
            max=5,
            help="Servers in the hub: 1, or a JetStream cluster (3 survive the loss of one).",
        ),
    ] = 1,
    log_level: LogLevelOption = None,
    log_json: LogJsonOption = False,
    scrub_interval: Annotated[
        str | None,
        typer.Option(
            "--scrub-interval",
            help="Each agent's full scrub pass every this long, e.g. 7d (default), 12h.",
            show_default=False,
        ),
    ] = None,
    scrub_rate: Annotated[
        str | None,
        typer.Option(
            "--scrub-rate",
            help="Bytes/s a background scrub reads per volume, e.g. 50MiB/s (default).",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Start a hub, leaf nodes with agents and a controller on this machine (Ctrl-C stops).

    Every part is a process of its own, restarted with back-off when it exits."""
    directory = directory.resolve()
    running = _running_context(directory)
    if running is not None:
        raise CimPlaceError(
            f"a domain is already running from {directory} (pid {running.pid}, hub "
            f"{running.hub_url}); stop it with `cim-place down --dir {directory}` first"
        )
    logs = _Logs(log_level, log_json, controllers, scrub_interval, scrub_rate, hub_servers)
    logs.check_scrub()
    http = None if http_listen.strip() == OFF else http_listen.strip()
    if http is not None:
        parse_listen(http, what="--http-listen")
    if detach:
        context = _detach(leaves, zones, directory, port, logs, http)
    else:
        _foreground(leaves, zones, directory, port, quiet, as_json, logs, http)
        return
    if as_json:
        print_json(context.to_dict())
    elif not quiet:
        _print_summary(context, directory, detached=True)


@dataclass(frozen=True)
class _Logs:
    """How the domain's processes log, how many controllers and hub servers run (passed on to a
    detached ``up`` as flags)."""

    level: str | None
    json_lines: bool
    controllers: int = 1
    scrub_interval: str | None = None
    scrub_rate: str | None = None
    hub_servers: int = 1

    def log_flags(self) -> list[str]:
        return (["--log-level", self.level] if self.level else []) + (
            ["--log-json"] if self.json_lines else []
        )

    def flags(self) -> list[str]:
        scrub = (["--scrub-interval", self.scrub_interval] if self.scrub_interval else []) + (
            ["--scrub-rate", self.scrub_rate] if self.scrub_rate else []
        )
        return [
            *self.log_flags(),
            "--controllers",
            str(self.controllers),
            "--hub-servers",
            str(self.hub_servers),
            *scrub,
        ]

    def scrub(self) -> dict[str, str]:
        """The agents' ``scrub`` configuration section (empty: their defaults)."""
        section = {"interval": self.scrub_interval, "rate": self.scrub_rate}
        return {key: value for key, value in section.items() if value}

    def check_scrub(self) -> None:
        """Refuse a bad --scrub-interval or --scrub-rate here, before any agent starts."""
        from cim_place.policies.quantities import parse_duration, parse_size

        try:
            if self.scrub_interval and parse_duration(self.scrub_interval) <= 0:
                raise ValueError("it must be more than 0")
            if self.scrub_rate and parse_size(self.scrub_rate, per_second=True) <= 0:
                raise ValueError("it must be more than 0")
        except ValueError as exc:
            raise CimPlaceError(
                f"bad --scrub-interval/--scrub-rate: {exc}; e.g. --scrub-interval 7d "
                "--scrub-rate 50MiB/s"
            ) from None


def _foreground(
    leaves: int,
    zones: int,
    directory: Path,
    port: int | None,
    quiet: bool,
    as_json: bool,
    logs: _Logs,
    http: str | None,
) -> None:
    from cim_place.local.domain import LocalDomain
    from cim_place.runtime.logs import configure_logging

    configure_logging("up", level=logs.level, json_lines=logs.json_lines)

    domain = LocalDomain(
        directory,
        leaves=leaves,
        zones=zones,
        hub_port=port,
        controllers=logs.controllers,
        hub_servers=logs.hub_servers,
        log_flags=tuple(logs.log_flags()),
        http_listen=http,
        scrub=logs.scrub(),
    )

    def progress(message: str) -> None:
        if not quiet and not as_json:
            typer.echo(f"{message}...", err=True)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        me = asyncio.current_task()
        started = False

        def on_signal() -> None:
            # Before the domain is up, a signal abandons the start (which stops what started).
            if started:
                stop.set()
            elif me is not None:
                me.cancel()

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, on_signal)
        try:
            await domain.start(progress)
            context = _context_of(domain)
            write_context(directory, context)

            # A restarted process has a new pid: keep context.json current.
            def refresh() -> None:
                write_context(directory, _context_of(domain))

            domain.on_change = refresh
            started = True
            if as_json:
                print_json(context.to_dict())
            elif not quiet:
                _print_summary(context, directory, detached=False)
            sys.stdout.flush()
            await stop.wait()
            if not quiet and not as_json:
                typer.echo("stopping...", err=True)
        finally:
            remove_context(directory, pid=os.getpid())
            await domain.stop()
            if started and not quiet and not as_json:
                typer.echo("stopped", err=True)

    try:
        asyncio.run(main())
    except asyncio.CancelledError:
        raise fail("interrupted while starting; everything that had started was stopped") from None


def _context_of(domain: LocalDomain) -> DomainContext:
    return DomainContext(
        hub_url=domain.hub_url,
        nodes=tuple(
            NodeEntry(
                n.node,
                n.url,
                n.zone,
                str(n.volume),
                domain.http_url(n.node),
                domain.s3_url(n.node),
                str(domain.credentials.path(agent_user(n.node))),
                dashboard=domain.dashboard_url(n.node),
            )
            for n in domain.nodes
        ),
        credentials={
            user: str(domain.credentials.path(user))
            for user in (
                ADMIN,
                OPERATOR,
                CONTROLLER,
                *(leaf_cli_key(n.node) for n in domain.nodes),
            )
        },
        pid=os.getpid(),
        started_at=domain.started_at,
        controller=domain.controller,
        notes=tuple(domain.notes),
        s3=domain.s3_key,
        processes=tuple(
            ProcessEntry(str(p["role"]), _text_or_none(p["node"]), _int_or_none(p["pid"]))
            for p in domain.processes()
        ),
    )


def _text_or_none(value: object) -> str | None:
    return None if value is None else str(value)


def _int_or_none(value: object) -> int | None:
    return value if isinstance(value, int) else None


def _detach(
    leaves: int,
    zones: int,
    directory: Path,
    port: int | None,
    logs: _Logs,
    http: str | None,
) -> DomainContext:
    """Run ``up`` in a new session with its output in ``<dir>/up.log``; wait until it is ready."""
    directory.mkdir(parents=True, exist_ok=True)
    log_path = directory / LOG_FILE
    command = [
        sys.executable,
        "-m",
        "cim_place.cli",
        "up",
        "--leaves",
        str(leaves),
        "--zones",
        str(zones),
        "--dir",
        str(directory),
        "--quiet",
        *logs.flags(),
        "--http-listen",
        http if http is not None else OFF,
    ]
    if port is not None:
        command += ["--port", str(port)]
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    deadline = time.monotonic() + _DETACH_TIMEOUT
    while True:
        code = process.poll()
        if code is not None:
            raise CimPlaceError(
                f"the domain did not start (exit code {code}); {log_path} ends with:\n"
                f"{_tail(log_path)}"
            )
        with contextlib.suppress(CimPlaceError):
            context = read_context(directory)
            if context is not None and context.pid == process.pid:
                return context
        if time.monotonic() > deadline:
            process.terminate()
            raise CimPlaceError(
                f"the domain was not ready after {_DETACH_TIMEOUT:.0f} s and was stopped; "
                f"see {log_path}"
            )
        time.sleep(_POLL)


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _print_summary(context: DomainContext, directory: Path, *, detached: bool) -> None:
    from rich.table import Table

    from cim_place.cli._views import make_console

    table = Table(title=f"cim-place domain in {directory}", title_justify="left")
    for column in ("node", "role", "url", "zone", "volume", "http"):
        table.add_column(column)
    table.add_row(
        "hub",
        "hub (JetStream domain hub)" + (", controller" if context.controller else ""),
        context.hub_url,
        "",
        "",
        "",
    )
    for entry in context.nodes:
        table.add_row(
            entry.node, "leaf + agent", entry.url, entry.zone, entry.volume, entry.http or "-"
        )
    console = make_console()
    console.print(table)
    for note in context.notes:
        console.print(f"note: {note}", markup=False)
    if context.dashboard:
        console.print(f"dashboard: {context.dashboard}", markup=False)
    how = "`cim-place down`" if detached else "Ctrl-C or `cim-place down`"
    console.print(
        f"ready (pid {context.pid}); commands run here find it through "
        f"{directory / CONTEXT_FILE}; stop it with {how}",
        markup=False,
    )


@handles_errors
def down_command(
    directory: DirOption = Path(DEFAULT_DIR),
    quiet: QuietOption = False,
) -> None:
    """Stop the domain that `cim-place up` runs from this directory, and wait until it has."""
    directory = directory.resolve()
    context = read_context(directory)
    if context is None:
        raise CimPlaceError(
            f"no domain is running from {directory} (no {CONTEXT_FILE}); nothing to stop "
            "(pass --dir if it was started with one)"
        )
    if not pid_alive(context.pid):
        remove_context(directory, pid=context.pid)
        if not quiet:
            typer.echo(f"the domain (pid {context.pid}) was not running; removed its context")
        return
    if not _is_cim_place(context.pid):
        remove_context(directory, pid=context.pid)
        raise CimPlaceError(
            f"process {context.pid} named in {directory / CONTEXT_FILE} is not cim-place "
            "(the domain ended without cleaning up); removed the stale context, nothing signalled"
        )
    os.kill(context.pid, signal.SIGTERM)
    deadline = time.monotonic() + _DOWN_TIMEOUT
    while pid_alive(context.pid):
        if time.monotonic() > deadline:
            raise CimPlaceError(
                f"the domain (pid {context.pid}) did not stop within {_DOWN_TIMEOUT:.0f} s; "
                f"see {directory / LOG_FILE}, or kill it: kill -9 {context.pid}"
            )
        time.sleep(_POLL)
    remove_context(directory, pid=context.pid)
    if not quiet:
        typer.echo(f"stopped the domain in {directory} (pid {context.pid})")


def _is_cim_place(pid: int) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return True  # no /proc: trust the context file
    return b"cim_place" in cmdline or b"cim-place" in cmdline


def register(app: typer.Typer) -> None:
    app.command("up")(up_command)
    app.command("down")(down_command)

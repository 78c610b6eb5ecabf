"""`cim-place up` and `cim-place down`: a whole domain on this machine, started and stopped.

``up`` runs the domain (:class:`cim_place.local.domain.LocalDomain`) in the foreground until
Ctrl-C, or with ``--detach`` in a background process (its output in ``<dir>/up.log``) and returns
once it is ready. Either way it writes ``<dir>/context.json`` (see :mod:`cim_place.cli.context`)
so later commands in this directory find the domain, and removes it when the domain stops.
``down`` signals the process named in the context file and waits until it has stopped. The
domain's settings, its run in this process and the summary are :mod:`cim_place.cli.up_domain`.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Annotated

import typer

from cim_place.cli._domain import LogJsonOption, LogLevelOption
from cim_place.cli._output import handles_errors, print_json
from cim_place.cli.context import (
    CONTEXT_FILE,
    DEFAULT_DIR,
    DomainContext,
    pid_alive,
    read_context,
    remove_context,
)
from cim_place.cli.up_domain import Logs, foreground, print_summary
from cim_place.errors import CimPlaceError
from cim_place.http.settings import DEFAULT_LISTEN as DEFAULT_HTTP
from cim_place.http.settings import OFF, parse_listen

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
    logs = Logs(log_level, log_json, controllers, scrub_interval, scrub_rate, hub_servers)
    logs.check_scrub()
    http = None if http_listen.strip() == OFF else http_listen.strip()
    if http is not None:
        parse_listen(http, what="--http-listen")
    if detach:
        context = _detach(leaves, zones, directory, port, logs, http)
    else:
        foreground(leaves, zones, directory, port, quiet, as_json, logs, http)
        return
    if as_json:
        print_json(context.to_dict())
    elif not quiet:
        print_summary(context, directory, detached=True)


def _detach(
    leaves: int,
    zones: int,
    directory: Path,
    port: int | None,
    logs: Logs,
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

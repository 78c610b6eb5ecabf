"""The domain that `cim-place up` runs: its settings, its run in this process, what it writes.

This module owns :class:`Logs` (how the domain's processes log and how many controllers, hub
servers and what scrub they run; the flags a detached ``up`` passes on), :func:`foreground` (the
domain in this process until Ctrl-C, keeping ``<dir>/context.json`` current) and
:func:`print_summary`. The command, its detached run and ``down`` are :mod:`cim_place.cli.up`.
Heavy modules (the domain, rich) are imported inside the functions, as in every command module.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from cim_place.cli._output import fail, print_json
from cim_place.cli.context import (
    CONTEXT_FILE,
    DomainContext,
    NodeEntry,
    ProcessEntry,
    remove_context,
    write_context,
)
from cim_place.cluster.nats.security import CONTROLLER, OPERATOR, agent_user
from cim_place.errors import CimPlaceError
from cim_place.local.credentials import ADMIN, leaf_cli_key

if TYPE_CHECKING:
    from cim_place.local.domain import LocalDomain

__all__ = ["Logs", "foreground", "print_summary"]


@dataclass(frozen=True)
class Logs:
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


def foreground(
    leaves: int,
    zones: int,
    directory: Path,
    port: int | None,
    quiet: bool,
    as_json: bool,
    logs: Logs,
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
                print_summary(context, directory, detached=False)
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


def print_summary(context: DomainContext, directory: Path, *, detached: bool) -> None:
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

"""`cim-place controller` (run a placement controller) and `cim-place node drain|undrain`."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from nats.js import JetStreamContext

from cim_place.cli._domain import (
    CredsOption,
    DomainOption,
    LogJsonOption,
    LogLevelOption,
    ServerOption,
    check_known_node,
    run_in_domain,
)
from cim_place.cli._output import handles_errors
from cim_place.cluster.nats.connection import server_urls
from cim_place.cluster.nats.subjects import check_node_id
from cim_place.cluster.state.locations import LocationStore
from cim_place.errors import CimPlaceError

if TYPE_CHECKING:
    from cim_place.cluster.controller.service import ControllerConfig


def controller_command(
    config: Annotated[
        Path | None, typer.Option("--config", "-c", help="Controller configuration (YAML).")
    ] = None,
    server: ServerOption = None,
    creds: CredsOption = None,
    identity: Annotated[
        str | None, typer.Option("--identity", help="Unique name of this controller.")
    ] = None,
    metrics: Annotated[
        str | None, typer.Option("--metrics", help="host:port for Prometheus metrics.")
    ] = None,
    shards: Annotated[
        int | None,
        typer.Option(
            "--shards",
            min=1,
            help="Split the CIDs into N shards, one lease each; every controller of the domain "
            "must be given the same N (default 1: one leader for the whole domain).",
        ),
    ] = None,
    log_level: LogLevelOption = None,
    log_json: LogJsonOption = False,
) -> None:
    """Run a placement controller until interrupted (several may run: one leads, or with
    --shards each leads a share of the shards)."""
    with contextlib.suppress(KeyboardInterrupt):
        _run(_config(config, server, creds, identity, metrics, shards), log_level, log_json)


@handles_errors
def _config(
    path: Path | None,
    server: str | None,
    creds: str | None,
    identity: str | None,
    metrics: str | None,
    shards: int | None = None,
) -> ControllerConfig:
    # Imported here: the controller pulls in the planner and numpy, which other commands skip.
    from cim_place.cluster.controller.config import load_controller_config
    from cim_place.cluster.controller.service import ControllerConfig

    config = ControllerConfig()
    if path is not None:
        config = load_controller_config(path, config)
    changes: dict[str, object] = {}
    if server is not None or path is None:
        changes["servers"] = tuple(server_urls(server))
    if creds is not None:
        changes["creds"] = creds
    if identity is not None:
        changes["identity"] = identity
    if metrics is not None:
        changes["metrics"] = metrics
    if shards is not None:
        changes["shards"] = shards
    return replace(config, **changes)  # type: ignore[arg-type]


@handles_errors
def _run(config: ControllerConfig, log_level: str | None, log_json: bool) -> None:
    from cim_place.cluster.controller.service import run_controller
    from cim_place.cluster.nats.connection import redacted
    from cim_place.runtime.logs import configure_logging

    configure_logging("controller", level=log_level, json_lines=log_json)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        # Never the password: this line lands in the controller's log file.
        typer.echo(f"controller on {', '.join(redacted(u) for u in config.servers)}", err=True)
        await run_controller(config, stop)

    asyncio.run(main())


node_app = typer.Typer(help="Operate on one node: drain, undrain.", no_args_is_help=True)


@node_app.command("drain")
@handles_errors
def drain(
    node: Annotated[str, typer.Argument(help="Node id.")],
    wait: Annotated[
        bool, typer.Option("--wait", help="Wait until the node holds nothing, then report.")
    ] = False,
    timeout: Annotated[float, typer.Option("--timeout", help="Seconds to wait at most.")] = 3600,
    force: Annotated[
        bool,
        typer.Option("--force", help="Drain a node the domain does not list (down for 30 s+)."),
    ] = False,
    server: ServerOption = None,
    creds: CredsOption = None,
    domain: DomainOption = None,
) -> None:
    """Move every copy off NODE (copy first, then drop), then report it drained."""
    check_node_id(node)

    from cim_place.cluster.controller.service import draining_nodes, set_drain

    async def action(js: JetStreamContext) -> None:
        if not force:
            # A typo would otherwise be a drain flag nobody acts on, reported as done.
            await check_known_node(js, node, also=await draining_nodes(js))
        await set_drain(js, node, True)
        typer.echo(f"draining {node}: its copies are being moved elsewhere")
        if not wait:
            return
        locations = await LocationStore(js).open(create=False)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            held = await _copies_on(locations, node)
            if held == 0:
                typer.echo(f"{node} is drained: it holds no copy")
                return
            await asyncio.sleep(1.0)
        raise CimPlaceError(
            f"{node} still holds copies after {timeout:.0f} s; see `cim-place status`"
        )

    run_in_domain(server, creds, domain, action)


async def _copies_on(locations: LocationStore, node: str) -> int:
    count = 0
    async for status in locations.list():
        count += sum(1 for location in status.locations if location.node == node)
    return count


@node_app.command("undrain")
@handles_errors
def undrain(
    node: Annotated[str, typer.Argument(help="Node id.")],
    server: ServerOption = None,
    creds: CredsOption = None,
    domain: DomainOption = None,
) -> None:
    """Let NODE receive copies again."""
    check_node_id(node)

    from cim_place.cluster.controller.service import set_drain

    async def action(js: JetStreamContext) -> None:
        await set_drain(js, node, False)
        typer.echo(f"{node} may receive copies again")

    run_in_domain(server, creds, domain, action)


def register(app: typer.Typer) -> None:
    app.command("controller")(controller_command)
    app.add_typer(node_app, name="node")

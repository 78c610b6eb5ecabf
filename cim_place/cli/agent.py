"""`cim-place agent` (run a leaf agent) and the commands that go through the domain: `add --server`
(through a running agent) and `get` (from whichever nodes hold the content, verified).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import signal
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from nats.aio.client import Client

from cim_place.cli._domain import (
    CredsOption,
    LogJsonOption,
    LogLevelOption,
    ServerOption,
    choose_domain,
)
from cim_place.cli._output import handles_errors
from cim_place.cluster.agent.config import (
    AgentConfig,
    VolumeConfig,
    load_agent_config,
    stream_address_problems,
)
from cim_place.cluster.exchange.stream import DEFAULT_LISTEN
from cim_place.cluster.nats.connection import DEFAULT_SERVER, connected, jetstream
from cim_place.cluster.nats.subjects import check_node_id
from cim_place.errors import CimPlaceError, InvalidCidError, StoreError
from cim_place.http.settings import OFF, HttpSettings, parse_listen
from cim_place.objectstore import cid as cids
from cim_place.policies.quantities import parse_size

if TYPE_CHECKING:
    from cim_place.cluster.exchange.fetch_model import BlockUnavailableError


def _volume_flag(text: str, index: int) -> VolumeConfig:
    """``PATH`` or ``PATH:CAPACITY`` (e.g. /data/disk0:500GiB)."""
    path, sep, capacity = text.rpartition(":")
    if not sep:
        path, capacity = text, ""
    try:
        size = parse_size(capacity) if capacity else None
    except ValueError as exc:
        raise CimPlaceError(f"--volume {text}: {exc} (write PATH or PATH:CAPACITY)") from None
    return VolumeConfig(f"v{index}", Path(path), size)


def agent_command(
    config: Annotated[
        Path | None, typer.Option("--config", "-c", help="Agent configuration (YAML).")
    ] = None,
    node: Annotated[str | None, typer.Option("--node", help="Node id (without --config).")] = None,
    server: Annotated[
        str | None,
        typer.Option("--server", "-s", help="The leaf's NATS server(s), comma separated."),
    ] = None,
    creds: CredsOption = None,
    volume: Annotated[
        list[str] | None, typer.Option("--volume", help="PATH or PATH:CAPACITY (repeatable).")
    ] = None,
    label: Annotated[
        list[str] | None, typer.Option("--label", help="KEY=VALUE, e.g. zone=eu-1 (repeatable).")
    ] = None,
    tag: Annotated[list[str] | None, typer.Option("--tag", help="Tag, e.g. ssd.")] = None,
    metrics: Annotated[
        str | None, typer.Option("--metrics", help="host:port for Prometheus metrics.")
    ] = None,
    stream_listen: Annotated[
        str | None,
        typer.Option(
            "--stream-listen",
            help="host:port of the bulk block stream (default 127.0.0.1:0: a free port on "
            "loopback); off: blocks travel over NATS only.",
        ),
    ] = None,
    stream_advertise: Annotated[
        str | None,
        typer.Option(
            "--stream-advertise",
            help="host or host:port peers dial for the block stream (default: the listen "
            "address; needed when listening on 0.0.0.0).",
        ),
    ] = None,
    log_level: LogLevelOption = None,
    log_json: LogJsonOption = False,
    http_listen: Annotated[
        str | None,
        typer.Option(
            "--http-listen",
            help="host:port of the node's IPFS gateway (port 0: a free one); off: none. "
            "Overrides http.listen of --config (default: off).",
        ),
    ] = None,
) -> None:
    """Run a leaf agent until interrupted: store, announce, serve and fetch content."""
    with contextlib.suppress(KeyboardInterrupt):
        _run_agent(
            _Logging(log_level, log_json),
            _with_http(
                _agent_config(
                    config,
                    node,
                    server,
                    creds,
                    volume,
                    label,
                    tag,
                    metrics,
                    _Stream(stream_listen, stream_advertise),
                ),
                http_listen,
            ),
        )


@handles_errors
def _with_http(config: AgentConfig, listen: str | None) -> AgentConfig:
    """``config`` with the gateway listening where ``--http-listen`` says."""
    if listen is None:
        return config
    if listen.strip() == OFF:
        return dataclasses.replace(config, http=None)
    parse_listen(listen, what="--http-listen")
    settings = config.http if config.http is not None else HttpSettings()
    return dataclasses.replace(config, http=dataclasses.replace(settings, listen=listen.strip()))


@dataclass(frozen=True)
class _Logging:
    level: str | None
    json_lines: bool


@dataclass(frozen=True)
class _Stream:
    listen: str | None
    advertise: str | None

    def given(self) -> bool:
        return self.listen is not None or self.advertise is not None

    def checked(self) -> tuple[str | None, str | None]:
        """(listen, advertise) for AgentConfig; raises CimPlaceError naming the bad flag."""
        listen = None if self.listen == "off" else (self.listen or DEFAULT_LISTEN)
        for key, message, hint in stream_address_problems(listen, self.advertise):
            flag = "--" + key.replace("_", "-")
            hint = hint.replace("stream_advertise: ", "--stream-advertise ")
            raise CimPlaceError(f"{flag}: {message} ({hint})")
        return listen, self.advertise


@handles_errors
def _agent_config(
    config: Path | None,
    node: str | None,
    server: str | None,
    creds: str | None,
    volume: list[str] | None,
    label: list[str] | None,
    tag: list[str] | None,
    metrics: str | None,
    stream: _Stream,
) -> AgentConfig:
    if config is not None:
        if stream.given():
            raise CimPlaceError(
                "--stream-listen/--stream-advertise go with the flags, not with --config; "
                "set blocks: {stream_listen, stream_advertise} in the file instead"
            )
        return load_agent_config(config)
    if node is None or not volume:
        raise CimPlaceError(
            "give --config FILE, or at least --node ID and --volume PATH "
            "(see `cim-place agent --help`)"
        )
    listen, advertise = stream.checked()
    labels = {}
    for pair in label or []:
        key, sep, value = pair.partition("=")
        if not sep or not key or not value:
            raise CimPlaceError(f"--label {pair!r} is not KEY=VALUE (example: --label zone=eu-1)")
        labels[key] = value
    return AgentConfig(
        node=check_node_id(node),
        volumes=tuple(_volume_flag(v, i) for i, v in enumerate(volume)),
        servers=tuple((server or DEFAULT_SERVER).split(",")),
        creds=creds,
        labels=labels,
        tags=tuple(tag or ()),
        metrics=metrics,
        stream_listen=listen,
        stream_advertise=advertise,
    )


@handles_errors
def _run_agent(logs: _Logging, config: AgentConfig) -> None:
    # Imported here: the agent pulls in every service module, which other commands do not need.
    from cim_place.cluster.agent.service import describe, run_agent
    from cim_place.runtime.logs import configure_logging

    configure_logging("agent", level=logs.level, json_lines=logs.json_lines, node=config.node)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        typer.echo(describe(config), err=True)
        await run_agent(config, stop)

    asyncio.run(main())


@handles_errors
def get_command(
    ref: Annotated[str, typer.Argument(help="CID or domain-wide name.")],
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Write here instead of stdout.")
    ] = None,
    server: ServerOption = None,
    creds: CredsOption = None,
) -> None:
    """Fetch content from whichever nodes hold it, verifying every block."""
    # The data path is imported only by the commands that move data.
    from cim_place.cluster.exchange.fetch import fetch_dag
    from cim_place.cluster.exchange.fetch_model import BlockUnavailableError
    from cim_place.cluster.exchange.holders import find_holders
    from cim_place.cluster.state.names import NameRegistry
    from cim_place.objectstore.blockstore import FsBlockStore
    from cim_place.objectstore.unixfs import read_file

    async def main() -> None:
        async with connected(server, creds=creds) as nc:
            try:
                root = cids.parse(ref)
            except InvalidCidError:
                root = await NameRegistry(jetstream(nc, await choose_domain(nc, None))).resolve(ref)
            holders = await find_holders(nc, root)
            if not holders:
                raise await _nobody_holds(nc, root)
            with tempfile.TemporaryDirectory(prefix="cim-place-get-") as tmp:
                blocks = FsBlockStore(Path(tmp), fsync="none")
                try:
                    try:
                        await fetch_dag(nc, root, holders, blocks)
                    except BlockUnavailableError as exc:
                        raise await _no_good_copy(nc, ref, exc) from None
                    # Every block is verified and on disk before the first byte is written.
                    _write(read_file(blocks, root), output)
                finally:
                    blocks.close()

    asyncio.run(main())


async def _nobody_holds(nc: Client, root: bytes) -> CimPlaceError:
    """Why no node answered for ``root``: removed from the domain, or simply held nowhere."""
    from cim_place.cluster.state.locations import LocationStore

    text = cids.to_str(root)
    status = None
    with contextlib.suppress(CimPlaceError):
        js = jetstream(nc, await choose_domain(nc, None))
        status = await (await LocationStore(js).open(create=False)).get(root)
    if status is not None and status.state == "removed":
        return CimPlaceError(f"{text} was removed from the domain (`cim-place rm`); nothing to get")
    return CimPlaceError(
        f"no node of the domain holds {text}: no agent answered that it has it "
        "(`cim-place status CID` shows where the domain last saw it)"
    )


async def _no_good_copy(nc: Client, ref: str, exc: BlockUnavailableError) -> CimPlaceError:
    """One line for `get` when no holder could supply a verified block: the object, the nodes
    tried, and the damage the domain knows of (from its status, when it can be read)."""
    from cim_place.cluster.state.locations import LocationStore

    tried = ", ".join(exc.tried) or "none"
    known = ""
    with contextlib.suppress(Exception):
        js = jetstream(nc, await choose_domain(nc, None))
        status = await (await LocationStore(js).open(create=False)).get(exc.root)
        if status is not None:
            damaged = [
                f"{loc.node}/{loc.volume}"
                for loc in status.locations
                if loc.state in ("damaged", "repairing")
            ]
            known = f"; status {status.state}" + (
                f", damaged copies on {', '.join(damaged)}" if damaged else ""
            )
    return CimPlaceError(
        f"cannot get {ref}: block {cids.to_str(exc.cid)} is corrupt or missing on every node "
        f"tried ({tried}){known}; nothing was written (docs/DURABILITY.md: a lost object)"
    )


def _write(chunks: Iterator[bytes], output: Path | None) -> None:
    if output is None:
        out = sys.stdout.buffer
        for chunk in chunks:
            out.write(chunk)
        out.flush()
        return
    partial = output.with_name(output.name + ".partial")
    try:
        with partial.open("wb") as handle:
            for chunk in chunks:
                handle.write(chunk)
        partial.replace(output)
    except OSError as exc:
        raise StoreError(f"cannot write {output}: {exc.strerror or exc}") from None
    finally:
        partial.unlink(missing_ok=True)


def register(app: typer.Typer) -> None:
    app.command("agent")(agent_command)
    app.command("get")(get_command)

"""`cim-place status`, `nodes` and `tasks`: what the domain holds, who holds it, what is pending.

What they show is read by :mod:`cim_place.cluster.state.overview` (shared with the dashboard),
from the hub's materialised state, never by asking every node:

- ``status``: the domain summary and single objects from KV ``cim-place-locations``
  (:class:`cim_place.cluster.state.locations.LocationStore`, one KV get per object), names resolved
  through KV ``cim-place-names``; the ``--json`` schema is documented in ``docs/STATUS.md``;
- ``nodes``: heartbeats in KV ``cim-place-nodes``;
- ``tasks``: stream ``CIM_PLACE_TASKS`` (queued per node subject, running = the node consumer's
  ack-pending) and the recent ``TaskFailed`` events of ``CIM_PLACE_EVENTS``.

Heavy modules are imported inside the commands: ``status CID`` is on an operator's hot path.
How a view runs (once or ``--watch``) and prints is :mod:`cim_place.cli._views`.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Awaitable, Callable
from functools import partial
from typing import TYPE_CHECKING, Annotated, Any

import typer
from nats.js import JetStreamContext

from cim_place.cli._domain import CredsOption, DomainOption, ServerOption
from cim_place.cli._output import EXIT_ERROR, EXIT_USAGE, fail, handles_errors, print_json
from cim_place.cli._views import (
    JsonOption,
    QuietOption,
    Show,
    WatchOption,
    age_text,
    make_console,
    run_view,
    size_text,
)
from cim_place.cluster.state.overview import LATE_AFTER, STATES, node_state
from cim_place.cluster.state.overview import nodes as _nodes
from cim_place.cluster.state.overview import object_status as _object_status
from cim_place.cluster.state.overview import summary as _summary
from cim_place.cluster.state.overview import tasks as _tasks
from cim_place.errors import TransportError

if TYPE_CHECKING:
    from cim_place.cluster.state.cid_shards import ShardOwner
    from cim_place.placement.status import ObjectStatus

__all__ = ["LATE_AFTER", "node_state", "register"]

# -- status ---------------------------------------------------------------------------------------


def _show_summary(doc: dict[str, Any], *, as_json: bool, quiet: bool) -> None:
    if as_json:
        print_json(doc)
        return
    if quiet:
        return
    from rich.table import Table

    console = make_console()
    table = Table(title="objects", title_justify="left")
    table.add_column("state")
    table.add_column("objects", justify="right")
    for state, count in doc["by_state"].items():
        table.add_row(state, str(count))
    table.add_row("total", str(doc["objects"]), style="bold")
    console.print(table)
    nodes = doc["nodes"]
    console.print(
        f"under-replicated: {doc['under_replicated']}   damaged replicas: "
        f"{doc['damaged_replicas']}   lost: {doc['lost']}   bytes: {size_text(doc['bytes'])}   "
        f"nodes: {nodes['up']} up, {nodes['late']} late, {nodes['down']} down, "
        f"{nodes['draining']} draining",
        markup=False,
    )
    if doc.get("rejected_events"):
        console.print(
            f"rejected events: {doc['rejected_events']} (failed validation; see the "
            "controller's log and cim_place_rejected_events_total)",
            markup=False,
            style="yellow",
        )
    if doc["updated_at"]:
        console.print(f"summary written {age_text(time.time() - doc['updated_at'])}", markup=False)
    _show_warnings(console, doc["warnings"])
    if doc["note"]:
        console.print(f"note: {doc['note']}", markup=False, style="yellow")


def _show_warnings(console: Any, warnings: list[str]) -> None:
    """The controller's domain-wide warnings (policies the topology cannot satisfy), once each."""
    for warning in warnings:
        console.print(f"warning: {warning}", markup=False, style="yellow")


def _show_object(status: ObjectStatus, *, as_json: bool, quiet: bool) -> None:
    """Print one object's status; a removed object (`cim-place rm`) then ends with exit 1."""
    _print_object(status, as_json=as_json, quiet=quiet)
    if status.state == "removed":
        raise typer.Exit(EXIT_ERROR)


async def _object_and_shard(
    js: JetStreamContext, ref: str
) -> tuple[ObjectStatus, ShardOwner | None]:
    """The object's status and, with controller shards, its shard and that shard's leader."""
    from cim_place.cluster.state.cid_shards import shard_owner
    from cim_place.objectstore import cid as cids

    status = await _object_status(js, ref)
    owner = None
    with contextlib.suppress(TransportError):  # the status is worth printing without it
        owner = await shard_owner(js, cids.parse(status.cid))
    return status, owner


def _show_object_and_shard(
    doc: tuple[ObjectStatus, ShardOwner | None], *, as_json: bool, quiet: bool
) -> None:
    status, owner = doc
    if owner is None:  # one controller leads the whole domain: the output as it always was
        _show_object(status, as_json=as_json, quiet=quiet)
        return
    from cim_place.cluster.state.cid_shards import shard_range

    if as_json:
        print_json({**status.to_dict(), "shard": owner.to_dict()})
    else:
        _print_object(status, as_json=False, quiet=quiet)
        if not quiet:
            leader = owner.leader.leader_id if owner.leader else "nobody (its lease is free)"
            low, high = shard_range(owner.index, owner.shards)
            typer.echo(
                f"controller shard: {owner.index} of {owner.shards} (digests {low}..{high}), "
                f"led by {leader}"
            )
    if status.state == "removed":
        raise typer.Exit(EXIT_ERROR)


def _print_object(status: ObjectStatus, *, as_json: bool, quiet: bool) -> None:
    if as_json:
        print_json(status.to_dict())
        return
    if quiet:
        typer.echo(status.state)
        return
    from rich.table import Table

    console = make_console()
    colour = {
        "placed": "green",
        "progressing": "yellow",
        "degraded": "red",
        "lost": "bold red",
        "removed": "dim",
        "expired": "dim",
    }
    console.print(f"[bold]{status.cid}[/bold]" + (f"  ({status.name})" if status.name else ""))
    console.print(
        f"state: [{colour.get(status.state, 'white')}]{status.state}[/]   "
        f"policy: {status.policy or '-'}   copies: {status.pinned} pinned of {status.desired} "
        f"desired"
        + (f" ({status.damaged} damaged)" if status.damaged else "")
        + f"   size: {size_text(status.size)}"
    )
    table = Table(title="replicas", title_justify="left")
    # A cached copy says which demand caused it (docs/DEMAND.md); the column only when one does.
    causes = any(loc.cause for loc in status.locations)
    for column in ("node", "volume", "zone", "state", "verified", *(("cause",) if causes else ())):
        table.add_column(column)
    now = time.time()
    for loc in status.locations:
        verified = age_text(now - loc.verified_at) if loc.verified_at else ""
        cells = (loc.node, loc.volume, loc.zone, loc.state, verified)
        table.add_row(*cells, *((loc.cause,) if causes else ()))
    console.print(table)
    if status.conditions:
        conditions = Table(title="conditions", title_justify="left")
        for column in ("type", "status", "reason", "message", "since"):
            conditions.add_column(column)
        now = time.time()
        for c in status.conditions:
            since = age_text(now - c.last_transition) if c.last_transition else ""
            conditions.add_row(c.type, str(c.status), c.reason, c.message, since)
        console.print(conditions)


@handles_errors
def status_command(
    ref: Annotated[
        str | None, typer.Argument(help="A CID or a domain-wide name (none: the summary).")
    ] = None,
    watch: WatchOption = False,
    state: Annotated[
        str | None,
        typer.Option(
            "--state", "--filter", "-f", help="List objects in this state: " + " | ".join(STATES)
        ),
    ] = None,
    node: Annotated[
        str | None, typer.Option("--node", help="List objects with a location (copy) on this node.")
    ] = None,
    policy: Annotated[
        str | None, typer.Option("--policy", help="List objects placed by this policy.")
    ] = None,
    name: Annotated[
        str | None,
        typer.Option("--name", help="List objects whose name matches this glob ('docs/*')."),
    ] = None,
    after: Annotated[
        str | None,
        typer.Option("--after", help="List from after this CID (the previous page's last)."),
    ] = None,
    limit: Annotated[
        int | None, typer.Option("--limit", help="Objects per page, 1-1000 (default 100).")
    ] = None,
    every: Annotated[
        bool, typer.Option("--all", help="Follow the pages to the end of the listing.")
    ] = False,
    as_json: JsonOption = False,
    quiet: QuietOption = False,
    server: ServerOption = None,
    creds: CredsOption = None,
    domain: DomainOption = None,
) -> None:
    """Where objects live and whether they are healthy; list them by state, node, policy or name
    (pages ordered by CID, served by the controller's status index)."""
    from cim_place.cli import _listing

    listing = any(v is not None for v in (state, node, policy, name, after, limit))
    query = _listing.make_query(state, node, policy, name, after, 100 if limit is None else limit)
    if ref is not None and (listing or every):
        raise fail(
            "give a CID or NAME, or listing flags (--state, --node, --policy, --name, "
            "--after, --all), not both",
            EXIT_USAGE,
        )
    render: Callable[[JetStreamContext], Awaitable[Any]] = _summary
    show: Show = _show_summary
    if ref is not None:
        render, show = partial(_object_and_shard, ref=ref), _show_object_and_shard
    elif listing or every:
        render, show = partial(_listing.fetch, query=query, every=every), _listing.show_page
    run_view(server, creds, domain, render, show, watch=watch, as_json=as_json, quiet=quiet)


# -- nodes ----------------------------------------------------------------------------------------


async def _nodes_and_warnings(js: JetStreamContext) -> tuple[list[dict[str, Any]], list[str]]:
    from cim_place.cluster.state.locations import LocationStore

    nodes = await _nodes(js)
    warnings: list[str] = []
    with contextlib.suppress(TransportError):
        summary = await (await LocationStore(js).open(create=False)).summary()
        warnings = list(summary.warnings) if summary is not None else []
    return nodes, warnings


def _show_nodes_and_warnings(
    doc: tuple[list[dict[str, Any]], list[str]], *, as_json: bool, quiet: bool
) -> None:
    nodes, warnings = doc
    _show_nodes(nodes, as_json=as_json, quiet=quiet)
    if not as_json and not quiet:
        _show_warnings(make_console(), warnings)


def _show_nodes(nodes: list[dict[str, Any]], *, as_json: bool, quiet: bool) -> None:
    if as_json:
        print_json(nodes)
        return
    if quiet:
        for node in nodes:
            typer.echo(node["node"])
        return
    from rich.table import Table

    table = Table()
    for column in ("node", "state", "labels", "volumes", "used", "free", "heartbeat"):
        table.add_column(column, justify="right" if column in ("used", "free") else "left")
    style = {"up": "green", "late": "yellow", "draining": "cyan"}
    for node in nodes:
        labels = ", ".join(f"{k}={v}" for k, v in sorted(node["labels"].items()))
        if node["tags"]:
            labels += (", " if labels else "") + "tags: " + ", ".join(node["tags"])
        table.add_row(
            node["node"],
            f"[{style.get(node['state'], 'white')}]{node['state']}[/]",
            labels,
            ", ".join(v["name"] for v in node["volumes"]),
            size_text(node["used"]),
            size_text(node["free"]),
            age_text(node["heartbeat_age"]),
        )
    console = make_console()
    console.print(table)
    if not nodes:
        console.print("no node heartbeats: start agents (`cim-place up` or `cim-place agent`)")


@handles_errors
def nodes_command(
    watch: WatchOption = False,
    as_json: JsonOption = False,
    quiet: QuietOption = False,
    server: ServerOption = None,
    creds: CredsOption = None,
    domain: DomainOption = None,
) -> None:
    """Nodes with labels, volumes, used and free bytes, state and last heartbeat."""
    run_view(
        server,
        creds,
        domain,
        _nodes_and_warnings,
        _show_nodes_and_warnings,
        watch=watch,
        as_json=as_json,
        quiet=quiet,
    )


# -- tasks ----------------------------------------------------------------------------------------


def _show_tasks(doc: dict[str, Any], *, as_json: bool, quiet: bool) -> None:
    if as_json:
        print_json(doc)
        return
    if quiet:
        typer.echo(f"{doc['queued']} queued, {doc['running']} running, {len(doc['failed'])} failed")
        return
    from rich.table import Table

    console = make_console()
    table = Table(title="tasks per node", title_justify="left")
    for column in ("node", "queued", "running"):
        table.add_column(column, justify="left" if column == "node" else "right")
    for node, counts in doc["nodes"].items():
        table.add_row(node, str(counts["queued"]), str(counts["running"]))
    table.add_row("total", str(doc["queued"]), str(doc["running"]), style="bold")
    console.print(table)
    if doc["failed"]:
        failed = Table(title="recent failures", title_justify="left")
        for column in ("node", "action", "object", "attempts", "reason"):
            failed.add_column(column)
        for f in doc["failed"]:
            reason = f["reason"] + (" (permanent)" if f["permanent"] else "")
            failed.add_row(
                f["node"], f["action"] or "?", f["root"] or "?", str(f["attempts"]), reason
            )
        console.print(failed)
    else:
        console.print("no failed tasks")
    for note in doc["notes"]:
        console.print(f"note: {note}", markup=False, style="yellow")


@handles_errors
def tasks_command(
    limit: Annotated[
        int, typer.Option("--limit", min=1, help="How many recent failures to show.")
    ] = 20,
    watch: WatchOption = False,
    as_json: JsonOption = False,
    quiet: QuietOption = False,
    server: ServerOption = None,
    creds: CredsOption = None,
    domain: DomainOption = None,
) -> None:
    """Queued, running and failed tasks (with reasons)."""
    render = partial(_tasks, limit=limit)
    run_view(server, creds, domain, render, _show_tasks, watch=watch, as_json=as_json, quiet=quiet)


def register(app: typer.Typer) -> None:
    app.command("status")(status_command)
    app.command("nodes")(nodes_command)
    app.command("tasks")(tasks_command)

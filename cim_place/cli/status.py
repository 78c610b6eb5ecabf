"""`cim-place status`, `nodes` and `tasks`: what the domain holds, who holds it, what is pending.

Everything is read from the hub's materialised state, never by asking every node:

- ``status``: the domain summary and single objects from KV ``cim-place-locations``
  (:class:`cim_place.cluster.state.locations.LocationStore`, one KV get per object), names resolved
  through KV ``cim-place-names``; the ``--json`` schema is documented in ``docs/STATUS.md``;
- ``nodes``: heartbeats in KV ``cim-place-nodes``;
- ``tasks``: stream ``CIM_PLACE_TASKS`` (queued per node subject, running = the node consumer's
  ack-pending) and the recent ``TaskFailed`` events of ``CIM_PLACE_EVENTS``.

Heavy modules are imported inside the commands: ``status CID`` is on an operator's hot path.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections import deque
from collections.abc import Awaitable, Callable
from functools import partial
from typing import TYPE_CHECKING, Annotated, Any, Protocol

import typer
from nats.js import JetStreamContext

from cim_place.cli._domain import CredsOption, DomainOption, ServerOption, run_in_domain
from cim_place.cli._output import EXIT_ERROR, EXIT_USAGE, handles_errors, print_json
from cim_place.errors import CimPlaceError, TransportError

if TYPE_CHECKING:
    from cim_place.cluster.state.nodes import NodeRecord
    from cim_place.placement.status import ObjectStatus

LATE_AFTER = 15.0
"""Seconds without a heartbeat after which a node shows as ``late`` (the controller's default
``late_after``: 3 beats at the default 5 s); its record expires from the bucket after 30 s, and it
is then no longer listed."""
WATCH_INTERVAL = 1.0
_DRAIN_PREFIX = "drain."
"""Keys of KV ``cim-place-drain`` (``cim_place.cluster.controller.service.DRAIN_PREFIX``)."""
_PIPE_WIDTH = 240
_CLEAR = "\x1b[2J\x1b[H"  # clear the screen, cursor home
_STATES = ("placed", "progressing", "degraded", "lost", "removed", "expired")

JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON (schema: docs/STATUS.md).")]
QuietOption = Annotated[bool, typer.Option("--quiet", "-q", help="Print the bare minimum.")]
WatchOption = Annotated[
    bool, typer.Option("--watch", "-w", help="Refresh every second until Ctrl-C.")
]


# -- shared ---------------------------------------------------------------------------------------


class _Show(Protocol):
    """Prints what a view rendered: JSON, the bare minimum (``quiet``) or tables."""

    def __call__(self, rendered: Any, /, *, as_json: bool, quiet: bool) -> None: ...


def _run(
    server: str | None,
    creds: str | None,
    domain: str | None,
    render: Callable[[JetStreamContext], Awaitable[Any]],
    show: _Show,
    *,
    watch: bool,
    as_json: bool,
    quiet: bool,
) -> None:
    """Connect once; render and show once, or every second until Ctrl-C with ``watch``."""

    async def once(js: JetStreamContext) -> None:
        show(await render(js), as_json=as_json, quiet=quiet)

    async def repeatedly(js: JetStreamContext) -> None:
        while True:
            rendered = await render(js)
            if not as_json:  # JSON: one document per refresh, for tools that follow a stream
                sys.stdout.write(_CLEAR if sys.stdout.isatty() else "\n")
            show(rendered, as_json=as_json, quiet=quiet)
            await asyncio.sleep(WATCH_INTERVAL)

    if not watch:
        run_in_domain(server, creds, domain, once)
        return
    with contextlib.suppress(KeyboardInterrupt):
        run_in_domain(server, creds, domain, repeatedly)


def make_console() -> Any:
    """A rich console; output to a pipe gets whole lines (rich would cut tables to 80 columns)."""
    from rich.console import Console

    return Console(soft_wrap=True, width=None if sys.stdout.isatty() else _PIPE_WIDTH)


def _size(value: int) -> str:
    size = float(value)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{value} B"


def _age(seconds: float) -> str:
    if seconds < 0:
        seconds = 0
    if seconds < 120:
        return f"{seconds:.0f}s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m ago"
    return f"{seconds / 3600:.0f}h ago"


async def _draining(js: JetStreamContext) -> set[str]:
    """Nodes the controller drains: the ``drain.<node>`` keys of KV ``cim-place-drain``.

    Read here rather than through ``cim_place.cluster.controller.service.draining_nodes``:
    importing the
    controller (scheduler, metrics, reconciler) cost about 0.2 s of every ``cim-place status``.
    """
    from cim_place.cluster.nats import kv

    try:
        bucket = await js.key_value(kv.DRAIN)
        keys = await bucket.keys()
    except Exception:
        return set()  # no bucket, no keys, or unreadable: the drain list is only an annotation
    return {key[len(_DRAIN_PREFIX) :] for key in keys if key.startswith(_DRAIN_PREFIX)}


def node_state(record: NodeRecord, now: float, draining: set[str]) -> str:
    """``draining``, ``up`` (heartbeat within LATE_AFTER) or ``late``."""
    if record.node in draining:
        return "draining"
    return "up" if now - record.heartbeat_at <= LATE_AFTER else "late"


# -- status ---------------------------------------------------------------------------------------


async def _object_status(js: JetStreamContext, ref: str) -> ObjectStatus:
    from cim_place.cluster.state.locations import LocationStore
    from cim_place.cluster.state.names import NameRegistry
    from cim_place.objectstore import cid as cids

    try:
        cid_text = cids.to_str(cids.parse(ref.strip()))
        named = False
    except CimPlaceError:
        cid_text = cids.to_str(await NameRegistry(js).resolve(ref))
        named = True
    store = await LocationStore(js).open(create=False)
    status = await store.get(cid_text)
    if status is None:
        what = f"{ref} ({cid_text})" if named else cid_text
        raise CimPlaceError(
            f"unknown object {what}: the domain tracks no status for it; add it with "
            "`cim-place add --server LEAF FILE` (a new object appears once the controller "
            "has seen its ObjectStored event)"
        )
    return status


async def _summary(js: JetStreamContext) -> dict[str, Any]:
    from cim_place.cluster.state.locations import LocationStore

    states = [node["state"] for node in await _nodes(js)]
    summary = None
    note = ""
    try:
        summary = await (await LocationStore(js).open(create=False)).summary()
        if summary is None:
            note = "no summary yet: the controller writes one after its first pass"
    except TransportError as error:
        note = str(error)
    by_state = dict.fromkeys(_STATES, 0)
    if summary is not None:
        by_state.update(summary.by_state)
    return {
        "objects": summary.objects if summary else 0,
        "by_state": by_state,
        "under_replicated": summary.under_replicated if summary else 0,
        "damaged_replicas": summary.damaged_replicas if summary else 0,
        "lost": summary.lost if summary else 0,
        "bytes": summary.total_bytes if summary else 0,
        "rejected_events": summary.rejected_events if summary else 0,
        "nodes": {
            "up": states.count("up"),
            "late": states.count("late"),
            "down": summary.nodes_down if summary else 0,
            "draining": states.count("draining"),
        },
        "updated_at": summary.updated_at if summary else None,
        "warnings": list(summary.warnings) if summary else [],
        "note": note or None,
    }


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
        f"{doc['damaged_replicas']}   lost: {doc['lost']}   bytes: {_size(doc['bytes'])}   "
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
        console.print(f"summary written {_age(time.time() - doc['updated_at'])}", markup=False)
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
        + f"   size: {_size(status.size)}"
    )
    table = Table(title="replicas", title_justify="left")
    for column in ("node", "volume", "zone", "state", "verified"):
        table.add_column(column)
    now = time.time()
    for loc in status.locations:
        verified = _age(now - loc.verified_at) if loc.verified_at else ""
        table.add_row(loc.node, loc.volume, loc.zone, loc.state, verified)
    console.print(table)
    if status.conditions:
        conditions = Table(title="conditions", title_justify="left")
        for column in ("type", "status", "reason", "message", "since"):
            conditions.add_column(column)
        now = time.time()
        for c in status.conditions:
            since = _age(now - c.last_transition) if c.last_transition else ""
            conditions.add_row(c.type, str(c.status), c.reason, c.message, since)
        console.print(conditions)


async def _listing(js: JetStreamContext, state: str | None) -> list[ObjectStatus]:
    from cim_place.cluster.state.locations import LocationStore

    store = await LocationStore(js).open(create=False)
    return [status async for status in store.list(state=state)]


def _show_listing(statuses: list[ObjectStatus], *, as_json: bool, quiet: bool) -> None:
    if as_json:
        print_json([s.to_dict() for s in statuses])
        return
    if quiet:
        for s in statuses:
            typer.echo(s.cid)
        return
    from rich.table import Table

    table = Table()
    for column in ("cid", "name", "state", "copies", "policy", "size"):
        table.add_column(column)
    for s in statuses:
        table.add_row(
            s.cid, s.name or "", s.state, f"{s.pinned}/{s.desired}", s.policy, _size(s.size)
        )
    console = make_console()
    console.print(table)
    console.print(f"{len(statuses)} object(s)", markup=False)


@handles_errors
def status_command(
    ref: Annotated[
        str | None, typer.Argument(help="A CID or a domain-wide name (none: the summary).")
    ] = None,
    watch: WatchOption = False,
    filter_state: Annotated[
        str | None,
        typer.Option(
            "--filter", "-f", help="List the objects in this state: " + " | ".join(_STATES) + "."
        ),
    ] = None,
    as_json: JsonOption = False,
    quiet: QuietOption = False,
    server: ServerOption = None,
    creds: CredsOption = None,
    domain: DomainOption = None,
) -> None:
    """Where objects live and whether they are healthy (from the materialised locations)."""
    if filter_state is not None and filter_state not in _STATES:
        typer.echo(
            f"error: --filter {filter_state!r} is not a state; use one of {', '.join(_STATES)}",
            err=True,
        )
        raise typer.Exit(EXIT_USAGE)
    if ref is not None and filter_state is not None:
        typer.echo("error: give a CID or NAME, or --filter STATE, not both", err=True)
        raise typer.Exit(EXIT_USAGE)
    render: Callable[[JetStreamContext], Awaitable[Any]] = _summary
    show: _Show = _show_summary
    if ref is not None:
        render, show = partial(_object_status, ref=ref), _show_object
    elif filter_state is not None:
        render, show = partial(_listing, state=filter_state), _show_listing
    _run(server, creds, domain, render, show, watch=watch, as_json=as_json, quiet=quiet)


# -- nodes ----------------------------------------------------------------------------------------


async def _nodes(js: JetStreamContext) -> list[dict[str, Any]]:
    from cim_place.cluster.state.nodes import list_nodes

    records = await list_nodes(js)
    draining = await _draining(js)
    now = time.time()
    return [
        {
            "node": r.node,
            "state": node_state(r, now, draining),
            "labels": dict(r.labels),
            "tags": list(r.tags),
            "volumes": [
                {"name": v.name, "capacity": v.capacity, "used": v.used, "free": v.free}
                for v in r.volumes
            ],
            "used": sum(v.used for v in r.volumes),
            "free": sum(v.free for v in r.volumes),
            "version": r.version,
            "started_at": r.started_at,
            "heartbeat_at": r.heartbeat_at,
            "heartbeat_age": round(max(0.0, now - r.heartbeat_at), 3),
        }
        for r in records
    ]


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
            _size(node["used"]),
            _size(node["free"]),
            _age(node["heartbeat_age"]),
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
    _run(
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


async def _queue(js: JetStreamContext) -> tuple[dict[str, dict[str, int]], str | None]:
    """Per node: queued (waiting) and running (delivered, not yet acked) tasks."""
    import nats.errors
    import nats.js.errors

    from cim_place.cluster.nats.subjects import TASKS_STREAM, Subjects

    subjects = Subjects()
    try:
        info = await js.stream_info(TASKS_STREAM, subjects_filter=subjects.all_tasks)
        consumers = await js.consumers_info(TASKS_STREAM)
    except nats.js.errors.NotFoundError:
        return {}, f"stream {TASKS_STREAM} does not exist yet: no task was ever queued"
    except nats.errors.Error as error:
        raise TransportError(f"cannot read stream {TASKS_STREAM}: {error}") from error
    per_node: dict[str, dict[str, int]] = {}
    prefix = subjects.task("x")[:-1]
    for subject, count in (info.state.subjects or {}).items():
        node = subject[len(prefix) :] if subject.startswith(prefix) else subject
        per_node.setdefault(node, {"queued": 0, "running": 0})["queued"] += int(count)
    for consumer in consumers:
        name = consumer.name or ""
        if not name.startswith("tasks-"):
            continue
        node = name[len("tasks-") :]
        running = int(consumer.num_ack_pending or 0)
        entry = per_node.setdefault(node, {"queued": 0, "running": 0})
        entry["running"] = running
        # A work queue keeps a task until it is acked: the running ones are in the count too.
        entry["queued"] = max(0, entry["queued"] - running)
    return dict(sorted(per_node.items())), None


async def _failed(js: JetStreamContext, limit: int) -> tuple[list[dict[str, Any]], str | None]:
    """The last ``limit`` TaskFailed events, oldest first."""
    from cim_place.cluster.events.readers import EventReader
    from cim_place.cluster.events.types import TaskFailed
    from cim_place.cluster.nats.subjects import Subjects
    from cim_place.cluster.tasks.queue import TASK_FAILED
    from cim_place.objectstore import cid as cids

    reader = EventReader(js, filter_subject=f"{Subjects().prefix}.evt.*.{TASK_FAILED}")
    recent: deque[dict[str, Any]] = deque(maxlen=limit)
    try:
        remaining = await reader.pending()
        while remaining > 0:
            batch = await reader.fetch(timeout=1.0)
            if not batch:
                break
            remaining -= len(batch)
            for envelope in batch:
                try:
                    failed = TaskFailed.from_body(envelope.content.body)
                except CimPlaceError:
                    continue
                recent.append(
                    {
                        "task_id": failed.task_id,
                        "action": failed.action,
                        "node": failed.node,
                        "root": cids.to_str(failed.root) if failed.root is not None else None,
                        "volume": failed.volume,
                        "attempts": failed.attempts,
                        "permanent": failed.permanent,
                        "reason": failed.reason,
                        "sequence": envelope.sequence,
                    }
                )
    except TransportError as error:
        return [], f"failed tasks unknown: {error}"
    finally:
        await reader.close()
    return list(recent), None


async def _tasks(js: JetStreamContext, limit: int) -> dict[str, Any]:
    queue, queue_note = await _queue(js)
    failed, failed_note = await _failed(js, limit)
    return {
        "queued": sum(n["queued"] for n in queue.values()),
        "running": sum(n["running"] for n in queue.values()),
        "nodes": queue,
        "failed": failed,
        "notes": [n for n in (queue_note, failed_note) if n],
    }


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
    _run(server, creds, domain, render, _show_tasks, watch=watch, as_json=as_json, quiet=quiet)


def register(app: typer.Typer) -> None:
    app.command("status")(status_command)
    app.command("nodes")(nodes_command)
    app.command("tasks")(tasks_command)

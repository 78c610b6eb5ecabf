"""`cim-place name`: domain-wide names pointing at CIDs (set, get, ls, history, rm).

Every command reads or writes the KV bucket ``cim-place-names`` of the hub's JetStream domain,
reached through the server given with ``--server`` (a hub server or a leaf server).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated, Any, TypeVar

import typer

from cim_place.cli._domain import CredsOption, DomainOption, ServerOption, actor, run_in_domain
from cim_place.cli._output import JsonOption, handles_errors, print_json
from cim_place.cluster.state.name_record import NameRecord, UnknownNameError, check_name
from cim_place.cluster.state.names import NameRegistry
from cim_place.objectstore import cid as cids

app = typer.Typer(
    help="Domain-wide names for CIDs: set, get, ls, history, rm (history is kept).",
    no_args_is_help=True,
)

T = TypeVar("T")

NameArgument = Annotated[
    str,
    typer.Argument(
        help="The name: letters, digits and - _ / = . (not starting or ending with '.').",
        show_default=False,
    ),
]


def _if_revision(lowest: int, help: str) -> Any:
    """The ``--if-revision`` option of a command that writes (compare-and-set on the revision)."""
    return typer.Option("--if-revision", min=lowest, help=help, show_default=False)


def _with_registry(
    server: str | None,
    creds: str | None,
    domain: str | None,
    action: Callable[[NameRegistry], Awaitable[T]],
) -> T:
    return run_in_domain(server, creds, domain, lambda js: action(NameRegistry(js)))


def _line(record: NameRecord) -> str:
    by = f"  by {record.set_by}" if record.set_by else ""
    note = f"  # {record.note}" if record.note else ""
    return f"{record.cid_text}  {record.set_at}{by}{note}"


@app.command("set")
@handles_errors
def set_name(
    name: NameArgument,
    cid: Annotated[str, typer.Argument(help="The CID the name points at.", show_default=False)],
    note: Annotated[str, typer.Option("--note", "-m", help="Why: kept with this revision.")] = "",
    expect_revision: Annotated[
        int | None,
        _if_revision(
            0, "Write only if the name is at this revision (0: only if it does not exist)."
        ),
    ] = None,
    server: ServerOption = None,
    creds: CredsOption = None,
    domain: DomainOption = None,
) -> None:
    """Point NAME at CID (a new revision; the previous target stays in the history)."""
    # Checked before connecting, so a typo fails fast even with no domain around.
    check_name(name)
    target = cids.parse(cid)
    revision = _with_registry(
        server,
        creds,
        domain,
        lambda names: names.set(name, cid, by=actor(), note=note, expect_revision=expect_revision),
    )
    typer.echo(f"{name} -> {cids.to_str(target)} (revision {revision})")


@app.command("get")
@handles_errors
def get_name(
    name: NameArgument,
    server: ServerOption = None,
    creds: CredsOption = None,
    domain: DomainOption = None,
    as_json: JsonOption = False,
) -> None:
    """Print the CID NAME points at (only the CID, for scripts)."""
    check_name(name)
    record = _with_registry(server, creds, domain, lambda names: names.get(name))
    if record is None:
        raise UnknownNameError(f"no name `{name}`; list names with `cim-place name ls`")
    if as_json:
        print_json(record.to_dict())
    else:
        typer.echo(record.cid_text)


@app.command("ls")
@handles_errors
def list_names(
    prefix: Annotated[
        str | None,
        typer.Argument(help="Only names starting with this prefix.", show_default=False),
    ] = None,
    server: ServerOption = None,
    creds: CredsOption = None,
    domain: DomainOption = None,
    as_json: JsonOption = False,
) -> None:
    """List the names and the CIDs they point at."""
    records = _with_registry(server, creds, domain, lambda names: names.ls(prefix))
    if as_json:
        print_json([r.to_dict() for r in records])
        return
    if not records:
        typer.echo("no names (set one with `cim-place name set NAME CID`)", err=True)
        return
    width = max(len(r.name) for r in records)
    for record in records:
        typer.echo(f"{record.name:<{width}}  {_line(record)}")


@app.command("history")
@handles_errors
def history(
    name: NameArgument,
    server: ServerOption = None,
    creds: CredsOption = None,
    domain: DomainOption = None,
    as_json: JsonOption = False,
) -> None:
    """List the kept revisions of NAME, oldest first, removals included."""
    check_name(name)
    records = _with_registry(server, creds, domain, lambda names: names.history(name))
    if as_json:
        print_json([r.to_dict() for r in records])
        return
    if not records:
        raise UnknownNameError(f"name `{name}` has no history; list names with `cim-place name ls`")
    for record in records:
        what = "removed" if record.removed else "set"
        typer.echo(f"{record.revision:>6}  {what:<7}  {_line(record)}")


@app.command("rm")
@handles_errors
def remove(
    name: NameArgument,
    expect_revision: Annotated[
        int | None, _if_revision(1, "Remove only if the name is at this revision.")
    ] = None,
    server: ServerOption = None,
    creds: CredsOption = None,
    domain: DomainOption = None,
) -> None:
    """Remove NAME (the CID itself is untouched; the history keeps what NAME pointed at)."""
    check_name(name)
    revision = _with_registry(
        server,
        creds,
        domain,
        lambda names: names.rm(name, by=actor(), expect_revision=expect_revision),
    )
    typer.echo(f"removed {name} (revision {revision})")

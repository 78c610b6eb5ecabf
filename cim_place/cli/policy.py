"""`cim-place policy`: validate, apply and inspect replication policies.

``validate`` and ``schema`` need no domain; the other commands read or write the KV bucket
``cim-place-policies`` of the domain reached with ``--server`` (the hub).
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer
from nats.js import JetStreamContext

from cim_place.cli._domain import (
    CredsOption,
    DomainOption,
    ServerOption,
    actor,
    run_in_domain,
    run_with_connection,
)
from cim_place.cli._output import JsonOption, handles_errors, print_json
from cim_place.cluster.state.policies import PolicyStore, StoredSet
from cim_place.errors import InvalidCidError, PolicyError
from cim_place.objectstore import cid as cids
from cim_place.policies.codec import consumers_to_dict, policy_to_dict
from cim_place.policies.explain import Explanation, render, summarize
from cim_place.policies.explain import explain as explain_object
from cim_place.policies.problems import PolicyValidationError
from cim_place.policies.schema import policy_file_schema
from cim_place.policies.selectors import ObjectFacts
from cim_place.policies.validate import LoadedPolicies, load_paths

if TYPE_CHECKING:
    from cim_place.cli.placing import Placing

app = typer.Typer(
    help="Replication policies: validate, apply (atomic, all or none), diff, ls, show, history, "
    "rm, explain, schema.",
    no_args_is_help=True,
)

T = TypeVar("T")

FilesArgument = Annotated[
    list[Path],
    typer.Argument(help="Policy files (YAML), or directories of *.yaml files.", show_default=False),
]


@contextmanager
def _reporting_problems() -> Iterator[None]:
    """Print every problem of a failed validation before the one-line error."""
    try:
        yield
    except PolicyValidationError as exc:
        typer.echo(exc.report(), err=True)
        raise


def _load(files: list[Path]) -> LoadedPolicies:
    with _reporting_problems():
        return load_paths(str(f) for f in files)


def _with_store(
    server: str | None,
    creds: str | None,
    domain: str | None,
    action: Callable[[PolicyStore], Awaitable[T]],
    *,
    create: bool,
) -> T:
    async def run(js: JetStreamContext) -> T:
        return await action(await PolicyStore.open(js, create=create))

    return run_in_domain(server, creds, domain, run)


@app.command()
@handles_errors
def validate(files: FilesArgument, as_json: JsonOption = False) -> None:
    """Check policy files; report every problem with file:line:column and a hint."""
    loaded = _load(files)
    if as_json:
        print_json(
            {
                "policies": [policy_to_dict(p) for p in loaded.policy_set.policies],
                "consumers": consumers_to_dict(loaded.policy_set.consumers),
            }
        )
        return
    count = len(loaded.policy_set.policies)
    consumers = len(loaded.policy_set.consumers)
    typer.echo(f"ok: {count} polic{'y' if count == 1 else 'ies'}, {consumers} consumer(s)")
    for policy in loaded.policy_set.policies:
        typer.echo(f"  {policy.name}: {summarize(policy)}")


@app.command()
@handles_errors
def apply(
    files: FilesArgument,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Show what would change; write nothing.")
    ] = False,
    server: ServerOption = None,
    creds: CredsOption = None,
    domain: DomainOption = None,
    as_json: JsonOption = False,
) -> None:
    """Replace the applied policies with those of FILES, all at once (or none on any problem)."""
    loaded = _load(files)
    result = _with_store(
        server,
        creds,
        domain,
        lambda store: store.apply(loaded, dry_run=dry_run, actor=actor()),
        create=not dry_run,
    )
    if as_json:
        print_json(
            {"written": result.written, "revision": result.revision, **result.diff.to_dict()}
        )
        return
    typer.echo(result.diff.render())
    if dry_run:
        typer.echo("dry run: nothing applied")
    elif result.written:
        typer.echo(f"applied: revision {result.revision}")
    else:
        typer.echo(f"nothing to apply: revision {result.revision} already matches")


@app.command()
@handles_errors
def diff(
    files: FilesArgument,
    server: ServerOption = None,
    creds: CredsOption = None,
    domain: DomainOption = None,
    as_json: JsonOption = False,
) -> None:
    """Show what applying FILES would add, change and remove."""
    loaded = _load(files)
    result = _with_store(
        server, creds, domain, lambda store: store.apply(loaded, dry_run=True), create=False
    )
    if as_json:
        print_json({"revision": result.revision, **result.diff.to_dict()})
    else:
        typer.echo(result.diff.render())


def _read(
    server: str | None, creds: str | None, domain: str | None, revision: int | None = None
) -> StoredSet:
    return _with_store(server, creds, domain, lambda store: store.load(revision), create=False)


@app.command("ls")
@handles_errors
def list_policies(
    server: ServerOption = None,
    creds: CredsOption = None,
    domain: DomainOption = None,
    as_json: JsonOption = False,
) -> None:
    """List the applied policies, highest priority first."""
    stored = _read(server, creds, domain)
    policies = sorted(stored.policy_set.policies, key=lambda p: (-p.priority, p.name))
    if as_json:
        print_json(
            {
                "revision": stored.revision,
                "applied_at": stored.applied_at,
                "applied_by": stored.applied_by,
                "policies": [policy_to_dict(p) for p in policies],
                "consumers": consumers_to_dict(stored.policy_set.consumers),
            }
        )
        return
    if not policies:
        typer.echo("no policies applied (apply some with `cim-place policy apply FILE`)")
        return
    typer.echo(f"revision {stored.revision}, applied {stored.applied_at} by {stored.applied_by}")
    width = max(len(p.name) for p in policies)
    for p in policies:
        kind = "default" if p.is_default else f"prio {p.priority}"
        typer.echo(f"{p.name:<{width}}  {kind:<9}  {summarize(p)}")


@app.command()
@handles_errors
def show(
    name: Annotated[str, typer.Argument(help="Policy name.")],
    revision: Annotated[
        int | None,
        typer.Option("--revision", "-r", min=1, help="A revision of the set (see `history`)."),
    ] = None,
    server: ServerOption = None,
    creds: CredsOption = None,
    domain: DomainOption = None,
    as_json: JsonOption = False,
) -> None:
    """Show one applied policy as it was written (now, or at --revision)."""
    stored = _read(server, creds, domain, revision)
    policy = stored.policy_set.policy(name)
    if policy is None:
        at = f" at revision {revision}" if revision is not None else ""
        known = ", ".join(p.name for p in stored.policy_set.policies) or "none"
        raise PolicyError(f"no policy named {name!r}{at} (applied: {known})")
    source = stored.sources.get(name)
    if as_json:
        print_json(
            {
                "revision": stored.revision,
                "applied_at": stored.applied_at,
                "applied_by": stored.applied_by,
                "policy": policy_to_dict(policy),
                "source": {
                    "file": source.file if source else "",
                    "line": source.line if source else 0,
                    "text": source.text if source else "",
                },
            }
        )
        return
    where = f" from {source.file}:{source.line}" if source and source.file else ""
    typer.echo(
        f"# policy {name}, revision {stored.revision}, applied {stored.applied_at} "
        f"by {stored.applied_by}{where}"
    )
    typer.echo(f"# {summarize(policy)}")
    if source and source.text:
        typer.echo(source.text.rstrip("\n"))
    else:
        typer.echo(json.dumps(policy_to_dict(policy), indent=2))


@app.command()
@handles_errors
def history(
    name: Annotated[str, typer.Argument(help="Policy name.")],
    server: ServerOption = None,
    creds: CredsOption = None,
    domain: DomainOption = None,
    as_json: JsonOption = False,
) -> None:
    """List the revisions at which a policy was added, changed or removed."""
    revisions = _with_store(server, creds, domain, lambda s: s.history(name), create=False)
    if as_json:
        print_json(
            [
                {
                    "revision": r.revision,
                    "change": r.change,
                    "applied_at": r.applied_at,
                    "applied_by": r.applied_by,
                    "policy": r.policy,
                }
                for r in revisions
            ]
        )
        return
    if not revisions:
        raise PolicyError(f"policy {name!r} appears in no kept revision of the policy set")
    for r in revisions:
        typer.echo(f"{r.revision:>6}  {r.change:<8} {r.applied_at}  {r.applied_by}")


@app.command("rm")
@handles_errors
def remove(
    name: Annotated[str, typer.Argument(help="Policy name.")],
    server: ServerOption = None,
    creds: CredsOption = None,
    domain: DomainOption = None,
) -> None:
    """Remove one policy from the applied set (a new revision; history keeps the old one)."""
    result = _with_store(
        server, creds, domain, lambda s: s.remove(name, actor=actor()), create=True
    )
    typer.echo(result.diff.render())
    typer.echo(f"applied: revision {result.revision}")


@app.command()
@handles_errors
def explain(
    ref: Annotated[str, typer.Argument(help="The object: a CID, or a name.")],
    name: Annotated[
        str | None,
        typer.Option("--name", "-n", help="Object name (default: REF unless it is a CID)."),
    ] = None,
    owner: Annotated[str | None, typer.Option("--owner", help="Object owner.")] = None,
    meta: Annotated[
        list[str] | None, typer.Option("--meta", "-m", help="Metadata KEY=VALUE (repeatable).")
    ] = None,
    size: Annotated[int | None, typer.Option("--size", min=0, help="Size in bytes.")] = None,
    content_type: Annotated[
        str | None, typer.Option("--content-type", help="Content type, e.g. image/png.")
    ] = None,
    store: Annotated[
        Path | None,
        typer.Option("--store", help="Read the object's pin (name, owner, metadata, size) here."),
    ] = None,
    files: Annotated[
        list[Path] | None,
        typer.Option("--file", "-f", help="Use the policies of these files, not the domain's."),
    ] = None,
    server: ServerOption = None,
    creds: CredsOption = None,
    domain: DomainOption = None,
    as_json: JsonOption = False,
) -> None:
    """Explain which policy applies to an object and why; against a running domain, also where
    the planner places it and why each volume was taken or refused."""
    facts = _object_facts(ref, name, owner, meta or [], size, content_type, store)
    from_files = files is not None and len(files) > 0
    if from_files:
        explanation = explain_object(_load(files or []).policy_set, facts)
        if as_json:
            print_json(explanation.to_dict())
        else:
            typer.echo(render(explanation))
        return

    async def in_domain(nc: Any, js: JetStreamContext) -> tuple[Explanation, Placing | None]:
        from cim_place.cli.placing import place_in_domain
        from cim_place.cluster.controller.demand_api import request_demand

        stored = await (await PolicyStore.open(js, create=False)).load()
        found = await place_in_domain(js, ref, facts, stored.policy_set)
        placing = found.placing
        if placing is not None and found.facts.cid:
            lines = await request_demand(nc, found.facts.cid)
            placing = replace(placing, demand=tuple(lines))
        return explain_object(stored.policy_set, found.facts), placing

    explanation, placing = run_with_connection(server, creds, domain, in_domain)
    if as_json:
        doc = explanation.to_dict()
        doc["placement"] = placing.to_dict() if placing is not None else None
        print_json(doc)
        return
    typer.echo(render(explanation))
    if placing is not None:
        typer.echo(placing.render())


@app.command()
def schema() -> None:
    """Print the JSON Schema (draft 2020-12) of a policy file document, for editors."""
    print_json(policy_file_schema())


def _object_facts(
    ref: str,
    name: str | None,
    owner: str | None,
    meta: list[str],
    size: int | None,
    content_type: str | None,
    store: Path | None,
) -> ObjectFacts:
    metadata: dict[str, str] = {}
    cid_text = ""
    pin_name: str | None = None
    pin_owner = ""
    pin_size: int | None = None
    if store is not None:
        from cim_place.cli.objects import open_store_for_reading

        with open_store_for_reading(store) as objects:
            root = objects.resolve(ref)
            pin = objects.stat(root)
            cid_text = cids.to_str(root)
            if pin is not None:
                pin_name, pin_owner, pin_size = pin.name, pin.owner, pin.size
                metadata.update(pin.metadata)
    else:
        try:
            cid_text = cids.to_str(cids.parse(ref))
        except InvalidCidError:
            pin_name = ref
    for item in meta:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise PolicyError(f"--meta {item!r} is not KEY=VALUE")
        metadata[key] = value
    ctype = content_type or metadata.get("content-type") or metadata.get("content_type")
    return ObjectFacts(
        cid=cid_text,
        name=name if name is not None else pin_name,
        owner=owner if owner is not None else pin_owner,
        metadata=metadata,
        size=size if size is not None else pin_size,
        content_type=ctype,
    )

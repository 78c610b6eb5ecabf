"""`cim-place s3 key create|ls|rm`: the access keys of the domain's S3 API.

Keys live in the KV bucket ``cim-place-s3-keys`` of the hub's JetStream domain, reached through
``--server`` (a hub or leaf server). The secret is printed once, by ``create``; ``ls`` never
shows it. docs/S3.md says why the server stores secrets (SigV4 needs them).
"""

from __future__ import annotations

import time
from typing import Annotated

import typer

from cim_place.cli._domain import CredsOption, DomainOption, ServerOption, actor, run_in_domain
from cim_place.cli._output import JsonOption, handles_errors, print_json
from cim_place.http.s3.keys import KeyStore

app = typer.Typer(help="The S3-compatible API: access keys.", no_args_is_help=True)
key_app = typer.Typer(
    help="S3 access keys: create (secret shown once), ls, rm.", no_args_is_help=True
)
app.add_typer(key_app, name="key")


@key_app.command("create")
@handles_errors
def create(
    note: Annotated[str, typer.Option("--note", "-m", help="What the key is for.")] = "",
    server: ServerOption = None,
    creds: CredsOption = None,
    domain: DomainOption = None,
    json_output: JsonOption = False,
) -> None:
    """Create an access key; its secret is shown now and never again."""
    key = run_in_domain(
        server, creds, domain, lambda js: KeyStore(js).create(note=note, created_by=actor())
    )
    if json_output:
        print_json(key.to_context())
        return
    typer.echo(f"access key: {key.access_key}")
    typer.echo(f"secret key: {key.secret_key}")
    typer.echo(f"region:     {key.region} (any region a request is signed for is accepted)")
    typer.echo("The secret is not shown again; keep it now.")


@key_app.command("ls")
@handles_errors
def ls(
    server: ServerOption = None,
    creds: CredsOption = None,
    domain: DomainOption = None,
    json_output: JsonOption = False,
) -> None:
    """List the access keys (never their secrets)."""
    keys = run_in_domain(server, creds, domain, lambda js: KeyStore(js).ls())
    if json_output:
        print_json(
            [
                {
                    "access_key": k.access_key,
                    "created_at": k.created_at,
                    "created_by": k.created_by,
                    "note": k.note,
                    "operator": k.operator,
                }
                for k in keys
            ]
        )
        return
    for key in keys:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(key.created_at))
        extra = " operator" if key.operator else ""
        note = f"  # {key.note}" if key.note else ""
        typer.echo(f"{key.access_key}  {when}  {key.created_by}{extra}{note}")


@key_app.command("rm")
@handles_errors
def rm(
    access_key: Annotated[str, typer.Argument(help="The access key id.", show_default=False)],
    server: ServerOption = None,
    creds: CredsOption = None,
    domain: DomainOption = None,
) -> None:
    """Remove an access key: requests signed with it are refused (within 2 s on every node)."""
    run_in_domain(server, creds, domain, lambda js: KeyStore(js).rm(access_key))
    typer.echo(f"removed {access_key}")

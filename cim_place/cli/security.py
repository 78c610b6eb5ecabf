"""`cim-place security gen`: the NATS users of a domain, with least privilege, as config files.

The generated files are included by the nats-server configs in ``deploy/nats`` (see
``docs/DEPLOY.md``); ``docs/SECURITY.md`` explains the model.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from cim_place.cli._output import handles_errors
from cim_place.cluster.nats.security import SecurityConfigError
from cim_place.cluster.nats.subjects import DEFAULT_PREFIX, HUB_DOMAIN, Subjects
from cim_place.cluster.nats.users import plan_domain, render_files

app = typer.Typer(
    help="NATS users and permissions of a domain (see docs/SECURITY.md).", no_args_is_help=True
)


def _readers(specs: list[str]) -> dict[str, str | None]:
    """``NAME`` (connects to the hub) or ``NAME@NODE`` (connects to that leaf)."""
    readers: dict[str, str | None] = {}
    for spec in specs:
        name, sep, home = spec.partition("@")
        if not name or (sep and not home):
            raise SecurityConfigError(f"--reader {spec!r} is not NAME or NAME@NODE")
        if name in readers:
            raise SecurityConfigError(f"--reader {name!r} is given twice")
        readers[name] = home or None
    return readers


@app.command("gen")
@handles_errors
def gen_command(
    out: Annotated[Path, typer.Option("--out", "-o", help="Directory to write the files to.")],
    node: Annotated[
        list[str], typer.Option("--node", help="A leaf node id (repeatable).", show_default=False)
    ],
    reader: Annotated[
        list[str] | None,
        typer.Option("--reader", help="A user: NAME (on the hub) or NAME@NODE (repeatable)."),
    ] = None,
    hub_url: Annotated[
        list[str] | None,
        typer.Option("--hub-url", help="A hub client URL, e.g. tls://hub-1.cim.internal:4222."),
    ] = None,
    hub_leaf_url: Annotated[
        list[str] | None,
        typer.Option(
            "--hub-leaf-url", help="A hub leafnode URL, e.g. tls://hub-1.cim.internal:7422."
        ),
    ] = None,
    leaf_url: Annotated[
        str, typer.Option("--leaf-url", help="How users reach their leaf; {node} is replaced.")
    ] = "nats://127.0.0.1:4222",
    prefix: Annotated[str, typer.Option("--prefix", help="Subject prefix.")] = DEFAULT_PREFIX,
    hub_domain: Annotated[str, typer.Option("--hub-domain", help="The hub's domain.")] = HUB_DOMAIN,
    force: Annotated[
        bool, typer.Option("--force", help="Overwrite existing files (new passwords).")
    ] = False,
) -> None:
    """Generate accounts, users and permissions for a hub and its leaves."""
    plan = plan_domain(
        node, readers=_readers(reader or []), subjects=Subjects(prefix), hub_domain=hub_domain
    )
    files = render_files(
        plan,
        hub_client_urls=hub_url or ["tls://hub-1:4222", "tls://hub-2:4222", "tls://hub-3:4222"],
        hub_leaf_urls=hub_leaf_url or ["tls://hub-1:7422", "tls://hub-2:7422", "tls://hub-3:7422"],
        leaf_client_url=leaf_url,
    )
    existing = [name for name in files if (out / name).exists()]
    if existing and not force:
        raise SecurityConfigError(
            f"{out / existing[0]} exists (and {len(existing) - 1} more); regenerating changes "
            "every password, so pass --force to overwrite, or choose another --out"
        )
    for name, text in sorted(files.items()):
        path = out / name
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        # Passwords: readable by the owner only, from the moment the file exists.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
    typer.echo(f"wrote {len(files)} files to {out} (see docs/DEPLOY.md for where they go)")

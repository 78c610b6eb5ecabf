"""The `cim-place` Typer application: the composition root of every command.

Each command group lives in its own module and registers itself on ``app`` here.
"""

from __future__ import annotations

import typer

from cim_place import __version__
from cim_place.cli import agent, controller, names, objects, policy, security, status, up

app = typer.Typer(
    name="cim-place",
    help="Distributed object placement and replication for CIM domains.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"cim-place {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """Distributed object placement and replication for CIM domains."""


objects.register(app)
agent.register(app)
controller.register(app)
up.register(app)
status.register(app)
app.add_typer(policy.app, name="policy")
app.add_typer(names.app, name="name")
app.add_typer(security.app, name="security")


def main() -> None:
    app()

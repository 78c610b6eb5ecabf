"""The `cim-place` Typer application: the composition root of every command.

Each command group lives in its own module and registers itself on ``app`` here.
"""

from __future__ import annotations

import typer

app = typer.Typer(
    name="cim-place",
    help="Distributed object placement and replication for CIM domains.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


def main() -> None:
    app()

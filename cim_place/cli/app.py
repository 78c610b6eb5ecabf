"""The `cim-place` Typer application: the composition root of every command.

Each command group lives in its own module and registers itself here. ``main`` (the console
script) registers only the group of the command being run: importing every group costs a
quarter of a second (the agent, the object store, rich's progress bars), which `cim-place status
CID` would otherwise pay on every call. ``--help``, no command, an unknown one and shell
completion get the whole application (:data:`app`, also what the tests drive).
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Iterable
from typing import TYPE_CHECKING

from cim_place import __version__

if TYPE_CHECKING:
    import typer

# Top-level command -> the module that registers it (with ``register(app)``, or as ``app``).
_OWNERS = {
    **dict.fromkeys(("cid", "add", "cat", "export", "import", "pins", "gc"), "objects"),
    **dict.fromkeys(("agent", "get"), "agent"),
    **dict.fromkeys(("controller", "node"), "controller"),
    **dict.fromkeys(("up", "down"), "up"),
    **dict.fromkeys(("status", "nodes", "tasks"), "status"),
    "policy": "policy",
    "name": "names",
    "security": "security",
    "rm": "remove",
    "scrub": "scrub",
    "s3": "s3",
}
_GROUPS = {"policy": "policy", "names": "name", "security": "security", "s3": "s3"}
"""Modules whose commands form a sub-application, by the name it is mounted under."""


def _version(value: bool) -> None:
    import typer

    if value:
        typer.echo(f"cim-place {__version__}")
        raise typer.Exit()


def create_app(modules: Iterable[str] | None = None) -> typer.Typer:
    """The application with the commands of ``modules`` (default: all of them)."""
    import typer

    application = typer.Typer(
        name="cim-place",
        help="Distributed object placement and replication for CIM domains.",
        no_args_is_help=True,
        pretty_exceptions_enable=False,
        context_settings={"help_option_names": ["-h", "--help"]},
    )

    @application.callback()
    def root(
        version: bool = typer.Option(
            False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
        ),
    ) -> None:
        """Distributed object placement and replication for CIM domains."""

    chosen = dict.fromkeys(_OWNERS.values()) if modules is None else dict.fromkeys(modules)
    for name in chosen:
        module = importlib.import_module(f"cim_place.cli.{name}")
        if name in _GROUPS:
            application.add_typer(module.app, name=_GROUPS[name])
        else:
            module.register(application)
    return application


def _command(argv: list[str]) -> str | None:
    """The top-level command in ``argv`` (the first argument that is not an option)."""
    for argument in argv:
        if not argument.startswith("-"):
            return argument
    return None


def _silence_stdout() -> None:
    """Point standard output at /dev/null, so that flushing it at exit raises nothing more."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())


def main() -> None:
    argv = sys.argv[1:]
    try:
        from cim_place.cli.fast import try_run

        code = try_run(argv)
        if code is not None:
            sys.stdout.flush()
            sys.exit(code)
        command = _command(argv)
        owner = _OWNERS.get(command or "")
        completing = any(key.endswith("_COMPLETE") for key in os.environ)
        create_app(None if owner is None or completing else [owner])()
    except BrokenPipeError:
        # The reader went away (`| head`): nothing left to say, and nobody to say it to.
        _silence_stdout()
        sys.exit(1)


_whole: typer.Typer | None = None


def __getattr__(name: str) -> typer.Typer:
    """``app``: every command (what ``--help`` lists and the tests drive), built on first use so
    that importing :func:`main` does not import every command group."""
    global _whole
    if name != "app":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if _whole is None:
        _whole = create_app()
    return _whole

"""Shared CLI behaviour: one-line errors, exit codes, JSON output.

Exit codes: 0 ok, 1 error (a CimPlaceError: bad input, missing content, unreachable domain),
2 usage (Typer's own). Errors print as one line on stderr so scripts can log them.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import wraps
from typing import Annotated, Any, ParamSpec, TypeVar

import typer

from cim_place.errors import CimPlaceError

P = ParamSpec("P")
R = TypeVar("R")

JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON instead of text.")]
"""The --json switch every command with structured output takes."""

EXIT_ERROR = 1
EXIT_USAGE = 2


def fail(message: str, code: int = EXIT_ERROR) -> typer.Exit:
    """Print ``message`` as one line on stderr; return the Exit to raise."""
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


@contextmanager
def errors_as_exit() -> Iterator[None]:
    """Turn a CimPlaceError (or an OSError the store did not wrap) into one line and exit 1."""
    try:
        yield
    except CimPlaceError as exc:
        raise fail(str(exc)) from None
    except BrokenPipeError:
        raise  # standard output closed: the console script ends silently (cli/app.py)
    except OSError as exc:
        where = f" ({exc.filename})" if exc.filename else ""
        raise fail(f"{exc.strerror or exc}{where}") from None


def handles_errors(func: Callable[P, R]) -> Callable[P, R]:
    """Decorator form of :func:`errors_as_exit` for command functions."""

    @wraps(func)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        with errors_as_exit():
            return func(*args, **kwargs)

    return wrapper


def print_json(value: Any) -> None:
    json.dump(value, sys.stdout, indent=2, sort_keys=True)
    sys.stdout.write("\n")

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
    """Turn a CimPlaceError (or an OSError the store did not wrap, or an error of the NATS
    client a command did not wrap) into one line and exit 1."""
    try:
        yield
    except CimPlaceError as exc:
        raise fail(str(exc)) from None
    except BrokenPipeError:
        raise  # standard output closed: the console script ends silently (cli/app.py)
    except TimeoutError as exc:
        # An OSError too, but one without strerror: it would print as "error: " alone.
        said = f": {exc}" if str(exc) else ""
        raise fail(f"the NATS servers did not answer in time{said}") from None
    except OSError as exc:
        where = f" ({exc.filename})" if exc.filename else ""
        raise fail(f"{exc.strerror or exc}{where}") from None
    except Exception as exc:
        # An error of the NATS client that a command did not wrap in a TransportError (a
        # JetStream API answer while a hub server is lost and its streams elect, say) is still
        # an unreachable or refusing domain: one line, not a traceback. Anything else is a bug.
        if type(exc).__module__.partition(".")[0] != "nats":
            raise
        detail = str(exc) or type(exc).__name__
        raise fail(f"the NATS servers refused or did not answer: {detail}; try again") from None


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

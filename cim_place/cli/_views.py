"""What the views of ``status``, ``nodes`` and ``tasks`` share: how they run and how they print.

This module owns the one-shot or ``--watch`` runner of a view (:func:`run_view`: connect once,
render and show, again every second until Ctrl-C), the console (whole lines into a pipe), the
size and age texts, and the options every view takes (``--json``, ``--quiet``, ``--watch``).
Like the commands, it imports nothing heavy at module level (rich is imported where it prints).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, Protocol

import typer
from nats.js import JetStreamContext

from cim_place.cli._domain import run_in_domain

__all__ = [
    "JsonOption",
    "QuietOption",
    "Show",
    "WatchOption",
    "age_text",
    "make_console",
    "run_view",
    "size_text",
]

WATCH_INTERVAL = 1.0
_PIPE_WIDTH = 240
_CLEAR = "\x1b[2J\x1b[H"  # clear the screen, cursor home

JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON (schema: docs/STATUS.md).")]
QuietOption = Annotated[bool, typer.Option("--quiet", "-q", help="Print the bare minimum.")]
WatchOption = Annotated[
    bool, typer.Option("--watch", "-w", help="Refresh every second until Ctrl-C.")
]


class Show(Protocol):
    """Prints what a view rendered: JSON, the bare minimum (``quiet``) or tables."""

    def __call__(self, rendered: Any, /, *, as_json: bool, quiet: bool) -> None: ...


def run_view(
    server: str | None,
    creds: str | None,
    domain: str | None,
    render: Callable[[JetStreamContext], Awaitable[Any]],
    show: Show,
    *,
    watch: bool,
    as_json: bool,
    quiet: bool,
) -> None:
    """Connect once; render and show once, or every second until Ctrl-C with ``watch``."""

    async def once(js: JetStreamContext) -> None:
        show(await render(js), as_json=as_json, quiet=quiet)

    async def repeatedly(js: JetStreamContext) -> None:
        # Ctrl-C (or SIGTERM) ends the loop between refreshes, not by cancelling the task:
        # a cancellation that meets a reply arriving at the same moment can be lost inside
        # nats-py's request (asyncio.wait_for), and the watch would go on forever.
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        while not stop.is_set():
            rendered = await render(js)
            if stop.is_set():
                break
            if not as_json:  # JSON: one document per refresh, for tools that follow a stream
                sys.stdout.write(_CLEAR if sys.stdout.isatty() else "\n")
            show(rendered, as_json=as_json, quiet=quiet)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), WATCH_INTERVAL)

    if not watch:
        run_in_domain(server, creds, domain, once)
        return
    with contextlib.suppress(KeyboardInterrupt):
        run_in_domain(server, creds, domain, repeatedly)


def make_console() -> Any:
    """A rich console; output to a pipe gets whole lines (rich would cut tables to 80 columns)."""
    from rich.console import Console

    return Console(soft_wrap=True, width=None if sys.stdout.isatty() else _PIPE_WIDTH)


def size_text(value: int) -> str:
    size = float(value)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{value} B"


def age_text(seconds: float) -> str:
    if seconds < 0:
        seconds = 0
    if seconds < 120:
        return f"{seconds:.0f}s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m ago"
    return f"{seconds / 3600:.0f}h ago"

"""Reading the file a command imports: standard input or a path, a progress bar, ``cid``.

No Typer here: :mod:`cim_place.cli.fast` runs ``cid`` from this module alone.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from cim_place.errors import StoreError
from cim_place.objectstore import cid as cids
from cim_place.objectstore.unixfs import DEFAULT_PROFILE, get_profile, import_file


@contextmanager
def open_input(path: str) -> Iterator[tuple[BinaryIO, int | None]]:
    """The file to import (``-`` for stdin) and its size when known, with a clear error."""
    if path == "-":
        yield sys.stdin.buffer, None
        return
    source = Path(path)
    if source.is_dir():
        raise StoreError(f"{path} is a directory; cim-place adds files (one at a time)")
    try:
        handle = source.open("rb")
    except OSError as exc:
        raise StoreError(f"cannot read {path}: {exc.strerror or exc}") from None
    with handle:
        yield handle, os.fstat(handle.fileno()).st_size


@contextmanager
def progress_bar(total: int | None, label: str) -> Iterator[Callable[[int], None] | None]:
    """A byte progress bar on stderr when it is a terminal; otherwise no callback at all."""
    if not sys.stderr.isatty():
        yield None
        return
    from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        transient=True,
        console=None,
    ) as bar:
        task = bar.add_task(label, total=total)
        yield lambda n: bar.advance(task, n)


def compute_cid(file: str, profile: str | None = None) -> str:
    """The root CID ``file`` (``-``: standard input) gets under ``profile``, storing nothing."""
    chosen = get_profile(profile or DEFAULT_PROFILE)
    with open_input(file) as (stream, size), progress_bar(size, "hashing") as progress:
        result = import_file(stream, None, chosen, progress=progress)
    return cids.to_str(result.root)

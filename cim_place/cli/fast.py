"""`cim-place cid FILE [--profile P]` without Typer: the one command scripts call per file.

Typer (with the pydantic it builds every parameter's validator from) costs about 60-80 ms of the
cold start, more than hashing a small file; ``cid`` needs none of it. :func:`try_run` handles
only the plain forms of the command and answers None for anything else (``--help``, an unknown
option, a missing argument), which then goes to the Typer application, so usage errors and help
look the same as for every other command. The output and the error messages are the Typer
command's (tests/cli/test_cli_speed.py compares both paths).
"""

from __future__ import annotations

import sys

from cim_place.errors import CimPlaceError

_PROFILE_OPTIONS = ("--profile", "-p")


def _parse(argv: list[str]) -> tuple[str, str | None] | None:
    """(file, profile) when ``argv`` (after ``cid``) is a plain form; else None."""
    file: str | None = None
    profile: str | None = None
    index = 0
    while index < len(argv):
        argument = argv[index]
        if argument in _PROFILE_OPTIONS and index + 1 < len(argv) and profile is None:
            profile = argv[index + 1]
            index += 2
            continue
        if argument.startswith("--profile=") and profile is None:
            profile = argument.partition("=")[2]
        elif argument == "-" or not argument.startswith("-"):
            if file is not None:
                return None
            file = argument
        else:
            return None
        index += 1
    return None if file is None else (file, profile)


def try_run(argv: list[str]) -> int | None:
    """Run ``cid`` for ``argv`` (the arguments after the program name) and return its exit code;
    None when ``argv`` is not a plain ``cid`` invocation."""
    if not argv or argv[0] != "cid":
        return None
    parsed = _parse(argv[1:])
    if parsed is None:
        return None
    file, profile = parsed
    from cim_place.cli._files import compute_cid  # no Typer on this path

    try:
        text = compute_cid(file, profile)
    except CimPlaceError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 1
    except OSError as exc:
        where = f" ({exc.filename})" if exc.filename else ""
        sys.stderr.write(f"error: {exc.strerror or exc}{where}\n")
        return 1
    sys.stdout.write(text + "\n")
    return 0

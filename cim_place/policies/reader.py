"""Reading plain YAML values with positions into typed values, recording a problem for each fault.

:class:`YamlReader` is shared by every file cim-place reads (policy sets, the agent's and the
controller's configuration), so each reports the same way: every problem at once, with
file:line:column, what was wrong and what to write instead.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Sequence
from typing import TypeVar

from cim_place.policies import quantities
from cim_place.policies.loader import INVALID, Path, YamlFile

T = TypeVar("T")


class YamlReader:
    """Typed reads of one file's plain values; a fault is recorded on the file, never raised."""

    def __init__(self, f: YamlFile) -> None:
        self.f = f

    def problem(self, path: Path, message: str, hint: str = "", *, key: bool = False) -> None:
        self.f.problem(path, message, hint, key=key)

    def expect(self, value: object, path: Path, kind: type[T], what: str) -> T | None:
        if value is INVALID:
            return None
        if isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
            return value
        if isinstance(value, bool) and kind in (str, list):
            hint = "YAML reads yes/no/on/off/true/false as booleans; quote the value"
        elif value is None:
            hint = "give a value, or remove the key"
        elif kind is str:
            hint = "quote the value"
        elif kind is int:
            hint = "write a whole number without quotes, e.g. 3"
        elif kind is dict:
            hint = "write `key: value` pairs, indented under the key (see docs/POLICIES.md)"
        else:
            hint = "write a list, e.g. [a, b], or one `- item` per line"
        self.problem(path, f"expected {what}, got {quantities.type_name(value)}", hint)
        return None

    def known_keys(
        self, mapping: dict[str, object], path: Path, allowed: Sequence[str], what: str
    ) -> None:
        for key in mapping:
            if key not in allowed:
                close = difflib.get_close_matches(key, allowed, n=1)
                hint = f"did you mean `{close[0]}`?" if close else f"allowed: {', '.join(allowed)}"
                if key == "<<":
                    hint = "YAML merge keys are not supported; write the keys out"
                self.problem((*path, key), f"unknown key {key!r} in {what}", hint, key=True)

    def mapping(
        self, value: object, path: Path, allowed: Sequence[str], what: str
    ) -> dict[str, object] | None:
        m = self.expect(value, path, dict, f"a mapping for {what}")
        if m is not None:
            self.known_keys(m, path, allowed, what)
        return m

    def string(
        self,
        value: object,
        path: Path,
        what: str,
        pattern: re.Pattern[str] | None = None,
        hint: str = "",
    ) -> str | None:
        s = self.expect(value, path, str, f"a string for {what}")
        if s is None:
            return None
        if pattern is not None and not pattern.match(s):
            self.problem(path, f"{s!r} is not a valid {what}", hint)
            return None
        return s

    def integer(self, value: object, path: Path, what: str, low: int, high: int) -> int | None:
        n = self.expect(value, path, int, f"a whole number for {what}")
        if n is None:
            return None
        if not low <= n <= high:
            self.problem(
                path,
                f"{what} must be between {low} and {high}, got {n}",
                f"use a whole number from {low} to {high}",
            )
            return None
        return n

    def strings(
        self,
        value: object,
        path: Path,
        what: str,
        pattern: re.Pattern[str] | None = None,
        hint: str = "",
    ) -> tuple[str, ...] | None:
        """One string or a list of strings, duplicates dropped; None when a problem was found."""
        if isinstance(value, str):
            items: list[object] = [value]
            paths = [path]
        else:
            got = self.expect(value, path, list, f"a string or a list of strings for {what}")
            if got is None:
                return None
            items = got
            paths = [(*path, i) for i in range(len(items))]
            if not items:
                self.problem(
                    path,
                    f"the list for {what} is empty",
                    "list at least one value, or remove the key",
                )
                return None
        result: list[str] = []
        ok = True
        for item, item_path in zip(items, paths, strict=True):
            s = self.string(item, item_path, what, pattern, hint)
            if s is None or not s:
                if s == "":
                    self.problem(item_path, f"empty string in {what}")
                ok = False
            else:
                result.append(s)
        return tuple(dict.fromkeys(result)) if ok else None

    def duration(self, value: object, path: Path, what: str) -> int | None:
        if value is INVALID:
            return None
        try:
            return quantities.parse_duration(value)
        except ValueError as exc:
            self.problem(path, f"{what}: {exc}", quantities.DURATION_HINT)
            return None

    def size(self, value: object, path: Path, what: str, *, per_second: bool = False) -> int | None:
        if value is INVALID:
            return None
        try:
            return quantities.parse_size(value, per_second=per_second)
        except ValueError as exc:
            self.problem(
                path,
                f"{what}: {exc}",
                quantities.SIZE_HINT + (" (optionally /s)" if per_second else ""),
            )
            return None

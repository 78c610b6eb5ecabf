"""Configuration files of long-running processes (agent, controller): shared reader and error.

Both files are read like policy files (:class:`cim_place.policies.reader.YamlReader`): every
problem at once, with file:line:column, and nothing is started while any remains.
"""

from __future__ import annotations

from collections.abc import Sequence

from cim_place.errors import CimPlaceError
from cim_place.policies.loader import Path as YamlPath
from cim_place.policies.problems import Problem
from cim_place.policies.quantities import DURATION_HINT, parse_duration
from cim_place.policies.reader import YamlReader


class ConfigFileError(CimPlaceError):
    """A configuration file (agent or controller) is invalid; nothing was started."""

    def __init__(self, problems: Sequence[Problem]) -> None:
        self.problems = tuple(sorted(problems))
        lines = "\n".join(f"  {p}" for p in self.problems)
        count = len(self.problems)
        super().__init__(
            f"{count} problem{'s' if count != 1 else ''} in the configuration:\n{lines}"
        )


class ConfigChecker(YamlReader):
    """The reads a configuration file needs beyond the shared ones."""

    def section(self, value: object, path: YamlPath, keys: set[str]) -> dict[str, object]:
        """A mapping whose unknown keys are reported and left out; {} when it is not one."""
        if not isinstance(value, dict):
            self.problem(path, "expected a mapping", "write key: value pairs")
            return {}
        for key in value:
            if key not in keys:
                known = ", ".join(sorted(keys))
                self.problem((*path, key), f"unknown key {key!r}", f"known keys: {known}", key=True)
        return {k: v for k, v in value.items() if k in keys}

    def text(self, value: object, path: YamlPath, what: str) -> str | None:
        if isinstance(value, str) and value:
            return value
        self.problem(path, f"{what} must be a non-empty string")
        return None

    def positive(self, value: object, path: YamlPath, what: str) -> int | None:
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
        self.problem(path, f"{what} must be a positive whole number, got {value!r}")
        return None

    def positive_duration(self, value: object, path: YamlPath, what: str) -> float | None:
        try:
            seconds = parse_duration(value)
        except ValueError as exc:
            self.problem(path, f"{what}: {exc}", DURATION_HINT)
            return None
        if seconds <= 0:
            self.problem(path, f"{what} must be longer than zero", DURATION_HINT)
            return None
        return float(seconds)

"""Problems found in policy files, and the error that carries all of them at once.

A problem names the file, line and column (1-based, as editors count), what is wrong, and a hint
saying what to do. Validation never stops at the first problem: the operator fixes a file in one
pass, and nothing is applied while any problem remains.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from cim_place.errors import PolicyError


@dataclass(frozen=True, slots=True, order=True)
class Problem:
    source: str
    line: int
    column: int
    message: str
    hint: str = ""

    def __str__(self) -> str:
        hint = f" ({self.hint})" if self.hint else ""
        return f"{self.source}:{self.line}:{self.column}: {self.message}{hint}"


class PolicyValidationError(PolicyError):
    """One or more problems in policy files; nothing was applied."""

    def __init__(self, problems: Sequence[Problem]) -> None:
        self.problems: tuple[Problem, ...] = tuple(sorted(problems))
        count = len(self.problems)
        first = str(self.problems[0]) if self.problems else "no details"
        more = f" (and {count - 1} more)" if count > 1 else ""
        super().__init__(
            f"{count} problem{'s' if count != 1 else ''} in policy files, nothing applied: "
            f"{first}{more}"
        )

    def report(self) -> str:
        """Every problem, one per line, in file order."""
        return "\n".join(str(p) for p in self.problems)

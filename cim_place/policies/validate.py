"""Validation of policy files: plain values with positions in, a PolicySet out, or every problem.

This module loads files and checks what spans policies and files (unique names, one default,
declared consumers); the per-field rules (what an operator may write) live in
:mod:`cim_place.policies.policy_reader` and nowhere else. docs/POLICIES.md describes the
same format for people and :mod:`cim_place.policies.schema` for editors. Validation never stops
at the first problem and never raises anything but PolicyValidationError.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from cim_place.policies import quantities
from cim_place.policies.loader import INVALID, Path, YamlFile, read_file, read_text
from cim_place.policies.model import Consumer, Policy, PolicySet
from cim_place.policies.policy_limits import SET_KEYS
from cim_place.policies.policy_reader import PolicyReader
from cim_place.policies.problems import PolicyValidationError, Problem

__all__ = [
    "LoadedPolicies",
    "PolicySource",
    "consumers_from_dict",
    "load_paths",
    "load_text",
    "policy_from_dict",
    "validate_files",
]

YAML_SUFFIXES = (".yaml", ".yml")


@dataclass(frozen=True, slots=True)
class PolicySource:
    """Where a policy was written: the file, the line, and its YAML text (comments included)."""

    file: str
    line: int
    text: str


@dataclass(frozen=True, slots=True)
class LoadedPolicies:
    """A validated set of policies and consumers, with the source of every policy."""

    policy_set: PolicySet
    sources: Mapping[str, PolicySource] = field(default_factory=dict)
    files: tuple[str, ...] = ()


def load_paths(paths: Iterable[str]) -> LoadedPolicies:
    """Read and validate policy files (a directory means its *.yaml and *.yml files).

    Raises PolicyValidationError with every problem of every file.
    """
    files: list[YamlFile] = []
    problems: list[Problem] = []
    for path in paths:
        if os.path.isdir(path):
            names = sorted(n for n in os.listdir(path) if n.endswith(YAML_SUFFIXES))
            if not names:
                problems.append(Problem(path, 1, 1, "no .yaml or .yml files in this directory", ""))
            files.extend(read_file(os.path.join(path, n)) for n in names)
        else:
            files.append(read_file(path))
    return validate_files(files, extra_problems=problems)


def load_text(text: str, source: str = "<text>") -> LoadedPolicies:
    """Validate policy YAML given as text (tests, stdin)."""
    return validate_files([read_text(text, source)])


def validate_files(
    files: Sequence[YamlFile], *, extra_problems: Sequence[Problem] = ()
) -> LoadedPolicies:
    """Validate composed files together: names are unique across all of them, and a consumer may
    be declared in any of them."""
    checker = _SetChecker()
    for f in files:
        checker.read_file(f)
    return checker.finish(files, extra_problems)


def policy_from_dict(value: object, source: str) -> Policy:
    """Rebuild a Policy from its canonical dict (as stored in KV) with the same rules as files.

    Consumers are not checked here: the stored set was validated as a whole when applied.
    """
    f = YamlFile(source=source, text="", documents=[value])
    reader = PolicyReader(f)
    policy = reader.policy(value, (0,))
    if f.problems or policy is None:
        raise PolicyValidationError(f.problems or [Problem(source, 1, 1, "not a policy")])
    return policy


def consumers_from_dict(value: object, source: str) -> tuple[Consumer, ...]:
    """Rebuild consumers from ``{name: {label: value}}`` (as stored in KV)."""
    f = YamlFile(source=source, text="", documents=[value])
    consumers = PolicyReader(f).consumers(value, (0,))
    if f.problems:
        raise PolicyValidationError(f.problems)
    return tuple(c for c, _ in consumers)


class _SetChecker:
    """Checks that span policies and files: unique names, one default, declared consumers."""

    def __init__(self) -> None:
        self.policies: list[tuple[Policy, YamlFile, Path]] = []
        self.consumers: dict[str, tuple[Consumer, YamlFile, Path]] = {}
        self.near_refs: list[tuple[str, YamlFile, Path]] = []
        self.names: list[tuple[str, YamlFile, Path]] = []
        self.problems: list[Problem] = []
        self.syntax_error = False

    def read_file(self, f: YamlFile) -> None:
        reader = PolicyReader(f)
        self.syntax_error |= f.syntax_error
        for index, doc in enumerate(f.documents):
            path: Path = (index,)
            if doc is None or doc is INVALID:
                continue
            if isinstance(doc, list):
                self._policies(reader, doc, path)
            elif isinstance(doc, dict) and "name" not in doc and set(doc) & set(SET_KEYS):
                reader.known_keys(doc, path, SET_KEYS, "a document of policies and consumers")
                if "policies" in doc:
                    items = reader.expect(doc["policies"], (*path, "policies"), list, "a list")
                    if items is not None:
                        self._policies(reader, items, (*path, "policies"))
                if "consumers" in doc:
                    for consumer, cpath in reader.consumers(doc["consumers"], (*path, "consumers")):
                        self._consumer(consumer, f, cpath)
            elif isinstance(doc, dict):
                self._policy(reader, doc, path)
            else:
                f.problem(
                    path,
                    f"a document must be a policy, a list of policies, or a mapping with "
                    f"`policies:` and `consumers:`; got {quantities.type_name(doc)}",
                    "start a policy with `name: ...`",
                )
        self.near_refs.extend((name, f, p) for name, p in reader.near_refs)
        self.names.extend((name, f, p) for name, p in reader.names)
        self.problems.extend(f.problems)

    def _policies(self, reader: PolicyReader, items: list[object], path: Path) -> None:
        for i, item in enumerate(items):
            self._policy(reader, item, (*path, i))

    def _policy(self, reader: PolicyReader, value: object, path: Path) -> None:
        policy = reader.policy(value, path)
        if policy is not None:
            self.policies.append((policy, reader.f, path))

    def _consumer(self, consumer: Consumer, f: YamlFile, path: Path) -> None:
        first = self.consumers.get(consumer.name)
        if first is None:
            self.consumers[consumer.name] = (consumer, f, path)
        elif dict(first[0].labels) != dict(consumer.labels):
            line, _ = first[1].positions.of(first[2], key=True)
            f.problem(
                path,
                f"consumer {consumer.name!r} is declared again with different labels",
                f"first declared at {first[1].source}:{line}; declare it once, or identically",
                key=True,
            )

    def finish(self, files: Sequence[YamlFile], extra: Sequence[Problem]) -> LoadedPolicies:
        problems = [*extra, *self.problems]
        seen: dict[str, tuple[YamlFile, Path]] = {}
        for name, f, path in self.names:
            if name in seen:
                problems.append(
                    self._problem(
                        f,
                        (*path, "name"),
                        f"duplicate policy name {name!r}",
                        f"first defined at {self._where(*seen[name])}; rename one",
                    )
                )
            else:
                seen[name] = (f, path)
        default: Policy | None = None
        for policy, f, path in self.policies:
            if policy.is_default:
                if default is not None:
                    problems.append(
                        self._problem(
                            f,
                            (*path, "name"),
                            f"policy {policy.name!r} has no `match`, but {default.name!r} is "
                            "already the default policy",
                            "give one of them a `match:`; only one default policy is allowed",
                        )
                    )
                default = policy
        # A syntax error may hide the document that declares a consumer: do not accuse.
        if not self.syntax_error:
            for name, f, path in self.near_refs:
                if name not in self.consumers:
                    declared = ", ".join(sorted(self.consumers)) or "none"
                    problems.append(
                        self._problem(
                            f,
                            path,
                            f"consumer {name!r} is not declared",
                            f"declare it under `consumers:` with its node labels; "
                            f"declared: {declared}",
                        )
                    )
        if problems:
            raise PolicyValidationError(problems)
        unique = {p.name: (p, f, path) for p, f, path in reversed(self.policies)}
        sources = {
            name: PolicySource(f.source, f.positions.of(path)[0], f.text_of(path))
            for name, (_, f, path) in unique.items()
        }
        return LoadedPolicies(
            policy_set=PolicySet(
                policies=tuple(sorted((p for p, _, _ in unique.values()), key=lambda p: p.name)),
                consumers=tuple(
                    sorted((c for c, _, _ in self.consumers.values()), key=lambda c: c.name)
                ),
            ),
            sources=dict(sorted(sources.items())),
            files=tuple(f.source for f in files),
        )

    @staticmethod
    def _where(f: YamlFile, path: Path) -> str:
        line, column = f.positions.of(path)
        return f"{f.source}:{line}:{column}"

    @staticmethod
    def _problem(f: YamlFile, path: Path, message: str, hint: str) -> Problem:
        line, column = f.positions.of(path)
        return Problem(f.source, line, column, message, hint)

"""Reading policy YAML with positions: every value keeps the line and column it came from.

PyYAML's ``compose`` gives nodes that carry their start marks; this module turns them into plain
Python values (dicts, lists, scalars) plus a table of positions keyed by path, so the validator
works on plain data and still reports ``file:line:column``. Duplicate keys, alias cycles, exotic
tags and syntax errors become problems here; nothing in a file can make this module raise
anything but PolicyError.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final

import yaml
import yaml.reader
from yaml.constructor import ConstructorError, SafeConstructor
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from cim_place.policies.problems import Problem

Path = tuple[str | int, ...]
"""Where a value sits: document index, then mapping keys and list indices."""


class _Invalid:
    """A value the loader already reported; the validator skips it silently."""

    def __repr__(self) -> str:
        return "INVALID"


INVALID: Final = _Invalid()

MAX_NODES = 100_000
"""Aliases can multiply a small file into a huge tree; stop well before memory does."""
MAX_DEPTH = 64

# libyaml's composer is about ten times faster than the pure-Python one; its marks carry the
# same character-based lines, columns and indices.
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

_PLAIN_SCALAR_TAGS = {
    "tag:yaml.org,2002:str",
    "tag:yaml.org,2002:int",
    "tag:yaml.org,2002:float",
    "tag:yaml.org,2002:bool",
    "tag:yaml.org,2002:null",
}


@dataclass(slots=True)
class Positions:
    """Line/column (1-based) of every value, of every mapping key, and the text span of
    every collection."""

    values: dict[Path, tuple[int, int]] = field(default_factory=dict)
    keys: dict[Path, tuple[int, int]] = field(default_factory=dict)
    spans: dict[Path, tuple[int, int]] = field(default_factory=dict)

    def of(self, path: Path, *, key: bool = False) -> tuple[int, int]:
        """Position of the value (or of its key) at ``path``, else of the nearest parent."""
        if key and path in self.keys:
            return self.keys[path]
        while path:
            if path in self.values:
                return self.values[path]
            path = path[:-1]
        return (1, 1)


@dataclass(slots=True)
class YamlFile:
    """A policy file read into plain values: one entry in ``documents`` per YAML document."""

    source: str
    text: str
    documents: list[object] = field(default_factory=list)
    positions: Positions = field(default_factory=Positions)
    problems: list[Problem] = field(default_factory=list)
    syntax_error: bool = False

    def problem(self, path: Path, message: str, hint: str = "", *, key: bool = False) -> None:
        line, column = self.positions.of(path, key=key)
        self.problems.append(Problem(self.source, line, column, message, hint))

    def text_of(self, path: Path) -> str:
        """The source text of the collection at ``path`` (a policy), or "" when unknown."""
        span = self.positions.spans.get(path)
        return self.text[span[0] : span[1]].rstrip() + "\n" if span else ""


def read_text(text: str, source: str) -> YamlFile:
    """Compose every document of ``text``; syntax errors become problems, never exceptions."""
    loaded = YamlFile(source=source, text=text)
    converter = _Converter(loaded)
    try:
        for index, node in enumerate(yaml.compose_all(text, Loader=_LOADER)):
            loaded.documents.append(converter.convert(node, (index,), 0, frozenset()))
    except yaml.MarkedYAMLError as exc:
        loaded.syntax_error = True
        mark = exc.problem_mark or exc.context_mark
        line, column = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        what = exc.problem or exc.context or "invalid YAML"
        context = f" {exc.context}" if exc.context and exc.problem else ""
        loaded.problems.append(
            Problem(
                source,
                line,
                column,
                f"YAML syntax error: {what}{context}",
                "check indentation, colons and quoting near this position",
            )
        )
    except yaml.reader.ReaderError as exc:
        # Control characters: the error carries a character offset, not a mark.
        loaded.syntax_error = True
        before = text[: max(exc.position, 0)]
        line = before.count("\n") + 1
        column = len(before) - (before.rfind("\n") + 1) + 1
        char = exc.character
        code = char if isinstance(char, int) else ord(char[:1] or "\0")
        loaded.problems.append(
            Problem(
                source,
                line,
                column,
                f"YAML cannot contain the character U+{code:04X}",
                "remove control characters; save the file as plain UTF-8 text",
            )
        )
    except yaml.YAMLError as exc:
        loaded.syntax_error = True
        message = " ".join(str(exc).split())
        loaded.problems.append(
            Problem(source, 1, 1, f"YAML error: {message}", "save the file as plain UTF-8 text")
        )
    except RecursionError:
        loaded.syntax_error = True
        loaded.problems.append(
            Problem(source, 1, 1, "YAML nesting is too deep", "policy files nest a few levels")
        )
    return loaded


def read_file(path: str) -> YamlFile:
    """Read and compose a policy file from disk (UTF-8)."""
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except UnicodeDecodeError as exc:
        loaded = YamlFile(source=path, text="", syntax_error=True)
        loaded.problems.append(
            Problem(path, 1, 1, f"not UTF-8 text: {exc.reason}", "save the file as UTF-8")
        )
        return loaded
    return read_text(text, path)


class _Converter:
    def __init__(self, loaded: YamlFile) -> None:
        self.loaded = loaded
        self.nodes = 0
        self.too_big = False
        self.constructor = SafeConstructor()

    def _mark(self, path: Path, node: Node) -> None:
        self.loaded.positions.values.setdefault(
            path, (node.start_mark.line + 1, node.start_mark.column + 1)
        )

    def convert(self, node: Node, path: Path, depth: int, active: frozenset[int]) -> object:
        self.nodes += 1
        if self.nodes > MAX_NODES:
            if not self.too_big:
                self.too_big = True
                self.loaded.problem(
                    path, f"the file expands to more than {MAX_NODES} values", "avoid aliases"
                )
            return INVALID
        self._mark(path, node)
        if depth > MAX_DEPTH:
            self.loaded.problem(path, "nesting is too deep", "policy files nest a few levels")
            return INVALID
        if id(node) in active:
            self.loaded.problem(path, "an alias refers to itself", "remove the recursive alias")
            return INVALID
        if isinstance(node, ScalarNode):
            return self._scalar(node, path)
        if isinstance(node, SequenceNode | MappingNode):
            self.loaded.positions.spans.setdefault(
                path, (node.start_mark.index, node.end_mark.index)
            )
        inner = active | {id(node)}
        if isinstance(node, SequenceNode):
            if node.tag != "tag:yaml.org,2002:seq":
                return self._unsupported(node, path)
            return [
                self.convert(item, (*path, i), depth + 1, inner)
                for i, item in enumerate(node.value)
            ]
        if isinstance(node, MappingNode):
            if node.tag != "tag:yaml.org,2002:map":
                return self._unsupported(node, path)
            return self._mapping(node, path, depth, inner)
        return self._unsupported(node, path)

    def _mapping(
        self, node: MappingNode, path: Path, depth: int, active: frozenset[int]
    ) -> dict[str, object]:
        result: dict[str, object] = {}
        for key_node, value_node in node.value:
            key_pos = (key_node.start_mark.line + 1, key_node.start_mark.column + 1)
            key = self._scalar(key_node, path) if isinstance(key_node, ScalarNode) else None
            if key is INVALID:
                continue
            if not isinstance(key, str):
                self.loaded.problems.append(
                    Problem(
                        self.loaded.source,
                        *key_pos,
                        "a key must be a plain string",
                        "quote the key, e.g. \"on\": or '1':",
                    )
                )
                continue
            child = (*path, key)
            if key in result:
                first = self.loaded.positions.keys.get(child, key_pos)
                self.loaded.problems.append(
                    Problem(
                        self.loaded.source,
                        *key_pos,
                        f"duplicate key {key!r}",
                        f"it is already set at line {first[0]}; keep one of them",
                    )
                )
                continue
            self.loaded.positions.keys[child] = key_pos
            result[key] = self.convert(value_node, child, depth + 1, active)
        return result

    def _scalar(self, node: ScalarNode, path: Path) -> object:
        if node.tag not in _PLAIN_SCALAR_TAGS:
            return self._unsupported(node, path)
        try:
            return self.constructor.construct_object(node, deep=True)
        except (ConstructorError, ValueError, OverflowError) as exc:
            self.loaded.problem(path, f"cannot read this value: {exc}", "quote it as a string")
            return INVALID

    def _unsupported(self, node: Node, path: Path) -> object:
        tag = node.tag.replace("tag:yaml.org,2002:", "!!")
        self.loaded.problem(
            path,
            f"unsupported YAML tag {tag}",
            "policy files use plain mappings, lists, strings and numbers; quote the value",
        )
        return INVALID

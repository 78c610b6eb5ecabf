"""The dependency rules of the package layout (docs/ARCHITECTURE.md), checked on the source.

Every ``import`` and ``from ... import`` of every module under ``cim_place`` is read with ``ast``
(imports inside functions too: a lazy import is still a dependency), and each rule below names the
packages a folder may not reach. A new module lands in a room; this test keeps the rooms apart.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "cim_place"

# (the importing package, what it must never import, why)
RULES: list[tuple[str, tuple[str, ...], str]] = [
    (
        "cim_place.objectstore",
        (
            "cim_place.policies",
            "cim_place.placement",
            "cim_place.cluster",
            "cim_place.local",
            "cim_place.cli",
            "cim_place.http",
            "cim_place.comms",
            "nats",
        ),
        "the object store is the bottom layer",
    ),
    (
        "cim_place.policies",
        (
            "cim_place.placement",
            "cim_place.cluster",
            "cim_place.local",
            "cim_place.cli",
            "cim_place.http",
            "cim_place.comms",
            "nats",
        ),
        "policies are pure: YAML in, a model out",
    ),
    (
        "cim_place.placement",
        (
            "cim_place.cluster",
            "cim_place.local",
            "cim_place.cli",
            "cim_place.http",
            "cim_place.comms",
            "nats",
        ),
        "the planner and reconciler are pure functions",
    ),
    (
        "cim_place.runtime",
        ("cim_place.cluster", "cim_place.local", "cim_place.cli"),
        "process plumbing serves every role and knows none",
    ),
    (
        "cim_place.cluster.nats",
        (
            "cim_place.cluster.events",
            "cim_place.cluster.state",
            "cim_place.cluster.tasks",
            "cim_place.cluster.exchange",
            "cim_place.cluster.agent",
            "cim_place.cluster.controller",
            "cim_place.local",
            "cim_place.cli",
        ),
        "the NATS layer is below every other part of cluster",
    ),
    (
        "cim_place.cluster.events",
        (
            "cim_place.cluster.state",
            "cim_place.cluster.exchange",
            "cim_place.cluster.agent",
            "cim_place.cluster.controller",
            "cim_place.local",
            "cim_place.cli",
        ),
        "the event log knows no consumer",
    ),
    (
        "cim_place.cluster.exchange",
        (
            "cim_place.cluster.agent",
            "cim_place.cluster.controller",
            "cim_place.local",
            "cim_place.cli",
        ),
        "moving blocks knows no role",
    ),
    (
        "cim_place.cluster.state",
        (
            "cim_place.cluster.agent",
            "cim_place.cluster.controller",
            "cim_place.local",
            "cim_place.cli",
        ),
        "shared state knows no role",
    ),
    (
        "cim_place.cluster.tasks",
        (
            "cim_place.cluster.agent",
            "cim_place.cluster.controller",
            "cim_place.local",
            "cim_place.cli",
        ),
        "the queue knows no role",
    ),
    (
        "cim_place.cluster.agent",
        ("cim_place.cluster.controller", "cim_place.local", "cim_place.cli"),
        "agent and controller never import each other",
    ),
    (
        "cim_place.cluster.controller",
        ("cim_place.cluster.agent", "cim_place.local", "cim_place.cli"),
        "agent and controller never import each other",
    ),
    (
        "cim_place.http",
        ("cim_place.cluster.controller", "cim_place.local", "cim_place.cli"),
        "HTTP serves content and state, it does not place",
    ),
    (
        "cim_place.comms",
        (
            "cim_place.cluster.agent",
            "cim_place.cluster.controller",
            "cim_place.local",
            "cim_place.cli",
        ),
        "application messaging talks to agents over NATS",
    ),
    ("cim_place.local", ("cim_place.cli",), "the local domain is a library the CLI uses"),
]


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def _within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


MODULES = {_module_name(p): _imports(p) for p in sorted(PACKAGE.rglob("*.py"))}


@pytest.mark.parametrize(("package", "forbidden", "why"), RULES, ids=[r[0] for r in RULES])
def test_dependency_rule(package: str, forbidden: tuple[str, ...], why: str) -> None:
    broken = sorted(
        f"{module} imports {name}"
        for module, names in MODULES.items()
        if _within(module, package)
        for name in names
        for banned in forbidden
        if _within(name, banned)
    )
    assert not broken, f"{package}: {why}:\n  " + "\n  ".join(broken)


def test_no_relative_imports() -> None:
    relative = [
        str(p.relative_to(PACKAGE.parent))
        for p in PACKAGE.rglob("*.py")
        if any(
            isinstance(n, ast.ImportFrom) and n.level > 0
            for n in ast.walk(ast.parse(p.read_text()))
        )
    ]
    assert not relative, "absolute imports only, so a module's room is visible: " + ", ".join(
        relative
    )


def test_every_package_says_what_it_owns() -> None:
    silent = [
        str(init.relative_to(PACKAGE.parent))
        for init in PACKAGE.rglob("__init__.py")
        if not ast.get_docstring(ast.parse(init.read_text()))
    ]
    assert not silent, "an __init__ without a docstring: " + ", ".join(silent)

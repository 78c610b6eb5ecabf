"""README.md stays true: every shell command in it runs, in order, against a real local domain.

The convention (also stated at the top of README.md's source):

- The commands are the lines of the ```sh (or ```bash) fenced blocks. A line ending in ``\\``
  continues on the next; a line holding only a comment continues the previous line's comment.
- Each ``## `` section runs in a fresh directory holding a copy of the repository's ``deploy/``
  (paths such as ``deploy/prometheus/alerts.yaml`` are relative to a clone). Commands of a section
  run one after the other with ``bash`` in that directory; a variable assigned by a command
  (``CID=$(cim-place add ...)``) is set for the later commands of the section.
- A command exits 0, unless its trailing comment says ``exit N`` or ``exit code N``.
- A ```yaml block whose first line is ``# FILE`` is written to FILE in the section's directory
  (``shop.yaml``) before the commands that follow it.
- A command with ``--watch`` runs as written until it has printed its first refresh and had time
  for another, then gets Ctrl-C (SIGINT to its process group), as a person would stop it; it
  must exit 0. The test then waits for what the README says the watch shows (:data:`WAITS`, in
  README order), polling the same view with ``--json``, with a generous hang guard. A command
  that shows something "seconds later" has a WAITS entry too (the blocks freed after ``rm``).
- What cannot run inside a test is listed in :data:`NOT_RUN` with the reason and where it is
  covered; every other command runs, and an entry no longer in the README fails the test.

The domain is the README's own ``cim-place up``: real nats-server, agent and controller processes
on free loopback ports (``up`` never takes 4222: cim_place.local.server_spec.free_port).
Nothing here measures time; the timeouts are hang guards.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import warnings
from pathlib import Path
from typing import Any

import pytest
from readme_shell import BIN, ROOT, Command, FileBlock, Shell, Wait, environment, read_readme

README = ROOT / "README.md"

NOT_RUN: dict[str, str] = {
    "make demo": "creates .venv and runs `python -m cim_place.demo` (its own domain, 24 MiB); "
    "tests/local/test_demo.py runs that module",
    "make test": "the test suite itself, of which this test is a part; CI runs it (.ci/run)",
}
"""Commands of the README that cannot run inside this test: the reason, and what covers them."""

REQUIRES = {"promtool": "Debian's prometheus package (scripts/install-test-deps.sh)"}
"""Commands from system packages: installed like `make test` does; skipped, with a warning, when
they cannot be (tests/local/test_alerts.py skips the same way)."""


# -- what the README says a command shows after a while -------------------------------------


def _pinned(doc: Any) -> dict[str, str]:
    """node -> zone of the pinned copies of a `status CID --json` document."""
    if not isinstance(doc, dict):
        return {}
    return {
        str(loc["node"]): str(loc.get("zone"))
        for loc in doc.get("locations", [])
        if loc.get("state") == "pinned"
    }


def _settled(doc: Any) -> bool:
    """Placed, 3 copies pinned in 3 zones, nothing else in flight."""
    if not isinstance(doc, dict) or doc.get("state") != "placed":
        return False
    pinned = _pinned(doc)
    others = [loc for loc in doc.get("locations", []) if loc.get("state") not in ("pinned", "lost")]
    return len(pinned) == 3 and len(set(pinned.values())) == 3 and not others


def _placed(shell: Shell) -> bool:
    return _settled(shell.run_json("status", "docs/report.pdf"))


def _moved_to_the_consumer(shell: Shell) -> bool:
    doc = shell.run_json("status", "docs/report.pdf")
    return _settled(doc) and doc["policy"] == "documents" and "leaf-5" in _pinned(doc)


def _leaf1_gone(shell: Shell) -> bool:
    nodes = shell.run_json("nodes")
    if not isinstance(nodes, list):
        return False
    states = {str(n["node"]): n.get("state") for n in nodes}
    return bool(states.get("leaf-1", "down") == "down")


def _repaired(shell: Shell) -> bool:
    doc = shell.run_json("status", "docs/report.pdf")
    if not _settled(doc):
        return False
    lost = {loc["node"] for loc in doc["locations"] if loc.get("state") == "lost"}
    return "leaf-4" in _pinned(doc) and "leaf-1" not in _pinned(doc) and lost == {"leaf-1"}


def _blocks_freed(shell: Shell) -> bool:
    """No block file left on any volume (report.pdf was the only object added)."""
    volumes = list(shell.cwd.glob(".cim-place/nodes/*/v0/blocks"))
    try:
        held = [
            path
            for volume in volumes
            for path in volume.rglob("*")
            if path.is_file() and not path.relative_to(volume).parts[0].startswith(".")
        ]
    except FileNotFoundError:
        return False  # the collection removed a directory under the walk: not settled yet
    return bool(volumes) and not held


WAITS = [
    Wait("cim-place status docs/report.pdf --watch", "placed: 3 copies in 3 zones", _placed),
    Wait(
        "cim-place status docs/report.pdf --watch",
        "policy documents, a copy at the consumer (leaf-5), the old one dropped",
        _moved_to_the_consumer,
    ),
    Wait("cim-place nodes --watch", "leaf-1 down or gone from the list", _leaf1_gone),
    Wait(
        "cim-place status docs/report.pdf --watch",
        "repaired on leaf-4, the leaf-1 copy lost",
        _repaired,
    ),
    Wait(
        "du -sb .cim-place/nodes/*/v0",
        "the removed object's blocks freed on every node",
        _blocks_freed,
        comment="seconds later",
    ),
]
"""In README order; every `--watch` command has one."""


def _available(program: str) -> bool:
    if shutil.which(program) is None:
        subprocess.run(["sh", str(ROOT / "scripts" / "install-test-deps.sh")], check=False)
    return shutil.which(program) is not None


# -- the tests ----------------------------------------------------------------------------------


def test_the_convention_reads_the_readme() -> None:
    """The reader finds the README's commands, comments, exit codes and files (no domain)."""
    sections = read_readme(README.read_text())
    commands = [s for section in sections for s in section.steps if isinstance(s, Command)]
    texts = [c.code for c in commands]
    assert "cim-place up --leaves 5 --zones 3 --detach" in texts
    for not_run in NOT_RUN:
        assert not_run in texts, f"NOT_RUN lists {not_run!r}, which README.md no longer has"
    removed = [c for c in commands if c.code == "cim-place status $CID"]
    assert [c.expect for c in removed] == [1]
    watches = [c.code for c in commands if c.watch]
    waited = [w.command for w in WAITS if "--watch" in w.command]
    assert watches == waited, "each --watch in README.md needs its WAITS entry"
    files = [s.name for section in sections for s in section.steps if isinstance(s, FileBlock)]
    assert files == ["shop.yaml"]
    for name in ("rm", "down", "promtool"):
        assert any(re.search(rf"\b{name}\b", t) for t in texts), f"the README lost its {name}"
    assert any("/ui/" in t for t in texts), "the README lost its dashboard"


@pytest.mark.nats  # `cim-place up` starts nats-server processes
@pytest.mark.timeout(1200)
def test_every_readme_command_runs(tmp_path: Path) -> None:
    assert shutil.which("cim-place", path=str(BIN)), f"no cim-place in {BIN}"
    env = environment()
    pending = list(WAITS)
    shells: list[Shell] = []
    try:
        for number, section in enumerate(read_readme(README.read_text())):
            if not section.steps:
                continue
            cwd = tmp_path / f"section-{number}"
            shutil.copytree(ROOT / "deploy", cwd / "deploy")
            shell = Shell(cwd, env)
            shells.append(shell)
            for step in section.steps:
                if isinstance(step, FileBlock):
                    (cwd / step.name).write_text(step.text)
                    shell.log.append(f"(wrote {step.name} from README.md:{step.line})\n")
                elif step.code in NOT_RUN:
                    shell.log.append(f"(not run: {step.code}: {NOT_RUN[step.code]})\n")
                elif (program := step.code.split()[0]) in REQUIRES and not _available(program):
                    missing = f"README.md:{step.line}: {program} missing ({REQUIRES[program]})"
                    warnings.warn(missing, stacklevel=1)
                else:
                    shell.run(step)
                    if pending and pending[0].matches(step):
                        shell.wait(pending.pop(0))
                    else:
                        assert not step.watch, f"README.md:{step.line}: no WAITS entry for it"
        assert not pending, f"WAITS entries matched no command: {[w.command for w in pending]}"
    finally:
        for shell in shells:
            shell.stop_domain()
            print(f"--- {shell.cwd.name}\n" + "\n".join(shell.log))

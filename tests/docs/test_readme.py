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
  covered; the test fails if an entry is no longer in the README, or if a command is neither run
  nor listed.

The domain is the README's own ``cim-place up``: real nats-server, agent and controller processes
on free loopback ports (``up`` never takes 4222: cim_place.local.servers.free_port). Nothing here
measures time; the timeouts are hang guards.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest


ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
BIN = Path(sys.executable).parent  # the virtual env's bin: `cim-place` and `nats-server`

COMMAND_GUARD = 240.0
"""Hang guard for one command (`up --detach` waits for every agent's heartbeat)."""
WAIT_GUARD = 300.0
"""Hang guard for a wait after a `--watch` (the repair: down after 30 s, the grace, a copy)."""
WATCH_EXTRA = 2.5
"""After a watch printed its first refresh: room for another before Ctrl-C (not an assertion)."""
POLL = 1.0

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
    held = [
        path
        for volume in volumes
        for path in volume.rglob("*")
        if path.is_file() and not path.relative_to(volume).parts[0].startswith(".")
    ]
    return bool(volumes) and not held


@dataclass(frozen=True)
class Wait:
    """After ``command`` (whose comment starts with ``comment``): wait until ``until``."""

    command: str
    what: str
    until: Callable[[Shell], bool]
    comment: str = ""

    def matches(self, step: Command) -> bool:
        return step.code == self.command and step.comment.startswith(self.comment)


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


# -- reading the README -------------------------------------------------------------------------


@dataclass
class Command:
    section: str
    line: int
    code: str
    comment: str = ""

    @property
    def expect(self) -> int:
        found = re.search(r"\bexit(?: code)? (\d+)\b", self.comment)
        return int(found.group(1)) if found else 0

    @property
    def watch(self) -> bool:
        return "--watch" in self.code.split()

    @property
    def assigns(self) -> str | None:
        found = re.match(r"([A-Za-z_][A-Za-z0-9_]*)=", self.code)
        return found.group(1) if found else None


@dataclass
class FileBlock:
    section: str
    line: int
    name: str
    text: str


@dataclass
class Section:
    title: str
    steps: list[Command | FileBlock] = field(default_factory=list)


def _split_comment(line: str) -> tuple[str, str]:
    """A shell line's code and its trailing comment (a `#` after a blank, outside quotes)."""
    quote = ""
    for i, char in enumerate(line):
        if quote:
            if char == quote:
                quote = ""
        elif char in "'\"":
            quote = char
        elif char == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip(), line[i + 1 :].strip()
    return line.rstrip(), ""


def read_readme(text: str) -> list[Section]:
    sections: list[Section] = []
    fence: str | None = None
    block: list[tuple[int, str]] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if fence is None:
            if line.startswith("## "):
                sections.append(Section(line[3:].strip()))
            elif line.startswith("```"):
                fence, block = line[3:].strip(), []
            continue
        if not line.startswith("```"):
            block.append((number, line))
            continue
        section = sections[-1] if sections else Section("")
        if fence in ("sh", "bash"):
            section.steps.extend(_commands(section.title, block))
        elif fence == "yaml" and block and (name := re.match(r"#\s*(\S+\.ya?ml)\s*$", block[0][1])):
            body = "\n".join(line for _, line in block[1:]) + "\n"
            section.steps.append(FileBlock(section.title, block[0][0], name.group(1), body))
        fence = None
    assert fence is None, "README.md ends inside a fenced block"
    return sections


def _commands(section: str, block: list[tuple[int, str]]) -> Iterator[Command]:
    current: Command | None = None
    continued = False
    for number, raw in block:
        if not raw.strip():
            continue
        code, comment = _split_comment(raw)
        if continued and current is not None:
            current.code = current.code[:-1].rstrip() + " " + code.strip()
            current.comment = (current.comment + " " + comment).strip()
        elif not code.strip():  # a comment line: goes on with the previous command's comment
            if current is not None:
                current.comment = (current.comment + " " + comment).strip()
            continue
        else:
            if current is not None:
                yield current
            current = Command(section, number, code.strip(), comment)
        continued = code.endswith("\\")
    if current is not None:
        yield current


# -- running it ---------------------------------------------------------------------------------


@dataclass
class Shell:
    """One section's directory, environment and variables; runs its commands with bash."""

    cwd: Path
    env: dict[str, str]
    log: list[str] = field(default_factory=list)
    variables: dict[str, str] = field(default_factory=dict)

    def _env(self) -> dict[str, str]:
        return {**self.env, **self.variables}

    def _bash(self, script: str) -> dict[str, Any]:
        """How a command runs: bash in the section's directory, stderr into stdout."""
        return {
            "args": ["bash", "-c", script],
            "cwd": self.cwd,
            "env": self._env(),
            "stdout": subprocess.PIPE,
            "stderr": subprocess.STDOUT,
        }

    def run(self, command: Command) -> None:
        where = f"README.md:{command.line}: {command.code}"
        script = f"set -o pipefail\n{command.code}\n"
        value_file = self.cwd.parent / f".value-{command.line}"
        if command.assigns:
            script += f'__rc=$?\nprintf %s "${command.assigns}" > {value_file}\nexit $__rc\n'
        started = time.monotonic()
        if command.watch:
            code, output = self._watch(script, where)
        else:
            done = subprocess.run(**self._bash(script), timeout=COMMAND_GUARD, check=False)
            code, output = done.returncode, done.stdout.decode(errors="replace")
        self.log.append(
            f"$ {command.code}   [exit {code}, {time.monotonic() - started:.1f} s]\n{output}"
        )
        assert code == command.expect, f"{where}: exit {code}, README expects {command.expect}"
        assert "Traceback" not in output, f"{where}: printed a traceback:\n{output}"
        if command.assigns:
            self.variables[command.assigns] = value_file.read_text()
            assert self.variables[command.assigns], f"{where}: ${command.assigns} is empty"

    def _watch(self, script: str, where: str) -> tuple[int, str]:
        """Run until the first refresh has printed, give it another, then Ctrl-C."""
        # Its own process group, as a terminal's foreground job.
        process = subprocess.Popen(**self._bash(script), start_new_session=True)
        chunks: list[bytes] = []
        first = threading.Event()

        def read() -> None:
            assert process.stdout is not None
            while chunk := os.read(process.stdout.fileno(), 65536):
                chunks.append(chunk)
                first.set()

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        try:
            assert first.wait(COMMAND_GUARD), f"{where}: printed nothing"
            assert process.poll() is None, f"{where}: exited {process.returncode} while watching"
            time.sleep(WATCH_EXTRA)
            os.killpg(process.pid, signal.SIGINT)
            code = process.wait(COMMAND_GUARD)
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        reader.join(COMMAND_GUARD)
        return code, b"".join(chunks).decode(errors="replace")

    def run_json(self, *args: str) -> Any:
        done = subprocess.run(
            [str(BIN / "cim-place"), *args, "--json"],
            cwd=self.cwd,
            env=self._env(),
            capture_output=True,
            timeout=COMMAND_GUARD,
            check=False,
        )
        if done.returncode != 0:
            return None
        try:
            return json.loads(done.stdout)
        except ValueError:
            return None

    def wait(self, wait: Wait) -> None:
        started = time.monotonic()
        deadline = started + WAIT_GUARD
        while not wait.until(self):
            if time.monotonic() > deadline:
                status = self.run_json("status", "docs/report.pdf")
                raise AssertionError(
                    f"not seen within {WAIT_GUARD:.0f} s: {wait.what}; "
                    f"status: {json.dumps(status)}; nodes: {json.dumps(self.run_json('nodes'))}"
                )
            time.sleep(POLL)
        self.log.append(f"(waited for {wait.what}: {time.monotonic() - started:.1f} s)\n")

    def stop_domain(self) -> None:
        """After a failure: thaw what the README froze, then stop whatever `up` left running."""
        if not (self.cwd / ".cim-place" / "context.json").exists():
            return
        found = subprocess.run(
            ["pgrep", "-f", f"{self.cwd}/.cim-place/"], capture_output=True, text=True, check=False
        )
        for pid in found.stdout.split():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGCONT)
        subprocess.run(
            [str(BIN / "cim-place"), "down"],
            cwd=self.cwd,
            env=self.env,
            capture_output=True,
            timeout=COMMAND_GUARD,
            check=False,
        )


def _environment() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CIM_PLACE_")}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    return env


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
    env = _environment()
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

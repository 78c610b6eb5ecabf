"""Reading README.md's shell commands and running them as a person would (test_readme.py).

:func:`read_readme` splits the README into sections of commands and files by the convention
that test states; :class:`Shell` runs one section's commands with bash in one directory,
carrying the variables they assign, stopping ``--watch`` commands with Ctrl-C, and waiting
(:class:`Wait`, a hang guard and no timing assertion) for what the README says comes later.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent  # the virtual env's bin: `cim-place` and `nats-server`

COMMAND_GUARD = 240.0
"""Hang guard for one command (`up --detach` waits for every agent's heartbeat)."""
WAIT_GUARD = 300.0
"""Hang guard for a wait after a `--watch` (the repair: down after 30 s, the grace, a copy)."""
WATCH_EXTRA = 2.5
"""After a watch printed its first refresh: room for another before Ctrl-C (not an assertion)."""
POLL = 1.0


@dataclass(frozen=True)
class Wait:
    """After ``command`` (whose comment starts with ``comment``): wait until ``until``."""

    command: str
    what: str
    until: Callable[[Shell], bool]
    comment: str = ""

    def matches(self, step: Command) -> bool:
        return step.code == self.command and step.comment.startswith(self.comment)


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


def environment() -> dict[str, str]:
    """The test's environment less CIM_PLACE_* (the README's defaults), the venv's bin first."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CIM_PLACE_")}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    return env

"""The composition of the `cim-place` application: the console script loads only what it runs."""

from __future__ import annotations

import subprocess
import sys

import typer
from typer.main import get_command

from cim_place.cli import app as app_module


def _names(application: typer.Typer) -> set[str]:
    group = get_command(application)
    return set(group.commands)  # type: ignore[attr-defined]


def test_every_command_has_an_owner_for_the_fast_path() -> None:
    """A command missing from the table would still work (the whole app is built for unknown
    names), but would lose the fast start: keep the table complete."""
    assert _names(app_module.app) == set(app_module._OWNERS)


def test_a_command_alone_registers_only_its_group() -> None:
    assert _names(app_module.create_app(["status"])) == {"status", "nodes", "tasks"}
    assert _names(app_module.create_app(["policy"])) == {"policy"}


def test_the_command_is_the_first_argument_that_is_not_an_option() -> None:
    assert app_module._command(["status", "bafy", "--json"]) == "status"
    assert app_module._command(["--version"]) is None
    assert app_module._command([]) is None


def test_status_does_not_import_the_agent_or_the_object_store() -> None:
    probe = (
        "import sys; sys.argv = ['cim-place', 'status', '--help']\n"
        "from cim_place.cli.app import main\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "heavy = [m for m in ('cim_place.cluster.agent.service', 'cim_place.objectstore.store',"
        " 'cim_place.cli.objects') if m in sys.modules]\n"
        "print('HEAVY', heavy)\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert "HEAVY []" in done.stdout, done.stdout[-2000:]


def test_help_lists_every_group() -> None:
    done = subprocess.run(
        [sys.executable, "-c", "from cim_place.cli.app import main; main()", "--help"],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    for command in ("status", "agent", "policy", "name", "security", "up"):
        assert command in done.stdout

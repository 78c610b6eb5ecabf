"""`up --scrub-*` refuses bad values before starting anything."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from cim_place.cli.app import create_app

runner = CliRunner()


def test_up_refuses_a_bad_scrub_rate_before_starting(tmp_path: Path) -> None:
    app = create_app(["up"])
    result = runner.invoke(app, ["up", "--dir", str(tmp_path), "--scrub-rate", "fast"])
    assert result.exit_code == 1
    assert "--scrub-interval/--scrub-rate" in result.output
    assert not (tmp_path / "context.json").exists()
    assert list(tmp_path.iterdir()) == []

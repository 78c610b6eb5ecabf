"""`cim-place policy ...` end to end: the Typer app in process, and the installed console script."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jsonschema
from typer.testing import CliRunner

from cim_place.cli.app import app
from cim_place.local.servers import NatsServer

EXAMPLES = Path(__file__).resolve().parents[2] / "deploy" / "policies"
CONSOLE_SCRIPT = Path(sys.executable).parent / "cim-place"

runner = CliRunner()


def cli(*args: str) -> tuple[int, str, str]:
    result = runner.invoke(app, ["policy", *args], env={"CIM_PLACE_SERVER": ""})
    return result.exit_code, result.stdout, result.stderr


def test_validate_examples() -> None:
    code, out, _ = cli("validate", str(EXAMPLES))
    assert code == 0, out
    assert out.startswith("ok: 4 policies, 2 consumer(s)")
    assert "scratch: 1 copy, max 1 per volume, not on archive-1, expires after 7d" in out


def test_validate_reports_every_problem_and_exits_1(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: a\nreplicas: {min: 3, max: 1}\nspread: rack\n")
    code, _, err = cli("validate", str(bad))
    assert code == 1
    lines = err.splitlines()
    assert lines[0].startswith(f"{bad}:2:17: replicas.min (3) is greater than replicas.max (1)")
    assert lines[1].startswith(f"{bad}:3:9: unknown failure domain 'rack'")
    assert lines[2].startswith("error: 2 problems in policy files, nothing applied")


def test_schema_command_prints_a_valid_schema() -> None:
    code, out, _ = cli("schema")
    assert code == 0
    jsonschema.Draft202012Validator.check_schema(json.loads(out))


def test_explain_from_files_without_a_domain() -> None:
    code, out, _ = cli(
        "explain", "docs/q3.pdf", "--file", str(EXAMPLES), "--content-type", "application/pdf"
    )
    assert code == 0, out
    assert "policy   documents: 3 copies" in out
    code, out, _ = cli("explain", "x.bin", "--file", str(EXAMPLES), "--json")
    assert code == 0
    assert json.loads(out)["policy"] == "default"


def test_apply_ls_show_history_diff_rm(nats_server: NatsServer, tmp_path: Path) -> None:
    server = ["--server", nats_server.url]
    code, out, _ = cli("ls", *server)
    assert code == 0 and "no policies applied" in out

    code, out, _ = cli("apply", str(EXAMPLES), "--dry-run", *server)
    assert code == 0, out
    assert "+ policy documents" in out and "dry run: nothing applied" in out
    code, out, _ = cli("ls", *server)
    assert "no policies applied" in out

    code, out, _ = cli("apply", str(EXAMPLES), *server)
    assert code == 0, out
    assert "+ consumer website-shop" in out and "applied: revision" in out
    first_revision = int(out.rsplit(" ", 1)[1])

    code, out, _ = cli("ls", *server, "--json")
    listed = json.loads(out)
    assert [p["name"] for p in listed["policies"]] == ["scratch", "documents", "media", "default"]

    changed = tmp_path / "policies"
    changed.mkdir()
    for name in ("default.yaml", "media.yaml"):
        text = (EXAMPLES / name).read_text().replace("replicas: 3 ", "replicas: 5 ")
        (changed / name).write_text(text)
    code, out, _ = cli("diff", str(changed), *server)
    assert code == 0
    assert "~ policy default\n    replicas.max: 3 -> 5\n    replicas.min: 3 -> 5" in out
    assert "- policy documents" in out and "- policy scratch" in out

    # An invalid file applies nothing: the revision stays.
    bad = changed / "zz-bad.yaml"
    bad.write_text("name: broken\nreplicas: 0\n")
    code, _, err = cli("apply", str(changed), *server)
    assert code == 1 and "zero replicas without expiry" in err
    bad.unlink()
    code, out, _ = cli("ls", *server, "--json")
    assert json.loads(out)["revision"] == first_revision

    code, out, _ = cli("apply", str(changed), *server)
    assert code == 0
    code, out, _ = cli("show", "default", *server)
    assert code == 0 and "replicas: 5" in out and "# policy default, revision" in out
    code, out, _ = cli("show", "default", "--revision", str(first_revision), *server)
    assert code == 0 and "replicas: 3" in out
    code, out, _ = cli("show", "documents", *server)
    assert code == 1

    code, out, _ = cli("history", "default", *server, "--json")
    assert [h["change"] for h in json.loads(out)] == ["added", "changed"]
    code, out, _ = cli("history", "documents", *server)
    assert code == 0 and "added" in out and "removed" in out

    code, out, _ = cli("rm", "media", *server)
    assert code == 0 and "- policy media" in out
    code, _, err = cli("rm", "media", *server)
    assert code == 1 and "no applied policy named 'media'" in err

    code, out, _ = cli("explain", "img/cat.png", "--content-type", "image/png", *server)
    assert code == 0 and "policy   default" in out


def test_unreachable_domain_is_one_line_error() -> None:
    code, _, err = cli("ls", "--server", "nats://127.0.0.1:1")
    assert code == 1
    assert err.startswith("error: cannot reach a cim-place domain at nats://127.0.0.1:1")


def test_console_script(nats_server: NatsServer) -> None:
    env = {**os.environ, "CIM_PLACE_SERVER": nats_server.url}
    run = subprocess.run(
        [str(CONSOLE_SCRIPT), "policy", "apply", str(EXAMPLES)],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    assert "applied: revision" in run.stdout
    run = subprocess.run(
        [str(CONSOLE_SCRIPT), "policy", "ls"],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    assert "documents" in run.stdout


def test_explain_reads_the_pin_from_a_local_store(tmp_path: Path) -> None:
    import io

    from cim_place.objectstore.cid import to_str
    from cim_place.objectstore.store import ObjectStore

    with ObjectStore(tmp_path / "store") as store:
        pin = store.add(
            io.BytesIO(b"x" * 5000),
            name="tmp/build.tar",
            owner="ci",
            metadata={"retention": "scratch"},
        )
    code, out, _ = cli(
        "explain", "tmp/build.tar", "--store", str(tmp_path / "store"), "--file", str(EXAMPLES)
    )
    assert code == 0, out
    assert "policy   scratch: 1 copy" in out
    assert to_str(pin.root) in out
    assert "label requirement `retention = scratch` holds" in out

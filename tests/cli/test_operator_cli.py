"""Operator commands against a real domain (`cim-place up`, real nats-servers and agents).

One domain serves every test of the module (starting one costs seconds of two shared cores):
bad input answered in one line, `add` inside a domain directory, `rm` giving the disk back.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cim_place.cli.context import pid_alive, read_context
from cim_place.objectstore.testdata import chacha_stream

pytestmark = pytest.mark.nats

CLI = [sys.executable, "-c", "from cim_place.cli.app import main; main()"]


def run(*args: str, cwd: Path, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("CIM_PLACE_SERVER", "CIM_PLACE_DIR")}
    env.pop("CIM_PLACE_STORE", None)
    return subprocess.run(
        [*CLI, *args], cwd=cwd, env=env, input=stdin, capture_output=True, text=True, timeout=300
    )


def ok(*args: str, cwd: Path) -> str:
    done = run(*args, cwd=cwd)
    assert done.returncode == 0, f"cim-place {' '.join(args)}: {done.stderr}{done.stdout}"
    return done.stdout


def one_line_error(done: subprocess.CompletedProcess[str], code: int = 1) -> str:
    assert done.returncode == code, (done.returncode, done.stdout, done.stderr)
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    return lines[0]


def volume_usage(workdir: Path) -> dict[str, int]:
    """Bytes on disk of each node's volume directory (files and directories, like `du`)."""
    usage = {}
    for volume in sorted((workdir / ".cim-place" / "nodes").glob("*/v0")):
        total = volume.lstat().st_blocks * 512
        # os.walk skips a directory collected while it walks (rglob would raise).
        for top, directories, files in os.walk(volume):
            for name in [*directories, *files]:
                with contextlib.suppress(FileNotFoundError):
                    total += os.lstat(os.path.join(top, name)).st_blocks * 512
        usage[volume.parent.name] = total
    return usage


def status_doc(ref: str, cwd: Path) -> tuple[int, dict[str, Any]]:
    done = run("status", ref, "--json", cwd=cwd)
    return done.returncode, (json.loads(done.stdout) if done.stdout.strip() else {})


def wait_for(check: Any, what: str, tries: int = 600) -> Any:
    for _ in range(tries):
        value = check()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def domain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    workdir = tmp_path_factory.mktemp("operator")
    ok("up", "--leaves", "3", "--zones", "3", "--detach", cwd=workdir)
    yield workdir
    context = read_context(workdir / ".cim-place")
    run("down", cwd=workdir)
    if context is not None and pid_alive(context.pid):
        os.kill(context.pid, signal.SIGTERM)


def test_bad_input_is_one_line(domain: Path) -> None:
    for args in (("status", "f"), ("get", "f"), ("status", "bafy-not-a-cid")):
        assert "f" in one_line_error(run(*args, cwd=domain))
    explained = run("policy", "explain", "f", cwd=domain)
    assert explained.returncode in (0, 1, 2) and "Traceback" not in explained.stderr

    drain = one_line_error(run("node", "drain", "no-such-node", cwd=domain))
    assert "no-such-node" in drain and "leaf-1, leaf-2, leaf-3" in drain
    assert "may receive" in ok("node", "undrain", "leaf-1", cwd=domain)

    small = domain / "small.txt"
    small.write_bytes(b"small")
    add = one_line_error(run("add", str(small), "--node", "leaf-9", cwd=domain))
    assert "leaf-9" in add and "known nodes: leaf-1, leaf-2, leaf-3" in add

    absent = ok("cid", str(domain / "small.txt"), cwd=domain).strip()  # never added anywhere
    held = one_line_error(run("get", absent + "x" * 0, cwd=domain))
    assert "no node of the domain holds" in held and "not in this store" not in held


def test_a_closed_pipe_is_silent(domain: Path) -> None:
    for args in (("status", "--json"), ("nodes", "--json"), ("pins", "ls", "--json")):
        proc = subprocess.Popen(
            [*CLI, *args], cwd=domain, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        assert proc.stdout is not None and proc.stderr is not None
        proc.stdout.close()  # the reader is gone before the first byte: `| head -0`
        err = proc.stderr.read().decode()
        proc.wait(timeout=60)
        assert err == "", f"{args}: {err}"


def test_add_in_a_domain_directory_goes_to_the_domain(domain: Path) -> None:
    report = domain / "report.bin"
    report.write_bytes(chacha_stream("operator add", 300_000).read())
    done = run("add", str(report), "--name", "docs/report", cwd=domain)
    assert done.returncode == 0, done.stderr
    cid = done.stdout.strip()
    assert "added to the domain on leaf-" in done.stderr and "by policy" in done.stderr
    assert not (domain / ".cim-place" / "store").exists()  # no local store was touched
    # The name is a domain name: status and get take it.
    _code, doc = wait_for(
        lambda: (lambda r: r if r[0] == 0 and r[1].get("state") == "placed" else None)(
            status_doc("docs/report", domain)
        ),
        "docs/report placed",
    )
    assert doc["cid"] == cid
    ok("get", "docs/report", "-o", str(domain / "copy.bin"), cwd=domain)
    assert (domain / "copy.bin").read_bytes() == report.read_bytes()
    # Standard input: its CID is not known before the upload, so the node with most free space.
    piped = run("add", "-", cwd=domain, stdin="from a pipe")
    assert piped.returncode == 0 and "(most free space)" in piped.stderr, piped.stderr
    # --store keeps the local store.
    local = ok("add", str(report), "--store", str(domain / "local"), cwd=domain).strip()
    assert local == cid and (domain / "local" / "pins.sqlite").exists()


def test_rm_gives_the_disk_back_and_spares_other_objects(domain: Path) -> None:
    keep = domain / "keep.bin"
    keep.write_bytes(chacha_stream("operator keep", 2_500_000).read())
    kept = ok("add", str(keep), "--name", "keep", cwd=domain).strip()
    wait_for(lambda: status_doc(kept, domain)[1].get("state") == "placed", "keep placed")
    time.sleep(6)  # let any collection of earlier tests settle (agents collect 5 s after drops)
    before = volume_usage(domain)

    gone = domain / "gone.bin"
    gone.write_bytes(chacha_stream("operator gone", 4_000_000).read())
    removed = ok("add", str(gone), "--name", "gone", cwd=domain).strip()
    wait_for(lambda: status_doc(removed, domain)[1].get("state") == "placed", "gone placed")
    ok("name", "set", "gone-alias", removed, cwd=domain)
    grown = volume_usage(domain)
    assert all(grown[node] > before[node] + 3_000_000 for node in before), (before, grown)

    out = json.loads(ok("rm", "gone", "--json", cwd=domain))
    assert out["cid"] == removed and sorted(out["names"]) == ["gone", "gone-alias"]
    assert out["copies"] == 3 and out["already"] is False
    code, doc = status_doc(removed, domain)
    assert code == 1 and doc["state"] == "removed"
    wait_for(
        lambda: all(volume_usage(domain)[n] <= before[n] for n in before), "the disk back", 900
    )
    after_get = one_line_error(run("get", removed, cwd=domain))
    assert "was removed" in after_get
    gone_name = one_line_error(run("status", "gone", cwd=domain))
    assert "name 'gone' was removed" in gone_name and removed in gone_name
    assert "name 'gone-alias' was removed" in one_line_error(run("get", "gone-alias", cwd=domain))
    assert "already removed" in ok("rm", removed, cwd=domain)
    # The other object is untouched: placed, every copy pinned, readable.
    code, doc = status_doc("keep", domain)
    assert code == 0 and doc["state"] == "placed"
    assert [loc["state"] for loc in doc["locations"]] == ["pinned"] * 3
    ok("get", "keep", "-o", str(domain / "keep-copy.bin"), cwd=domain)
    assert (domain / "keep-copy.bin").read_bytes() == keep.read_bytes()


def test_rm_refuses_a_protected_object(domain: Path) -> None:
    policy = domain / "protected.yaml"
    policy.write_text(
        "name: ledger\nmatch: {name: 'ledger/*'}\nreplicas: 1\nprotected: true\nkeep_versions: 2\n"
    )
    default = domain / "default.yaml"
    default.write_text(ok("policy", "show", "default", cwd=domain))
    ok("policy", "apply", str(default), str(policy), cwd=domain)
    ledger = domain / "ledger.bin"
    ledger.write_bytes(b"ledger entries")
    cid = ok("add", str(ledger), "--name", "ledger/2026", cwd=domain).strip()
    wait_for(lambda: status_doc(cid, domain)[1].get("policy") == "ledger", "ledger tracked")
    refused = one_line_error(run("rm", "ledger/2026", cwd=domain))
    assert "protected" in refused and "ledger" in refused
    code, doc = status_doc(cid, domain)
    assert code == 0 and doc["state"] != "removed"


def test_a_tombstone_from_a_node_is_not_read(domain: Path) -> None:
    """Only the leading controller removes: an ObjectDeleted a node publishes on its own event
    subjects is filtered out of the controller's feed."""
    import asyncio

    from cim_place.cluster.events.publisher import EventPublisher
    from cim_place.cluster.events.types import ObjectDeleted
    from cim_place.cluster.nats.connection import connected, jetstream
    from cim_place.objectstore import cid as cids

    target = domain / "target.bin"
    target.write_bytes(b"not to be removed by a node")
    cid = ok("add", str(target), "--node", "leaf-1", cwd=domain).strip()
    wait_for(lambda: status_doc(cid, domain)[1].get("state") == "placed", "target placed")
    context = read_context(domain / ".cim-place")
    assert context is not None
    # The domain runs with users: the node's own agent credentials (context.json names them).
    from cim_place.local.credentials import read_credentials

    entry = next(e for e in context.nodes if e.node == "leaf-1")
    assert entry.credentials is not None
    leaf_url = read_credentials(Path(entry.credentials))

    async def forge() -> None:
        async with connected(leaf_url) as nc:
            publisher = EventPublisher(jetstream(nc), "leaf-1")
            await publisher.publish_event(ObjectDeleted(root=cids.parse(cid), by="leaf-1"))

    asyncio.run(forge())
    # Events of one outbox arrive in order: once this later add is tracked, the forged
    # tombstone has been delivered (and skipped).
    marker = domain / "marker.bin"
    marker.write_bytes(b"after the forged tombstone")
    later = ok("add", str(marker), "--node", "leaf-1", cwd=domain).strip()
    wait_for(lambda: status_doc(later, domain)[0] == 0, "the later add tracked")
    code, doc = status_doc(cid, domain)
    assert code == 0 and doc["state"] == "placed"

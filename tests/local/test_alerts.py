"""deploy/prometheus/alerts.yaml: Prometheus's own parser accepts it, and every metric a rule
reads is one that an agent or a controller exports."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from cim_place.cluster.agent.metrics import AgentMetrics
from cim_place.cluster.controller.metrics import ControllerMetrics

ROOT = Path(__file__).resolve().parents[2]
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yaml"
ASKED = {
    "CimPlaceObjectsBelowMin",
    "CimPlaceObjectsLost",
    "CimPlaceDamagedReplicas",
    "CimPlaceNodeDown",
    "CimPlaceNoLeader",
    "CimPlaceRepairStalled",
    "CimPlaceVolumeNearlyFull",
}


def _promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        # What `make test` runs first; here too, so the test runs alone as well.
        subprocess.run(["sh", str(ROOT / "scripts" / "install-test-deps.sh")], check=False)
        found = shutil.which("promtool")
    if found is None:
        pytest.skip("promtool could not be installed (Debian's prometheus package)")
    return found


def _exported() -> set[str]:
    names: set[str] = set()
    for family in [*AgentMetrics("n").registry.collect(), *ControllerMetrics().registry.collect()]:
        if family.type == "counter":
            names.add(family.name + "_total")
        elif family.type == "histogram":
            names.update(family.name + suffix for suffix in ("_bucket", "_sum", "_count"))
        else:
            names.add(family.name)
    return names


def _rules() -> list[dict[str, object]]:
    doc = yaml.safe_load(ALERTS.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def test_promtool_accepts_the_rules() -> None:
    done = subprocess.run(
        [_promtool(), "check", "rules", str(ALERTS)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(_rules())} rules found" in done.stdout


def test_rules_read_metrics_that_exist_and_cover_what_was_asked() -> None:
    rules = _rules()
    assert {str(rule["alert"]) for rule in rules} >= ASKED
    exported = _exported()
    for rule in rules:
        used = set(re.findall(r"\bcim_place_[a-z_]+", str(rule["expr"])))
        assert used, f"{rule['alert']} reads no cim-place metric"
        assert used <= exported, f"{rule['alert']}: unknown {sorted(used - exported)}"
        annotations = rule["annotations"]
        assert isinstance(annotations, dict) and annotations.get("summary")

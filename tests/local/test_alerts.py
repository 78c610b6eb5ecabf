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


def _series(shards: int, led: dict[str, int]) -> list[dict[str, str]]:
    series = []
    for instance, count in led.items():
        labels = f'{{instance="{instance}"}}'
        series.append({"series": f"cim_place_controller_shards{labels}", "values": f"{shards}x10"})
        series.append(
            {"series": f"cim_place_controller_shards_led{labels}", "values": f"{count}x10"}
        )
    return series


def test_a_shard_without_a_leader_is_alerted_and_nothing_else_is(tmp_path: Path) -> None:
    rule = next(r for r in _rules() if r["alert"] == "CimPlaceShardWithoutLeader")
    annotations = rule["annotations"]
    assert isinstance(annotations, dict)
    fired = {
        "exp_labels": {"severity": "critical"},
        "exp_annotations": {
            "summary": str(annotations["summary"]).replace("{{ $value }}", "1"),
            "description": str(annotations["description"]),
        },
    }
    cases = [
        (_series(2, {"a": 1, "b": 0}), [fired]),  # two shards, one led
        (_series(2, {"a": 1, "b": 1}), []),  # both led
        (_series(4, {"a": 4}), []),  # one process leads all four
        (_series(1, {"a": 0}), []),  # no shards: CimPlaceNoLeader's case, not this one
    ]
    tests = [
        {
            "interval": "1m",
            "input_series": series,
            "alert_rule_test": [
                {"eval_time": "5m", "alertname": "CimPlaceShardWithoutLeader", "exp_alerts": want}
            ],
        }
        for series, want in cases
    ]
    spec = tmp_path / "shards_test.yaml"
    spec.write_text(yaml.safe_dump({"rule_files": [str(ALERTS)], "tests": tests}))
    done = subprocess.run(
        [_promtool(), "test", "rules", str(spec)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr

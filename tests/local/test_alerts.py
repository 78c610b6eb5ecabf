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


Series = list[dict[str, str]]
Case = tuple[Series, int | None]
"""A rule unit test's input series, and the alert's value at 15 minutes (None: it must not fire)."""


def _controllers(shards: int, led: dict[str, int], **gauges: dict[str, int]) -> Series:
    """Controllers (by instance) leading ``led`` of ``shards`` shards, with more gauges per
    instance: ``name={instance: value}`` (``name`` without the ``cim_place_controller_`` prefix;
    ``lost`` is ``objects{state="lost"}``)."""
    series = []
    for instance, count in led.items():
        labels = f'instance="{instance}"'
        series.append(
            {"series": f"cim_place_controller_shards{{{labels}}}", "values": f"{shards}x20"}
        )
        series.append(
            {"series": f"cim_place_controller_shards_led{{{labels}}}", "values": f"{count}x20"}
        )
        for name, values in gauges.items():
            metric = (
                f'cim_place_controller_objects{{{labels},state="lost"}}'
                if name == "lost"
                else f"cim_place_controller_{name}{{{labels}}}"
            )
            series.append({"series": metric, "values": f"{values[instance]}x20"})
    return series


def _check_rule(tmp_path: Path, alert: str, cases: list[Case]) -> None:
    """Run ``cases`` through promtool's rule unit tests for ``alert``, evaluated at 15 minutes
    (past every rule's ``for``)."""
    rule = next(r for r in _rules() if r["alert"] == alert)
    annotations = rule["annotations"]
    labels = rule["labels"]
    assert isinstance(annotations, dict) and isinstance(labels, dict)

    def fired(value: int) -> dict[str, object]:
        return {
            "exp_labels": dict(labels),
            "exp_annotations": {
                key: str(text).replace("{{ $value }}", str(value))
                for key, text in annotations.items()
            },
        }

    tests = [
        {
            "interval": "1m",
            "input_series": series,
            "alert_rule_test": [
                {
                    "eval_time": "15m",
                    "alertname": alert,
                    "exp_alerts": [] if value is None else [fired(value)],
                }
            ],
        }
        for series, value in cases
    ]
    spec = tmp_path / f"{alert}_test.yaml"
    spec.write_text(yaml.safe_dump({"rule_files": [str(ALERTS)], "tests": tests}))
    done = subprocess.run(
        [_promtool(), "test", "rules", str(spec)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_a_shard_without_a_leader_is_alerted_and_nothing_else_is(tmp_path: Path) -> None:
    cases: list[Case] = [
        (_controllers(2, {"a": 1, "b": 0}), 1),  # two shards, one led
        (_controllers(2, {"a": 1, "b": 1}), None),  # both led
        (_controllers(4, {"a": 4}), None),  # one process leads all four
        (_controllers(1, {"a": 0}), None),  # no shards: CimPlaceNoLeader's case, not this one
    ]
    _check_rule(tmp_path, "CimPlaceShardWithoutLeader", cases)


def test_object_alerts_count_what_the_leaders_say(tmp_path: Path) -> None:
    """Summed over the controllers that lead: a deposed one's last counts are not current."""
    lost: list[Case] = [
        # One lease: the leader's 2, not the stale 5 of a controller that no longer leads.
        (_controllers(1, {"a": 1, "b": 0}, lost={"a": 2, "b": 5}), 2),
        (_controllers(1, {"a": 1, "b": 0}, lost={"a": 0, "b": 5}), None),
        # Two shards, one leader each: the domain's lost objects are the sum.
        (_controllers(2, {"a": 1, "b": 1}, lost={"a": 1, "b": 2}), 3),
    ]
    _check_rule(tmp_path, "CimPlaceObjectsLost", lost)
    below: list[Case] = [
        (_controllers(2, {"a": 1, "b": 1}, objects_below_min={"a": 0, "b": 4}), 4),
        (_controllers(1, {"a": 1, "b": 0}, objects_below_min={"a": 0, "b": 4}), None),
    ]
    _check_rule(tmp_path, "CimPlaceObjectsBelowMin", below)

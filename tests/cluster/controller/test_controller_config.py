"""The controller's configuration file and its rate limits (no servers needed)."""

from __future__ import annotations

from pathlib import Path

import pytest

from cim_place.cluster.agent.config import AgentConfigError
from cim_place.cluster.controller.config import ControllerConfig, load_controller_config
from cim_place.cluster.controller.reconcile_pass import _Budget

DEPLOY = Path(__file__).resolve().parents[3] / "deploy" / "controller.yaml"


def test_the_deployed_example_loads() -> None:
    config = load_controller_config(DEPLOY)
    assert config.lease == 6.0 and config.max_bytes_per_node == 4 << 30
    assert config.max_tasks == 1024


def test_every_problem_is_reported_with_its_position(tmp_path: Path) -> None:
    bad = tmp_path / "controller.yaml"
    bad.write_text("lease: soon\nmax_tasks: 0\nmaximum: 3\n")
    with pytest.raises(AgentConfigError) as caught:
        load_controller_config(bad)
    text = str(caught.value)
    assert f"{bad}:1:8" in text and "duration" in text
    assert f"{bad}:2:12" in text
    assert f"{bad}:3:1" in text and "unknown key 'maximum'" in text


def test_budget_limits_tasks_per_node_bytes_per_node_and_the_domain() -> None:
    budget = _Budget(ControllerConfig(max_tasks_per_node=2, max_bytes_per_node=100, max_tasks=3))
    assert budget.allows("a", "fetch", 500)  # the first fetch passes whatever its size
    budget.take("a", "fetch", 500)
    assert not budget.allows("a", "fetch", 1)  # over the node's bytes in flight
    assert budget.allows("a", "drop", 0)
    budget.take("a", "drop", 0)
    assert not budget.allows("a", "drop", 0)  # two tasks on a
    budget.take("b", "drop", 0)
    assert not budget.allows("c", "drop", 0)  # three in the domain


def test_snapshot_and_retention_keys_load(tmp_path: Path) -> None:
    path = tmp_path / "controller.yaml"
    path.write_text(
        "snapshot_every_events: 5000\nsnapshot_every: 2m\nsnapshots_kept: 2\n"
        "events_max_age: 7d\nevents_max_bytes: 1GiB\n"
    )
    config = load_controller_config(path)
    assert (config.snapshot_every_events, config.snapshot_every, config.snapshots_kept) == (
        5000,
        120.0,
        2,
    )
    assert (config.events_max_age, config.events_max_bytes) == (7 * 86400.0, 1 << 30)
    defaults = load_controller_config(DEPLOY)
    assert defaults.events_max_age == 0 and defaults.events_max_bytes == 0  # keep every event

"""The controller's configuration file and its rate limits (no servers needed)."""

from __future__ import annotations

from pathlib import Path

import pytest

from cim_place.cluster.agent.config import AgentConfigError
from cim_place.cluster.controller.config import (
    ControllerConfig,
    limit_part,
    load_controller_config,
)
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


def test_the_rebalance_scan_is_a_positive_count(tmp_path: Path) -> None:
    path = tmp_path / "controller.yaml"
    path.write_text("rebalance_scan_per_pass: 5000\n")
    assert load_controller_config(path).rebalance_scan_per_pass == 5000
    assert load_controller_config(DEPLOY).rebalance_scan_per_pass == 20_000
    for bad in ("0", "-3", "many"):
        path.write_text(f"rebalance_scan_per_pass: {bad}\n")
        with pytest.raises(AgentConfigError) as caught:
            load_controller_config(path)
        assert f"{path}:1:26" in str(caught.value)
        assert "rebalance_scan_per_pass" in str(caught.value)


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


@pytest.mark.parametrize("limit", [1, 2, 3, 16, 1024, 4 << 30])
@pytest.mark.parametrize("shards", [2, 3, 4, 7])
def test_the_shard_leaders_parts_add_up_to_the_domain_limit(limit: int, shards: int) -> None:
    for led in range(1, shards):
        # ``led`` shards in one process, the others one each in their own process.
        parts = limit_part(limit, led, shards) + (shards - led) * limit_part(limit, 1, shards)
        assert parts <= max(limit, shards)  # above ``limit`` only through the floor of one
        if limit >= shards:
            assert parts <= limit
        assert limit_part(limit, led, shards) >= 1
    assert limit_part(limit, shards, shards) == limit
    assert limit_part(0, 1, shards) == 0


def test_a_budget_holds_its_part_of_the_limits() -> None:
    config = ControllerConfig(max_tasks=10, max_tasks_per_node=4, max_bytes_per_node=1000)
    budget = _Budget(config, (1, 2))
    assert (budget.max_tasks, budget.max_tasks_per_node, budget.max_bytes_per_node) == (5, 2, 500)
    budget.take("n1", "fetch", 400)
    assert not budget.allows("n1", "fetch", 200)  # 600 bytes: above its 500
    budget.take("n1", "drop", 0)
    assert not budget.allows("n1", "drop", 0)  # 2 tasks on n1: its part

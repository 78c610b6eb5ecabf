"""cim_place.runtime.metrics: declared metrics, one registry per instance."""

from __future__ import annotations

import pytest

from cim_place.cluster.agent.metrics import AgentMetrics
from cim_place.cluster.controller.metrics import ControllerMetrics
from cim_place.runtime.metrics import Metrics, counter, gauge, histogram


class Sample(Metrics):
    done = counter("sample_done", "Things done.", ["kind"])
    level = gauge("sample_level", "A level.")
    took = histogram("sample_seconds", "How long.", buckets=(0.1, 1.0))


def test_each_instance_has_its_own_registry_and_metrics() -> None:
    first, second = Sample(), Sample()
    first.done.labels("a").inc(2)
    first.level.set(5)
    first.took.observe(0.5)
    assert first.registry.get_sample_value("sample_done_total", {"kind": "a"}) == 2
    assert second.registry.get_sample_value("sample_done_total", {"kind": "a"}) is None
    assert first.registry.get_sample_value("sample_level") == 5
    assert first.registry.get_sample_value("sample_seconds_bucket", {"le": "1.0"}) == 1


def test_a_declaration_is_not_a_metric() -> None:
    with pytest.raises(AttributeError, match="created by"):
        Sample.__dict__["done"].__get__(object.__new__(Sample), Sample)


def test_agents_and_controllers_export_the_names_alerts_read() -> None:
    agent = {family.name for family in AgentMetrics("n").registry.collect()}
    controller = {family.name for family in ControllerMetrics().registry.collect()}
    assert {"cim_place_blocks_stored", "cim_place_volume_free_bytes", "cim_place_pins"} <= agent
    assert {"cim_place_controller_leader", "cim_place_controller_objects_below_min"} <= controller
    assert len(agent) == 25 and len(controller) == 24  # every declaration, once

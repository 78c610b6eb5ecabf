"""Prometheus metrics of an agent.

Each agent gets its own registry (:class:`cim_place.runtime.metrics.Metrics`), so several agents
in one process (tests) do not collide; ``serve`` exposes that registry only. The names are read
by deploy/prometheus/alerts.yaml and the Grafana dashboard: never rename one.
"""

from __future__ import annotations

from cim_place.cluster.state.nodes import VolumeStatus
from cim_place.runtime.metrics import Metrics, counter, gauge, histogram

_VOLUME = ("volume",)


class AgentMetrics(Metrics):
    # What moves through this node.
    blocks_stored = counter("cim_place_blocks_stored", "Blocks written to this node's volumes.")
    bytes_stored = counter("cim_place_bytes_stored", "Bytes of content added or fetched here.")
    blocks_fetched = counter("cim_place_blocks_fetched", "Blocks fetched from other nodes.")
    bytes_fetched = counter("cim_place_bytes_fetched", "Bytes fetched from other nodes.")
    blocks_served = counter("cim_place_blocks_served", "Blocks served to other nodes.")
    bytes_served = counter("cim_place_bytes_served", "Bytes served to other nodes.")
    # Demand-driven copies (docs/DEMAND.md).
    demand_reads = counter(
        "cim_place_demand_reads", "Reads counted for demand-driven copies (docs/DEMAND.md)."
    )
    demand_reads_dropped = counter(
        "cim_place_demand_reads_dropped", "Reads not counted because the read table was full."
    )
    demand_reports = counter("cim_place_demand_reports", "Demand reports published.")
    read_bytes = counter(
        "cim_place_read_bytes",
        "Bytes of objects read by clients of this node: from a local copy or fetched.",
        ["source"],
    )
    # Integrity and protocol hygiene.
    verification_failures = counter(
        "cim_place_verification_failures",
        "Blocks whose bytes did not match their CID (on disk or received).",
    )
    malformed_messages = counter(
        "cim_place_malformed_messages",
        "Messages on cim-place subjects that could not be decoded.",
        ["service"],
    )
    events_published = counter(
        "cim_place_events_published", "Events published by this node.", ["type"]
    )
    tasks = counter("cim_place_tasks", "Task outcomes.", ["kind", "outcome"])
    task_duration = histogram(
        "cim_place_task_duration_seconds",
        "Task durations.",
        ["kind"],
        buckets=(0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 1800),
    )
    # Volumes (observe_volume, on every heartbeat).
    volume_capacity = gauge("cim_place_volume_capacity_bytes", "Volume capacity.", _VOLUME)
    volume_used = gauge("cim_place_volume_used_bytes", "Bytes of blocks held.", _VOLUME)
    volume_free = gauge("cim_place_volume_free_bytes", "Bytes still available.", _VOLUME)
    pins = gauge("cim_place_pins", "Pinned roots.", _VOLUME)
    # Scrubs and repairs (docs/DURABILITY.md).
    scrub_bytes = counter("cim_place_scrub_bytes", "Bytes re-read and verified by scrubs.", _VOLUME)
    scrub_blocks = counter(
        "cim_place_scrub_blocks", "Blocks re-read and verified by scrubs.", _VOLUME
    )
    damaged_blocks = counter(
        "cim_place_damaged_blocks",
        "Blocks of pinned replicas found corrupt or missing (scrub, serve, read, fetch).",
        ["problem"],
    )
    damaged_replicas = gauge(
        "cim_place_damaged_replicas",
        "Pinned replicas on this node known to be damaged and not yet repaired.",
        _VOLUME,
    )
    repairs = counter("cim_place_repairs", "Repairs of damaged replicas.", ["outcome"])
    scrub_last_full_pass = gauge(
        "cim_place_scrub_last_full_pass_timestamp_seconds",
        "Unix time at which the last full scrub pass of a volume ended.",
        _VOLUME,
    )

    def __init__(self, node: str) -> None:
        super().__init__()
        self.node = node

    def observe_volume(self, status: VolumeStatus, pins: int) -> None:
        self.volume_capacity.labels(status.name).set(status.capacity)
        self.volume_used.labels(status.name).set(status.used)
        self.volume_free.labels(status.name).set(status.free)
        self.pins.labels(status.name).set(pins)

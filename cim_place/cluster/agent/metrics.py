"""Prometheus metrics of an agent.

Each agent gets its own registry, so several agents in one process (tests) do not collide; the
metrics endpoint (:func:`cim_place.runtime.metrics.serve_metrics`) serves that registry only.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from cim_place.cluster.state.nodes import VolumeStatus
from cim_place.runtime.metrics import serve_metrics


class AgentMetrics:
    def __init__(self, node: str) -> None:
        self.node = node
        self.registry = CollectorRegistry()
        r = self.registry
        self.blocks_stored = Counter(
            "cim_place_blocks_stored", "Blocks written to this node's volumes.", registry=r
        )
        self.bytes_stored = Counter(
            "cim_place_bytes_stored", "Bytes of content added or fetched here.", registry=r
        )
        self.blocks_fetched = Counter(
            "cim_place_blocks_fetched", "Blocks fetched from other nodes.", registry=r
        )
        self.bytes_fetched = Counter(
            "cim_place_bytes_fetched", "Bytes fetched from other nodes.", registry=r
        )
        self.blocks_served = Counter(
            "cim_place_blocks_served", "Blocks served to other nodes.", registry=r
        )
        self.bytes_served = Counter(
            "cim_place_bytes_served", "Bytes served to other nodes.", registry=r
        )
        self.demand_reads = Counter(
            "cim_place_demand_reads",
            "Reads counted for demand-driven copies (docs/DEMAND.md).",
            registry=r,
        )
        self.demand_reads_dropped = Counter(
            "cim_place_demand_reads_dropped",
            "Reads not counted because the read table was full.",
            registry=r,
        )
        self.demand_reports = Counter(
            "cim_place_demand_reports", "Demand reports published.", registry=r
        )
        self.verification_failures = Counter(
            "cim_place_verification_failures",
            "Blocks whose bytes did not match their CID (on disk or received).",
            registry=r,
        )
        self.malformed_messages = Counter(
            "cim_place_malformed_messages",
            "Messages on cim-place subjects that could not be decoded.",
            ["service"],
            registry=r,
        )
        self.events_published = Counter(
            "cim_place_events_published", "Events published by this node.", ["type"], registry=r
        )
        self.tasks = Counter("cim_place_tasks", "Task outcomes.", ["kind", "outcome"], registry=r)
        self.task_duration = Histogram(
            "cim_place_task_duration_seconds",
            "Task durations.",
            ["kind"],
            buckets=(0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 1800),
            registry=r,
        )
        self.volume_capacity = Gauge(
            "cim_place_volume_capacity_bytes", "Volume capacity.", ["volume"], registry=r
        )
        self.volume_used = Gauge(
            "cim_place_volume_used_bytes", "Bytes of blocks held.", ["volume"], registry=r
        )
        self.volume_free = Gauge(
            "cim_place_volume_free_bytes", "Bytes still available.", ["volume"], registry=r
        )
        self.pins = Gauge("cim_place_pins", "Pinned roots.", ["volume"], registry=r)
        self.scrub_bytes = Counter(
            "cim_place_scrub_bytes", "Bytes re-read and verified by scrubs.", ["volume"], registry=r
        )
        self.scrub_blocks = Counter(
            "cim_place_scrub_blocks",
            "Blocks re-read and verified by scrubs.",
            ["volume"],
            registry=r,
        )
        self.damaged_blocks = Counter(
            "cim_place_damaged_blocks",
            "Blocks of pinned replicas found corrupt or missing (scrub, serve, read, fetch).",
            ["problem"],
            registry=r,
        )
        self.damaged_replicas = Gauge(
            "cim_place_damaged_replicas",
            "Pinned replicas on this node known to be damaged and not yet repaired.",
            ["volume"],
            registry=r,
        )
        self.repairs = Counter(
            "cim_place_repairs", "Repairs of damaged replicas.", ["outcome"], registry=r
        )
        self.scrub_last_full_pass = Gauge(
            "cim_place_scrub_last_full_pass_timestamp_seconds",
            "Unix time at which the last full scrub pass of a volume ended.",
            ["volume"],
            registry=r,
        )

    def observe_volume(self, status: VolumeStatus, pins: int) -> None:
        self.volume_capacity.labels(status.name).set(status.capacity)
        self.volume_used.labels(status.name).set(status.used)
        self.volume_free.labels(status.name).set(status.free)
        self.pins.labels(status.name).set(pins)

    def serve(self, address: str) -> None:
        serve_metrics(self.registry, address)

"""Prometheus metrics of a controller (:class:`cim_place.runtime.metrics.Metrics`).

The alert rules (deploy/prometheus/alerts.yaml) and the Grafana dashboard read these names:
never rename one. Input rejected by validation is counted in the same registry by
:class:`cim_place.cluster.nats.validation.Rejections`.
"""

from __future__ import annotations

from cim_place.runtime.metrics import Metrics, counter, gauge, histogram

_PREFIX = "cim_place_controller_"


class ControllerMetrics(Metrics):
    objects = gauge(_PREFIX + "objects", "Objects by state.", ["state"])
    under_replicated = gauge(_PREFIX + "under_replicated", "Objects below their desired copies.")
    tasks_queued = counter(_PREFIX + "tasks_queued", "Tasks enqueued.", ["kind"])
    tasks_in_flight = gauge(_PREFIX + "tasks_in_flight", "Tasks enqueued and not reported.")
    tasks_failed = counter(_PREFIX + "tasks_failed", "TaskFailed events seen.")
    drift_reconciled = counter(
        _PREFIX + "drift_roots",
        "Roots re-announced by nodes whose inventory digest disagreed with the projection.",
    )
    damaged_replicas = gauge(
        _PREFIX + "damaged_replicas", "Replicas reported damaged and not yet repaired, domain-wide."
    )
    bytes_moved = counter(_PREFIX + "bytes_moved", "Bytes fetched by completed tasks.")
    reconcile_seconds = histogram(
        _PREFIX + "reconcile_seconds",
        "Time to reconcile one object.",
        buckets=(0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1),
    )
    walk_seconds = gauge(
        _PREFIX + "walk_seconds",
        "Seconds the last complete walk of every object took (above the full pass's period: "
        "the leader walks without pause).",
    )
    rebalance_scanned = counter(
        _PREFIX + "rebalance_scanned", "Objects checked for a move toward the ideal placement."
    )
    leader = gauge(_PREFIX + "leader", "1 while this controller leads.")
    shards = gauge(_PREFIX + "shards", "Shards the domain's CIDs are split into (1: no shards).")
    shards_led = gauge(
        _PREFIX + "shards_led",
        "Shards this controller leads (without shards: 1 while it leads). Summed over the "
        "controllers, below cim_place_controller_shards means a shard has no leader.",
    )
    # For the alert rules (deploy/prometheus/alerts.yaml).
    below_min = gauge(
        _PREFIX + "objects_below_min",
        "Objects with fewer pinned copies than their policy's minimum.",
    )
    nodes = gauge(
        _PREFIX + "nodes",
        "Nodes by liveness as the controller sees them (up, late, down, draining).",
        ["state"],
    )
    # Demand-driven cached copies (docs/DEMAND.md, cluster/controller/cached.py).
    demand_reports = counter(_PREFIX + "demand_reports", "Demand reports folded in.")
    demand_reads = counter(_PREFIX + "demand_reads", "Reads counted in demand reports.")
    demand_decisions = counter(_PREFIX + "demand_decisions", "Demand decisions taken.")
    cached_added = counter(_PREFIX + "cached_added", "Cached copies confirmed.")
    cached_dropped = counter(
        _PREFIX + "cached_dropped", "Cached copies gone (dropped, evicted or lost).", ["reason"]
    )
    cached_copies = gauge(_PREFIX + "cached_copies", "Cached copies in the domain.")
    cached_bytes = gauge(_PREFIX + "cached_bytes", "Bytes of cached copies.")
    read_bytes = counter(
        _PREFIX + "read_bytes",
        "Bytes read by clients per serving node, from a local copy or fetched from others.",
        ["node", "source"],
    )

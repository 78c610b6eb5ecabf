"""The controller's settings (:class:`ControllerConfig`) and its configuration file
(``cim-place controller --config FILE``).

Every key is optional; servers usually come from ``CIM_PLACE_SERVER`` (credentials in the URL)::

    servers: [tls://hub-1:4222, tls://hub-2:4222, tls://hub-3:4222]
    creds: /etc/cim-place/controller.creds
    hub_domain: hub
    identity: controller-hub-1      # default: host-pid
    lease: 6s                       # leadership lease (the TTL of KV cim-place-leader)
    full_pass: 60s                  # every object is looked at again this often
    late_after: 15s                 # a node without heartbeat this long is late (not acted on)
    down_after: 30s                 # ... and this long, down (repair after the policy's grace)
    max_tasks_per_node: 16          # tasks in flight per node ...
    max_bytes_per_node: 4GiB        # ... and bytes of fetches in flight per node
    max_tasks: 1024                 # tasks in flight in the whole domain
    rebalance_per_pass: 100
    rebalance_scan_per_pass: 20000  # objects checked for a better placement per full pass
    metrics: 127.0.0.1:9470
    snapshot_every_events: 100000   # the leader snapshots its projection this often ...
    snapshot_every: 10m             # ... or this often (docs/SCALE.md, "Snapshots and retention")
    snapshots_kept: 3
    events_max_age: 30d             # purge events older than this once a snapshot covers them
    events_max_bytes: 20GiB         # ... or beyond this size (default: keep every event)
    shards: 4                       # split the CIDs into 4 shards, one lease each (docs/SCALE.md)

The task limits (``max_tasks``, ``max_tasks_per_node``, ``max_bytes_per_node``, and each policy's
``repair.max_concurrent``) are domain-wide: with shards, each process enforces its part of them
(:func:`limit_part`).

Problems are reported all at once with file:line:column, as for agent and policy files.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from cim_place.cluster.nats.connection import DEFAULT_SERVER
from cim_place.cluster.nats.subjects import DEFAULT_PREFIX
from cim_place.cluster.state.nodes import NODE_TTL
from cim_place.errors import CimPlaceError
from cim_place.policies.loader import Path as YamlPath
from cim_place.policies.loader import read_file
from cim_place.runtime.config import ConfigChecker, ConfigFileError


@dataclass(frozen=True, slots=True)
class ControllerConfig:
    servers: tuple[str, ...] = (DEFAULT_SERVER,)
    creds: str | None = None
    hub_domain: str = "hub"
    prefix: str = DEFAULT_PREFIX
    identity: str = ""
    """Unique per controller process; default host-pid."""
    lease: float = 6.0
    full_pass_every: float = 60.0
    late_after: float = 15.0
    """Seconds without a heartbeat after which a node is late (not acted on)."""
    down_after: float = NODE_TTL
    """Seconds without a heartbeat after which a node is down (its copies are lost once the
    policy's repair grace has passed too)."""
    max_tasks_per_node: int = 16
    max_bytes_per_node: int = 4 << 30
    """Bytes of fetches in flight to one node (the first fetch always passes, whatever its size)."""
    max_tasks: int = 1024
    """Tasks in flight in the whole domain."""
    task_timeout: float = 1800.0
    """Seconds after which a task with no report is forgotten (and its work re-planned)."""
    rebalance_per_pass: int = 100
    """Moves toward the ideal placement started per full pass, at most."""
    rebalance_scan_per_pass: int = 20_000
    """Objects checked for a move per full pass (in chunks, resuming where the last pass
    stopped): the CPU a full pass spends on balance, whatever the domain's size."""
    summary_every: float = 1.0
    metrics: str | None = None
    snapshot_every_events: int = 100_000
    """The leader snapshots its projection after this many events (controller/snapshot.py) ..."""
    snapshot_every: float = 600.0
    """... or after this many seconds with at least one new event."""
    snapshots_kept: int = 3
    events_max_age: float = 0.0
    """Purge events older than this once a snapshot covers them (0: keep every event)."""
    events_max_bytes: int = 0
    """Purge the oldest events beyond this size once a snapshot covers them (0: no limit)."""
    shards: int = 1
    """Split the CIDs into this many shards, one lease each (controller/shards.py); 1: one
    lease for the whole domain, as always."""


def limit_part(limit: int, led: int, shards: int) -> int:
    """A process's part of the domain-wide ``limit`` while it leads ``led`` of ``shards`` shards.

    Each shard's leader counts only the tasks it enqueued itself, so the limits are divided in
    proportion to the shards led: the parts of all leaders add up to at most ``limit`` (rounded
    down), except that a leader's part is never below 1, or no shard could ever make progress
    when ``limit`` is smaller than the shard count. A process leading every shard (or the only
    lease) has the whole ``limit``; 0 or less stays as it is (what the limit means then).
    """
    if led >= shards or limit <= 0:
        return limit
    return max(1, limit * led // shards)


_DURATIONS = {
    "lease": "lease",
    "full_pass": "full_pass_every",
    "late_after": "late_after",
    "down_after": "down_after",
    "snapshot_every": "snapshot_every",
    "events_max_age": "events_max_age",
}
_COUNTS = {
    "max_tasks_per_node": "max_tasks_per_node",
    "max_tasks": "max_tasks",
    "rebalance_per_pass": "rebalance_per_pass",
    "rebalance_scan_per_pass": "rebalance_scan_per_pass",
    "snapshot_every_events": "snapshot_every_events",
    "snapshots_kept": "snapshots_kept",
    "shards": "shards",
}
_SIZES = {"max_bytes_per_node": "max_bytes_per_node", "events_max_bytes": "events_max_bytes"}
_TEXTS = {
    "creds": "creds",
    "hub_domain": "hub_domain",
    "identity": "identity",
    "metrics": "metrics",
}
_KEYS = {"servers", *_DURATIONS, *_COUNTS, *_SIZES, *_TEXTS}


def load_controller_config(path: Path, base: ControllerConfig | None = None) -> ControllerConfig:
    """``base`` (the defaults, or what flags said) updated from the file at ``path``."""
    if not path.is_file():
        raise CimPlaceError(f"controller configuration {path} does not exist (pass --config FILE)")
    loaded = read_file(str(path))
    if loaded.problems:
        raise ConfigFileError(loaded.problems)
    config = base or ControllerConfig()
    document = loaded.documents[0] if loaded.documents else {}
    checker = ConfigChecker(loaded)
    root: YamlPath = (0,)
    doc = checker.section(document if document is not None else {}, root, _KEYS)
    changes: dict[str, object] = {}
    if "servers" in doc:
        raw = doc["servers"]
        items = [raw] if isinstance(raw, str) else raw
        if isinstance(items, list) and items:
            found = [
                checker.text(u, (*root, "servers", i), "a server URL") for i, u in enumerate(items)
            ]
            changes["servers"] = tuple(u for u in found if u)
        else:
            checker.problem((*root, "servers"), "servers must be a URL or a list of URLs")
    for key, attribute in _DURATIONS.items():
        if key in doc:
            changes[attribute] = checker.positive_duration(doc[key], (*root, key), key)
    for key, attribute in _COUNTS.items():
        if key in doc:
            changes[attribute] = checker.positive(doc[key], (*root, key), key)
    for key, attribute in _SIZES.items():
        if key in doc:
            changes[attribute] = checker.size(doc[key], (*root, key), key)
    for key, attribute in _TEXTS.items():
        if key in doc:
            changes[attribute] = checker.text(doc[key], (*root, key), key)
    if loaded.problems:
        raise ConfigFileError(loaded.problems)
    return replace(config, **changes)  # type: ignore[arg-type]

"""Read-only views of the domain for operators: the documents behind ``cim-place status``,
``nodes`` and ``tasks`` and the dashboard's JSON API (schemas in ``docs/STATUS.md``).

Everything is read from the hub's materialised state, never by asking every node: heartbeats in KV
``cim-place-nodes``, object records in the ``cim-place-locations`` shards (and their summary),
names in ``cim-place-names``, stream ``CIM_PLACE_TASKS`` and the task events of
``CIM_PLACE_EVENTS``. The CLI and the HTTP dashboard both call these functions, so the two always
show the same thing. Heavy modules are imported inside the functions: ``status CID`` is on an
operator's hot path.
"""

from __future__ import annotations

import time
from collections import deque
from typing import TYPE_CHECKING, Any

from nats.js import JetStreamContext

from cim_place.errors import CimPlaceError, TransportError

if TYPE_CHECKING:
    from cim_place.cluster.state.nodes import NodeRecord
    from cim_place.placement.status import ObjectStatus

LATE_AFTER = 15.0
"""Seconds without a heartbeat after which a node shows as ``late`` (the controller's default
``late_after``: 3 beats at the default 5 s); its record expires from the bucket after 30 s, and it
is then no longer listed."""
STATES = ("placed", "progressing", "degraded", "lost", "removed", "expired")
_DRAIN_PREFIX = "drain."
"""Keys of KV ``cim-place-drain`` (``cim_place.cluster.controller.service.DRAIN_PREFIX``)."""


async def draining(js: JetStreamContext) -> set[str]:
    """Nodes the controller drains: the ``drain.<node>`` keys of KV ``cim-place-drain``.

    Read here rather than through the controller's ``draining_nodes``: importing the controller
    (scheduler, metrics, reconciler) cost about 0.2 s of every ``cim-place status``.
    """
    from cim_place.cluster.nats import kv
    from cim_place.cluster.nats.kv_listing import live_keys

    try:
        bucket = await js.key_value(kv.DRAIN)
        keys = await live_keys(bucket)
    except Exception:
        return set()  # no bucket, no keys, or unreadable: the drain list is only an annotation
    return {key[len(_DRAIN_PREFIX) :] for key in keys if key.startswith(_DRAIN_PREFIX)}


def node_state(record: NodeRecord, now: float, drained: set[str]) -> str:
    """``draining``, ``up`` (heartbeat within LATE_AFTER) or ``late``."""
    if record.node in drained:
        return "draining"
    return "up" if now - record.heartbeat_at <= LATE_AFTER else "late"


async def object_status(js: JetStreamContext, ref: str) -> ObjectStatus:
    """The record of a CID or a domain name; CimPlaceError naming the object when it has none."""
    from cim_place.cluster.state.locations import LocationStore
    from cim_place.cluster.state.names import NameRegistry
    from cim_place.objectstore import cid as cids

    try:
        cid_text = cids.to_str(cids.parse(ref.strip()))
        named = False
    except CimPlaceError:
        cid_text = cids.to_str(await NameRegistry(js).resolve(ref))
        named = True
    store = await LocationStore(js).open(create=False)
    status = await store.get(cid_text)
    if status is None:
        what = f"{ref} ({cid_text})" if named else cid_text
        raise CimPlaceError(
            f"unknown object {what}: the domain tracks no status for it; add it with "
            "`cim-place add --server LEAF FILE` (a new object appears once the controller "
            "has seen its ObjectStored event)"
        )
    return status


async def summary(js: JetStreamContext) -> dict[str, Any]:
    """Objects by state (the controller's summary) and nodes by state (live heartbeats)."""
    from cim_place.cluster.state.cid_shards import read_shard_summaries
    from cim_place.cluster.state.locations import LocationStore

    states = [node["state"] for node in await nodes(js)]
    written = None
    note = ""
    try:
        store = await LocationStore(js).open(create=False)
        written = await store.summary()
        # Sharded controllers (`controller --shards N`) write one summary per shard: summed.
        sharded, missing = await read_shard_summaries(store.bucket)
        if sharded is not None and (written is None or sharded.updated_at >= written.updated_at):
            written = sharded
            if missing:
                note = f"{missing} controller shard(s) have written no summary yet"
        if written is None:
            note = "no summary yet: the controller writes one after its first pass"
    except TransportError as error:
        note = str(error)
    by_state = dict.fromkeys(STATES, 0)
    if written is not None:
        by_state.update(written.by_state)
    return {
        "objects": written.objects if written else 0,
        "by_state": by_state,
        "under_replicated": written.under_replicated if written else 0,
        "damaged_replicas": written.damaged_replicas if written else 0,
        "lost": written.lost if written else 0,
        "bytes": written.total_bytes if written else 0,
        "rejected_events": written.rejected_events if written else 0,
        "nodes": {
            "up": states.count("up"),
            "late": states.count("late"),
            "down": written.nodes_down if written else 0,
            "draining": states.count("draining"),
        },
        "updated_at": written.updated_at if written else None,
        "warnings": list(written.warnings) if written else [],
        "note": note or None,
    }


async def listing(js: JetStreamContext, state: str | None) -> list[ObjectStatus]:
    """Every object record (those in ``state``, if given): a scan of the location shards."""
    from cim_place.cluster.state.locations import LocationStore

    store = await LocationStore(js).open(create=False)
    return [status async for status in store.list(state=state)]


async def nodes(js: JetStreamContext) -> list[dict[str, Any]]:
    """Every node with a live heartbeat: labels, volumes, used and free bytes, state."""
    from cim_place.cluster.state.nodes import list_nodes

    records = await list_nodes(js)
    drained = await draining(js)
    now = time.time()
    return [
        {
            "node": r.node,
            "state": node_state(r, now, drained),
            "labels": dict(r.labels),
            "tags": list(r.tags),
            "volumes": [
                {"name": v.name, "capacity": v.capacity, "used": v.used, "free": v.free}
                for v in r.volumes
            ],
            "used": sum(v.used for v in r.volumes),
            "free": sum(v.free for v in r.volumes),
            "version": r.version,
            "started_at": r.started_at,
            "heartbeat_at": r.heartbeat_at,
            "heartbeat_age": round(max(0.0, now - r.heartbeat_at), 3),
        }
        for r in records
    ]


async def queue(js: JetStreamContext) -> tuple[dict[str, dict[str, int]], str | None]:
    """Per node: queued (waiting) and running (delivered, not yet acked) tasks."""
    import nats.errors
    import nats.js.errors

    from cim_place.cluster.nats.subjects import TASKS_STREAM, Subjects

    subjects = Subjects()
    try:
        info = await js.stream_info(TASKS_STREAM, subjects_filter=subjects.all_tasks)
        consumers = await js.consumers_info(TASKS_STREAM)
    except nats.js.errors.NotFoundError:
        return {}, f"stream {TASKS_STREAM} does not exist yet: no task was ever queued"
    except nats.errors.Error as error:
        raise TransportError(f"cannot read stream {TASKS_STREAM}: {error}") from error
    per_node: dict[str, dict[str, int]] = {}
    prefix = subjects.task("x")[:-1]
    for subject, count in (info.state.subjects or {}).items():
        node = subject[len(prefix) :] if subject.startswith(prefix) else subject
        per_node.setdefault(node, {"queued": 0, "running": 0})["queued"] += int(count)
    for consumer in consumers:
        name = consumer.name or ""
        if not name.startswith("tasks-"):
            continue
        node = name[len("tasks-") :]
        running = int(consumer.num_ack_pending or 0)
        entry = per_node.setdefault(node, {"queued": 0, "running": 0})
        entry["running"] = running
        # A work queue keeps a task until it is acked: the running ones are in the count too.
        entry["queued"] = max(0, entry["queued"] - running)
    return dict(sorted(per_node.items())), None


async def task_events(
    js: JetStreamContext, limit: int, *, root: str | None = None, completed: bool = False
) -> tuple[list[dict[str, Any]], str | None]:
    """The last ``limit`` TaskFailed events (and TaskCompleted with ``completed``), oldest
    first, only those of ``root`` if given; a note instead when the events cannot be read."""
    from cim_place.cluster.events.readers import EventReader
    from cim_place.cluster.events.types import TaskCompleted, TaskFailed
    from cim_place.cluster.nats.subjects import Subjects
    from cim_place.cluster.tasks.model import TASK_COMPLETED, TASK_FAILED
    from cim_place.objectstore import cid as cids

    kinds = (TASK_FAILED, TASK_COMPLETED) if completed else (TASK_FAILED,)
    found: list[dict[str, Any]] = []
    for kind in kinds:
        recent: deque[dict[str, Any]] = deque(maxlen=limit)
        reader = EventReader(js, filter_subject=f"{Subjects().prefix}.evt.*.{kind}")
        try:
            remaining = await reader.pending()
            while remaining > 0:
                batch = await reader.fetch_stored(timeout=1.0)
                if not batch:
                    break
                remaining -= len(batch)
                for stored in batch:
                    envelope = stored.envelope
                    try:
                        event = (
                            TaskFailed.from_body(envelope.content.body)
                            if kind == TASK_FAILED
                            else TaskCompleted.from_body(envelope.content.body)
                        )
                    except CimPlaceError:
                        continue
                    event_root = cids.to_str(event.root) if event.root is not None else None
                    if root is not None and event_root != root:
                        continue
                    entry: dict[str, Any] = {
                        "task_id": event.task_id,
                        "action": event.action,
                        "node": event.node,
                        "root": event_root,
                        "volume": event.volume,
                        "attempts": event.attempts,
                        "outcome": "completed",
                        "permanent": False,
                        "reason": "",
                        "duration": event.duration,
                        "sequence": envelope.sequence,
                        "at": stored.stored_at,
                    }
                    if isinstance(event, TaskFailed):
                        entry.update(
                            outcome="failed", permanent=event.permanent, reason=event.reason
                        )
                    recent.append(entry)
        except TransportError as error:
            return [], f"task events unknown: {error}"
        finally:
            await reader.close()
        found.extend(recent)
    events = sorted(found, key=lambda event: int(event["sequence"] or 0))[-limit:]
    if not completed:  # the CLI's schema (docs/STATUS.md) predates these fields
        for shown in events:
            for key in ("outcome", "duration", "at"):
                shown.pop(key)
    return events, None


async def tasks(js: JetStreamContext, limit: int) -> dict[str, Any]:
    """Queued and running tasks per node and the most recent failures."""
    per_node, queue_note = await queue(js)
    failed, failed_note = await task_events(js, limit)
    return {
        "queued": sum(n["queued"] for n in per_node.values()),
        "running": sum(n["running"] for n in per_node.values()),
        "nodes": per_node,
        "failed": failed,
        "notes": [n for n in (queue_note, failed_note) if n],
    }

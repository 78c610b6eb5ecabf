"""The hand-written event and task bodies that the generic codec replaced, kept as a test oracle.

Frozen copies of the per-class ``body()`` / ``from_body()`` and field readers as they were before
``cim_place.cluster.nats.bodies``: the property tests in ``test_codec.py`` check that the generic
codec writes the same bytes and reads the same events (or names the same problem). Do not edit
them to follow a change of the codec; a deliberate change of the wire format updates the tests.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from cim_place.cluster.events.types import (
    EventBodyError,
    InventoryDigest,
    NodeJoined,
    NodeLeft,
    ObjectRemoved,
    ObjectStored,
    TaskCompleted,
    TaskFailed,
)
from cim_place.cluster.tasks.model import Task
from cim_place.objectstore.dagcbor import Link

TASK_ACTIONS = ("fetch", "drop", "verify", "repair")
LEGACY_TYPES = {
    "ObjectStored",
    "ObjectRemoved",
    "InventoryDigest",
    "NodeJoined",
    "NodeLeft",
    "TaskCompleted",
    "TaskFailed",
}
"""The event types that had hand-written bodies."""


def _field(body: Mapping[str, Any], key: str, event: str) -> Any:
    if key not in body:
        raise EventBodyError(f"{event} body is missing field {key!r}")
    return body[key]


def _str(body: Mapping[str, Any], key: str, event: str) -> str:
    value = _field(body, key, event)
    if not isinstance(value, str):
        raise EventBodyError(f"{event}.{key} must be a string, got {type(value).__name__}")
    return value


def _opt_str(body: Mapping[str, Any], key: str, event: str) -> str | None:
    if body.get(key) is None:
        return None
    return _str(body, key, event)


def _count(body: Mapping[str, Any], key: str, event: str) -> int:
    value = _field(body, key, event)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise EventBodyError(f"{event}.{key} must be a non-negative integer, got {value!r}")
    return value


def _seconds(body: Mapping[str, Any], key: str, event: str) -> float:
    value = _field(body, key, event)
    if not isinstance(value, int | float) or isinstance(value, bool) or value < 0:
        raise EventBodyError(f"{event}.{key} must be a non-negative number, got {value!r}")
    return float(value)


def _cid(body: Mapping[str, Any], key: str, event: str) -> bytes:
    value = _field(body, key, event)
    if not isinstance(value, Link):
        raise EventBodyError(f"{event}.{key} must be a CID link (tag 42), got {value!r}")
    return value.cid


def _opt_cid(body: Mapping[str, Any], key: str, event: str) -> bytes | None:
    if body.get(key) is None:
        return None
    return _cid(body, key, event)


def _str_map(body: Mapping[str, Any], key: str, event: str) -> dict[str, str]:
    value = body.get(key, {})
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise EventBodyError(f"{event}.{key} must map strings to strings")
    return {k: str(v) for k, v in value.items()}


def _str_list(body: Mapping[str, Any], key: str, event: str) -> list[str]:
    value = body.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise EventBodyError(f"{event}.{key} must be a list of strings")
    return [str(v) for v in value]


def _action(body: Mapping[str, Any], key: str, event: str) -> str:
    value = _str(body, key, event)
    if value in TASK_ACTIONS:
        return value
    raise EventBodyError(f"{event}.{key} must be one of {', '.join(TASK_ACTIONS)}, got {value!r}")


def body(event: Any) -> dict[str, Any]:
    """The body the old per-class ``body()`` built."""
    if isinstance(event, ObjectStored | ObjectRemoved):
        return {
            "root": Link(event.root),
            "size": event.size,
            "blocks": event.blocks,
            "volume": event.volume,
            "owner": event.owner,
            "name": event.name,
            "metadata": dict(event.metadata),
        }
    if isinstance(event, InventoryDigest):
        return {
            "volume": event.volume,
            "pins": event.pins,
            "size": event.size,
            "digest": event.digest,
            "taken_at": event.taken_at,
        }
    if isinstance(event, NodeJoined):
        return {
            "node": event.node,
            "labels": dict(event.labels),
            "tags": list(event.tags),
            "volumes": list(event.volumes),
            "version": event.version,
            "started_at": event.started_at,
        }
    if isinstance(event, NodeLeft):
        return {"node": event.node, "reason": event.reason}
    if isinstance(event, TaskCompleted):
        return {
            "task_id": event.task_id,
            "action": event.action,
            "node": event.node,
            "root": None if event.root is None else Link(event.root),
            "volume": event.volume,
            "attempts": event.attempts,
            "duration": event.duration,
            "result": dict(event.result),
        }
    if isinstance(event, TaskFailed):
        return {
            "task_id": event.task_id,
            "action": event.action,
            "node": event.node,
            "root": None if event.root is None else Link(event.root),
            "volume": event.volume,
            "attempts": event.attempts,
            "reason": event.reason,
            "permanent": event.permanent,
            "duration": event.duration,
        }
    raise TypeError(f"no legacy body for {type(event).__name__}")


def from_body(cls: type[Any], body: Mapping[str, Any]) -> Any:
    """The event the old per-class ``from_body()`` read (or the EventBodyError it raised)."""
    t = cls.TYPE
    if cls in (ObjectStored, ObjectRemoved):
        return cls(
            root=_cid(body, "root", t),
            size=_count(body, "size", t),
            blocks=_count(body, "blocks", t),
            volume=_str(body, "volume", t),
            owner=_str(body, "owner", t),
            name=_opt_str(body, "name", t),
            metadata=_str_map(body, "metadata", t),
        )
    if cls is InventoryDigest:
        digest = _field(body, "digest", t)
        if not isinstance(digest, bytes) or len(digest) != 32:
            raise EventBodyError(f"{t}.digest must be 32 bytes (SHA-256), got {digest!r}")
        return cls(
            volume=_str(body, "volume", t),
            pins=_count(body, "pins", t),
            size=_count(body, "size", t),
            digest=digest,
            taken_at=_seconds(body, "taken_at", t),
        )
    if cls is NodeJoined:
        return cls(
            node=_str(body, "node", t),
            labels=_str_map(body, "labels", t),
            tags=tuple(_str_list(body, "tags", t)),
            volumes=tuple(_str_list(body, "volumes", t)),
            version=_str(body, "version", t),
            started_at=_seconds(body, "started_at", t),
        )
    if cls is NodeLeft:
        return cls(node=_str(body, "node", t), reason=_str(body, "reason", t))
    if cls is TaskCompleted:
        result = body.get("result", {})
        if not isinstance(result, dict):
            raise EventBodyError(f"{t}.result must be a map")
        return cls(
            task_id=_str(body, "task_id", t),
            action=_action(body, "action", t),
            node=_str(body, "node", t),
            root=_opt_cid(body, "root", t),
            volume=_opt_str(body, "volume", t),
            attempts=_count(body, "attempts", t),
            duration=_seconds(body, "duration", t),
            result=result,
        )
    if cls is TaskFailed:
        permanent = body.get("permanent", False)
        if not isinstance(permanent, bool):
            raise EventBodyError(f"{t}.permanent must be a boolean")
        return cls(
            task_id=_str(body, "task_id", t),
            action=None if body.get("action") is None else _action(body, "action", t),
            node=_str(body, "node", t),
            root=_opt_cid(body, "root", t),
            volume=_opt_str(body, "volume", t),
            attempts=_count(body, "attempts", t),
            reason=_str(body, "reason", t),
            permanent=permanent,
            duration=_seconds(body, "duration", t) if "duration" in body else 0.0,
        )
    raise TypeError(f"no legacy decoder for {cls.__name__}")


def task_body(task: Task) -> dict[str, Any]:
    """The body the old ``Task.body()`` built."""
    return {
        "task_id": task.id,
        "kind": task.kind,
        "node": task.node,
        "root": Link(task.root),
        "holders": list(task.holders),
        "volume": task.volume,
        "generation": task.generation,
        "reason": task.reason,
        "created_by": task.created_by,
        "name": task.name,
        "owner": task.owner,
        "metadata": dict(task.metadata),
    }

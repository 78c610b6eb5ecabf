"""Where an object is and whether it is healthy: the status the controller materialises.

One :class:`ObjectStatus` per CID is written to the locations (key: the CID text, in one of the
shard buckets ``cim-place-locations-NN``: :mod:`cim_place.cluster.state.locations`), so
``cim-place status CID`` is a single lookup and never asks the nodes. Its JSON form is the
documented schema of ``cim-place status --json``:

    {"cid": str, "name": str | null, "owner": str, "size": int, "metadata": {str: str},
     "policy": str, "desired": int,
     "state": "placed" | "progressing" | "degraded" | "lost" | "removed" | "expired",
     "locations": [{"node": str, "volume": str, "zone": str, "state": str,
                    "verified_at": float (when known), "cause"?: str}],
     "conditions": [{"type": str, "status": bool, "reason": str, "message": str,
                     "last_transition": float}],
     "updated_at": float}

Replica states: ``pinned`` (confirmed by an ObjectStored event), ``fetching`` (a fetch task is in
flight), ``dropping`` (a drop task is in flight), ``late`` (pinned on a node whose heartbeat is
overdue but within the repair grace), ``lost`` (pinned on a node that is down past the grace),
``damaged`` (a scrub, a serve, a read or a fetch found blocks of it corrupt or missing: it is not
a copy until repaired), ``repairing`` (damaged, a repair task in flight). ``verified_at`` is
when the replica was last known whole: pinned (every block verified on arrival) or repaired.
An object is ``degraded`` while it has fewer verified copies than desired and ``lost`` when no
verified copy exists anywhere (docs/DURABILITY.md).
``cached`` (an extra copy that demand added, with the demand that caused it in ``cause``; never
counted towards the policy's copies: docs/DEMAND.md). ``cause`` is written only when set.
Conditions follow the Kubernetes habit: ``last_transition`` moves only when ``status`` flips.

``expired``: the policy's ``expire_after`` has passed; its copies are being dropped (``desired``
is 0, so it is never under-replicated nor lost), and the status is deleted once none is left.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

ObjectState = Literal["placed", "progressing", "degraded", "lost", "removed", "expired"]
OBJECT_STATES: tuple[ObjectState, ...] = (
    "placed",
    "progressing",
    "degraded",
    "lost",
    "removed",
    "expired",
)
ReplicaState = Literal[
    "pinned", "fetching", "dropping", "late", "lost", "damaged", "repairing", "cached"
]
REPLICA_STATES: tuple[ReplicaState, ...] = (
    "pinned",
    "fetching",
    "dropping",
    "late",
    "lost",
    "damaged",
    "repairing",
    "cached",
)
CONDITION_TYPES = ("Placed", "Progressing", "Degraded")


@dataclass(frozen=True, slots=True)
class Location:
    node: str
    volume: str
    zone: str = ""
    state: ReplicaState = "pinned"
    verified_at: float | None = None
    cause: str = ""
    """Why a ``cached`` copy is there, e.g. ``7 reads in 10m from leaf-5``."""


@dataclass(frozen=True, slots=True)
class Condition:
    type: str
    status: bool
    reason: str = ""
    message: str = ""
    last_transition: float = 0.0


@dataclass(frozen=True, slots=True)
class ObjectStatus:
    cid: str
    state: ObjectState
    locations: tuple[Location, ...] = ()
    desired: int = 0
    policy: str = ""
    name: str | None = None
    owner: str = ""
    size: int = 0
    metadata: Mapping[str, str] = field(default_factory=dict)
    conditions: tuple[Condition, ...] = ()
    updated_at: float = 0.0

    def fingerprint(self) -> int:
        """A hash of every field (what :meth:`encode` writes) without encoding it: the
        controller compares it with the status it last wrote, and most reconciles change
        nothing. Salted per process, like every ``hash`` of text: never stored."""
        return hash(
            (
                self.cid,
                self.state,
                self.locations,
                self.desired,
                self.policy,
                self.name,
                self.owner,
                self.size,
                tuple(sorted(self.metadata.items())),
                self.conditions,
                self.updated_at,
            )
        )

    @property
    def pinned(self) -> int:
        return sum(1 for location in self.locations if location.state == "pinned")

    @property
    def damaged(self) -> int:
        """Replicas known damaged (repairing ones included): none of them counts as a copy."""
        return sum(1 for loc in self.locations if loc.state in ("damaged", "repairing"))

    def to_dict(self) -> dict[str, object]:
        return {
            "cid": self.cid,
            "name": self.name,
            "owner": self.owner,
            "size": self.size,
            "metadata": dict(self.metadata),
            "policy": self.policy,
            "desired": self.desired,
            "state": self.state,
            "locations": [_location_dict(loc) for loc in self.locations],
            "conditions": [
                {
                    "type": c.type,
                    "status": c.status,
                    "reason": c.reason,
                    "message": c.message,
                    "last_transition": c.last_transition,
                }
                for c in self.conditions
            ],
            "updated_at": self.updated_at,
        }

    def encode(self) -> bytes:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def decode(cls, data: bytes) -> ObjectStatus:
        """Parse a stored status; raises ValueError naming what is malformed."""
        try:
            doc = json.loads(data)
            state = doc["state"]
            if state not in OBJECT_STATES:
                raise ValueError(f"unknown object state {state!r}")
            locations = []
            for loc in doc.get("locations", []):
                if loc["state"] not in REPLICA_STATES:
                    raise ValueError(f"unknown replica state {loc['state']!r}")
                verified = loc.get("verified_at")
                locations.append(
                    Location(
                        str(loc["node"]),
                        str(loc["volume"]),
                        str(loc.get("zone", "")),
                        loc["state"],
                        None if verified is None else float(verified),
                        str(loc.get("cause", "")),
                    )
                )
            return cls(
                cid=str(doc["cid"]),
                state=state,
                locations=tuple(locations),
                desired=int(doc.get("desired", 0)),
                policy=str(doc.get("policy", "")),
                name=doc.get("name"),
                owner=str(doc.get("owner", "")),
                size=int(doc.get("size", 0)),
                metadata={str(k): str(v) for k, v in doc.get("metadata", {}).items()},
                conditions=tuple(
                    Condition(
                        str(c["type"]),
                        bool(c["status"]),
                        str(c.get("reason", "")),
                        str(c.get("message", "")),
                        float(c.get("last_transition", 0.0)),
                    )
                    for c in doc.get("conditions", [])
                ),
                updated_at=float(doc.get("updated_at", 0.0)),
            )
        except (KeyError, TypeError, AttributeError, json.JSONDecodeError) as exc:
            raise ValueError(f"malformed object status: {exc!r}") from None


def _location_dict(loc: Location) -> dict[str, object]:
    doc: dict[str, object] = {
        "node": loc.node,
        "volume": loc.volume,
        "zone": loc.zone,
        "state": loc.state,
    }
    if loc.verified_at is not None:  # unknown (a fetch in flight): the key is left out
        doc["verified_at"] = loc.verified_at
    if loc.cause:
        doc["cause"] = loc.cause
    return doc


def merge_conditions(
    previous: Sequence[Condition], current: Sequence[Condition], now: float
) -> tuple[Condition, ...]:
    """``current`` with ``last_transition`` carried over from ``previous`` unless status flipped."""
    before = {c.type: c for c in previous}
    merged = []
    for condition in current:
        old = before.get(condition.type)
        # Built directly: ``dataclasses.replace`` costs several times a constructor, and this
        # runs for every condition of every object reconciled.
        since = old.last_transition if old is not None and old.status == condition.status else now
        merged.append(
            Condition(condition.type, condition.status, condition.reason, condition.message, since)
        )
    return tuple(merged)


@dataclass(frozen=True, slots=True)
class Summary:
    """Domain-wide counts, written by the controller under one key so the summary is one read."""

    objects: int = 0
    by_state: Mapping[str, int] = field(default_factory=dict)
    under_replicated: int = 0
    total_bytes: int = 0
    nodes_up: int = 0
    nodes_down: int = 0
    nodes_draining: int = 0
    updated_at: float = 0.0
    damaged_replicas: int = 0
    """Replicas known damaged (not counted as copies) across every object."""

    @property
    def lost(self) -> int:
        """Objects without a verified copy anywhere."""
        return int(self.by_state.get("lost", 0))

    rejected_events: int = 0
    """Events and node records the controller refused (failed validation) since it started."""
    warnings: tuple[str, ...] = ()
    """Policies the topology cannot satisfy, one line each (placement/topology.py)."""

    def encode(self) -> bytes:
        return json.dumps(
            {
                "objects": self.objects,
                "damaged_replicas": self.damaged_replicas,
                "lost": self.lost,
                "by_state": dict(self.by_state),
                "under_replicated": self.under_replicated,
                "bytes": self.total_bytes,
                "nodes": {
                    "up": self.nodes_up,
                    "down": self.nodes_down,
                    "draining": self.nodes_draining,
                },
                "updated_at": self.updated_at,
                "rejected_events": self.rejected_events,
                "warnings": list(self.warnings),
            },
            sort_keys=True,
        ).encode()

    @classmethod
    def decode(cls, data: bytes) -> Summary:
        try:
            doc = json.loads(data)
            nodes = doc.get("nodes", {})
            return cls(
                objects=int(doc["objects"]),
                by_state={str(k): int(v) for k, v in doc.get("by_state", {}).items()},
                under_replicated=int(doc.get("under_replicated", 0)),
                total_bytes=int(doc.get("bytes", 0)),
                nodes_up=int(nodes.get("up", 0)),
                nodes_down=int(nodes.get("down", 0)),
                nodes_draining=int(nodes.get("draining", 0)),
                updated_at=float(doc.get("updated_at", 0.0)),
                damaged_replicas=int(doc.get("damaged_replicas", 0)),
                rejected_events=int(doc.get("rejected_events", 0)),
                warnings=tuple(str(w) for w in doc.get("warnings", [])),
            )
        except (KeyError, TypeError, AttributeError, json.JSONDecodeError) as exc:
            raise ValueError(f"malformed summary: {exc!r}") from None

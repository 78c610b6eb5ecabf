"""The controller's in-memory projection of the domain: objects, replicas, tasks, nodes, policies.

This module owns the state the reconciler reads. It is built from three inputs and does no I/O:

1. **events** (:meth:`Projection.apply_event`): ``ObjectStored`` / ``ObjectRemoved`` add and
   remove confirmed replicas; ``TaskCompleted`` / ``TaskFailed`` end tasks in flight (and count
   failures, so a retried task gets a new generation and so a new id); ``InventoryDigest`` records
   what a volume says it holds, for :meth:`Projection.drift`; ``ReplicaDamaged`` marks a
   confirmed replica damaged (it no longer counts) until an ``ObjectStored`` of the same
   replica (a repair, a new fetch) or an ``ObjectRemoved`` clears it. A damage report whose
   ``node`` is not the publishing node is rejected. The time of a replica's last
   ``ObjectStored`` is its last verification (every block is verified before a pin).
2. **nodes** (:meth:`Projection.update_node`, :meth:`Projection.sync_nodes`,
   :meth:`Projection.remove_node`, :meth:`Projection.set_draining`): the heartbeats of KV
   ``cim-place-nodes`` and the drain flags.
3. **policies** (:meth:`Projection.set_policies`).

Every mutation returns the CIDs whose reconcile is now due ("dirty keys"), so the controller's
queue stays level-triggered: an event marks the CID it is about; a node that disappears, changes
its labels, tags or volume names, comes back, or is (un)drained marks every CID with a replica on
it; a new node marks nothing, holding nothing (rebalancing is a separate, rate-limited pass); a
policy change marks every CID.

Memory is the constraint that shapes the layout (the target is at most 100 bytes per tracked
object at three replicas; docs/SCALE.md has the model): objects live in columns (``array`` of
sizes, times, sequences, owner and metadata ids, name offsets, replica location ids) indexed by
a slot number, 32 bits wide while the values fit (a column widens to 64 bits, once, on the first
value that does not); times are whole seconds; names sit in one UTF-8 blob; CIDs and their slots
are held by :class:`~cim_place.cluster.controller.cid_index.CidIndex` (33 bytes per CID plus its
hash table), not as Python objects. Measured: about 90 bytes per object at 1M
(bench/controller_scale.py), where a dict of CIDs cost about 260. Replicas are up to four 16-bit
location ids per slot (more spill into a small side dict); a location id stands for one interned
``(node, volume)`` pair. The node -> CIDs index is that location column itself: the CIDs on a
node are found with one vectorised scan (about 0.1 s at 1M objects, paid only on node changes),
which costs nothing per object, whereas a dict of sets would cost about 100 bytes per object for
three replicas.

The node that published an event is passed by the caller (the subject token of
``<prefix>.evt.<node>.<Type>``) or, failing that, taken from the envelope's ``owner``, which the
agent sets to its node id.
"""

from __future__ import annotations

import time
from array import array
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass

import numpy as np

from cim_place.cluster.controller.cid_index import CidIndex
from cim_place.cluster.events.types import (
    EventBodyError,
    InventoryDigest,
    ObjectDeleted,
    ObjectFields,
    ObjectRemoved,
    ObjectStored,
    ReplicaDamaged,
    TaskCompleted,
    TaskFailed,
    inventory_digest,
    object_fields,
    parse_event,
)
from cim_place.cluster.events.validate import (
    Rejection,
    check_event,
    check_object_fields,
    valid_name,
)
from cim_place.cluster.nats.envelope import Envelope
from cim_place.cluster.state.nodes import NodeRecord, check_node_record
from cim_place.cluster.tasks.model import Task
from cim_place.objectstore.cid import Cid
from cim_place.placement.reconcile_model import Replica
from cim_place.policies.model import PolicySet

__all__ = [
    "FailureKey",
    "LastFailure",
    "ObjectView",
    "Projection",
    "Replica",
    "TaskInFlight",
]

"""A confirmed replica: ``(node, volume name)``."""
FailureKey = tuple[str, str, str | None]
"""``(task kind, node, volume)`` of a failed task, per CID."""

_WIDTH = 4
"""Replica location ids stored inline per object; a fifth and later spill into a side dict."""
_EMPTY = 0
_MAX_LOCATIONS = 0xFFFF


@dataclass(frozen=True, slots=True)
class ObjectView:
    """One tracked object as the reconciler sees it (built on demand, not stored)."""

    cid: Cid
    size: int
    owner: str
    name: str | None
    metadata: Mapping[str, str]
    first_seen: float
    """When the first ObjectStored of this CID was applied (see :meth:`Projection.apply_event`)."""
    sequence: int
    """Stream sequence of the last event applied about this CID (0: none known)."""
    replicas: frozenset[Replica]


@dataclass(frozen=True, slots=True)
class TaskInFlight:
    """A task the controller enqueued and for which no TaskCompleted / TaskFailed arrived yet."""

    id: str
    kind: str
    node: str
    root: Cid
    volume: str | None
    enqueued_at: float
    repair_policy: str | None = None
    """The policy whose ``repair.max_concurrent`` this task counts against (None: no repair)."""


@dataclass(frozen=True, slots=True)
class LastFailure:
    """The most recent TaskFailed of one (kind, node, volume) of a CID."""

    at: float
    permanent: bool
    reason: str


def _node_signature(record: NodeRecord) -> tuple[object, ...]:
    # What makes a node change relevant to placement: not free bytes or the heartbeat time,
    # which change every beat and would otherwise mark every CID of the node every 5 s.
    return (
        tuple(sorted(record.labels.items())),
        tuple(sorted(record.tags)),
        tuple(sorted(v.name for v in record.volumes)),
    )


class Projection:
    """Objects, replicas, tasks in flight, failures, inventories, nodes and policies.

    Not thread-safe; the controller owns one and mutates it from its event loop. Every mutator
    returns the set of CIDs (binary) whose reconcile is due.
    """

    def __init__(self) -> None:
        # -- objects, in columns indexed by slot ------------------------------------------------
        # CID -> slot and back, with free-slot reuse (cid_index.py: ~40 bytes per CID where a
        # dict and a list of the CIDs cost ~200).
        self._index = CidIndex()
        # 32-bit columns while the values fit; _widen makes one 64-bit on the first that does
        # not (an object over 4 GiB, a stream past 2**32 events, a name blob over 2 GiB).
        self._size = array("I")
        # Times in whole seconds: a float per object would cost 4 bytes more, and a second is
        # finer than anything decided on them (expiry, the age of a verification).
        self._first_seen = array("I")
        self._sequence = array("I")
        self._owner = array("I")
        self._meta = array("I")
        # Names as UTF-8 in one blob (offset, length; offset -1: no name): a str per object
        # would cost ~60 bytes, the blob costs the name's bytes. A renamed object leaves its old
        # name behind in the blob; renames are rare, so no compaction.
        self._names = bytearray()
        self._name_at = array("i")
        self._name_len = array("H")
        self._rep = array("H")
        self._rep_more: dict[int, list[int]] = {}
        # When each inline replica was last stored (= verified whole), in whole seconds.
        self._rep_at = array("I")
        # Damaged replicas, sparse: cid -> replica -> bad block CIDs.
        self._damaged: dict[bytes, dict[Replica, frozenset[Cid]]] = {}
        # -- interning: owners and metadata maps by id, locations by id -------------------------
        self._strings: list[str] = [""]
        self._string_id: dict[str, int] = {"": 0}
        self._metas: list[Mapping[str, str]] = [{}]
        self._meta_id: dict[tuple[tuple[str, str], ...], int] = {(): 0}
        self._locations: list[Replica] = [("", "")]  # id 0 means "no replica"
        self._location_id: dict[Replica, int] = {}
        # -- sparse state -----------------------------------------------------------------------
        self._tasks: dict[str, TaskInFlight] = {}
        self._tasks_by_cid: dict[bytes, set[str]] = {}
        self.task_changes = 0
        """Bumped whenever a task starts or ends: what the controller's cached budget checks."""
        self._failures: dict[bytes, dict[FailureKey, int]] = {}
        self._last_failure: dict[bytes, dict[FailureKey, LastFailure]] = {}
        self._inventories: dict[Replica, InventoryDigest] = {}
        self._deleted: dict[bytes, ObjectDeleted] = {}
        self.nodes: dict[str, NodeRecord] = {}
        """Nodes with a live heartbeat, by id."""
        self._signatures: dict[str, tuple[object, ...]] = {}
        self.draining: set[str] = set()
        """Nodes being drained (``cim-place node drain``)."""
        self.policies = PolicySet()
        self.last_sequence = 0
        """Highest stream sequence applied (resume a reader after it)."""
        self.applied = 0
        """Events applied."""
        self.total_size = 0
        """Content bytes of every tracked object (kept as events apply: the summary reads it
        every second, and a scan of the objects would cost O(objects) each time)."""
        self.rejected = 0
        """Events skipped because they failed validation (counted, never raised)."""
        self.rejections: dict[str, int] = {}
        """Rejected events by reason (cim_place.cluster.events.validate)."""
        self.on_reject: Callable[[Rejection, str, str], None] | None = None
        """Told each rejection, the publishing node and the event type (the controller logs and
        counts it)."""
        self.replayed = 0
        """Events skipped because their sequence was already applied (a redelivery)."""

    # -- reading ----------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, cid: object) -> bool:
        return cid in self._index

    def cids(self) -> Iterator[Cid]:
        """Every tracked CID (a snapshot: safe to mutate the projection while iterating)."""
        return iter(self._index.keys())

    def object(self, cid: Cid) -> ObjectView | None:
        """The tracked object ``cid``, or None if no ObjectStored for it was applied."""
        slot = self._index.get(cid)
        if slot is None:
            return None
        name = self._name(slot)
        return ObjectView(
            cid=cid,
            size=self._size[slot],
            owner=self._strings[self._owner[slot]],
            name=name,
            metadata=self._metas[self._meta[slot]],
            first_seen=float(self._first_seen[slot]),
            sequence=self._sequence[slot],
            replicas=frozenset(self._locations[i] for i in self._replica_ids(slot)),
        )

    def size(self, cid: Cid) -> int:
        """Content bytes of ``cid`` (0 if unknown), without building its :class:`ObjectView`."""
        slot = self._index.get(cid)
        return 0 if slot is None else self._size[slot]

    def replicas(self, cid: Cid) -> frozenset[Replica]:
        """Confirmed ``(node, volume)`` replicas of ``cid`` (empty if unknown)."""
        slot = self._index.get(cid)
        if slot is None:
            return frozenset()
        return frozenset(self._locations[i] for i in self._replica_ids(slot))

    def damaged(self, cid: Cid) -> Mapping[Replica, frozenset[Cid]]:
        """Confirmed replicas of ``cid`` reported damaged (with their bad blocks)."""
        return dict(self._damaged.get(cid, {}))

    @property
    def damaged_replicas(self) -> int:
        """Damaged replicas across every object (for the summary)."""
        return sum(len(replicas) for replicas in self._damaged.values())

    def verified_at(self, cid: Cid) -> dict[Replica, float]:
        """When each replica of ``cid`` was last stored whole (replicas beyond the inline four
        have no time)."""
        slot = self._index.get(cid)
        if slot is None:
            return {}
        base = slot * _WIDTH
        return {
            self._locations[location]: float(self._rep_at[base + k])
            for k in range(_WIDTH)
            if (location := self._rep[base + k])
        }

    def cids_on(self, node: str, volume: str | None = None) -> set[Cid]:
        """CIDs with a confirmed replica on ``node`` (on its ``volume`` only, if given)."""
        return self._cids_at(
            [
                i
                for i, (n, v) in enumerate(self._locations)
                if i and n == node and (volume is None or v == volume)
            ]
        )

    def cids_on_nodes(self, nodes: Iterable[str]) -> set[Cid]:
        """CIDs with a confirmed replica on any of ``nodes`` (one scan for them all)."""
        wanted = set(nodes)
        return self._cids_at([i for i, (n, _) in enumerate(self._locations) if i and n in wanted])

    def _cids_at(self, locations: list[int]) -> set[Cid]:
        if not locations:
            return set()
        return set(self._index.keys_at(self._slots_with(locations)))

    def tasks_for(self, cid: Cid) -> tuple[TaskInFlight, ...]:
        """Tasks in flight about ``cid``, in the order they were enqueued."""
        ids = self._tasks_by_cid.get(cid, ())
        return tuple(sorted((self._tasks[i] for i in ids), key=lambda t: t.enqueued_at))

    def task(self, task_id: str) -> TaskInFlight | None:
        return self._tasks.get(task_id)

    def in_flight(self) -> Iterator[TaskInFlight]:
        """Every task in flight (for the controller's rate limits)."""
        return iter(self._tasks.values())

    @property
    def tasks_in_flight(self) -> int:
        return len(self._tasks)

    def failures(self, cid: Cid) -> Mapping[FailureKey, int]:
        """Failed tasks about ``cid``: ``(kind, node, volume) -> count``."""
        return dict(self._failures.get(cid, {}))

    def generation(self, cid: Cid, kind: str, node: str, volume: str | None) -> int:
        """The generation for the next such task: the number of failures of that task so far.

        A task that failed keeps its deterministic id for its generation; bumping the generation
        gives the retry a new id, so JetStream's duplicate window does not drop it.
        """
        return self._failures.get(cid, {}).get((kind, node, volume), 0)

    def last_failure(self, cid: Cid, key: FailureKey) -> LastFailure | None:
        """When the last failure of that task happened, whether it was permanent, and why."""
        return self._last_failure.get(cid, {}).get(key)

    def clear_failures(self, cid: Cid) -> None:
        """Forget the failures of ``cid`` (for example once it is placed again)."""
        self._failures.pop(cid, None)
        self._last_failure.pop(cid, None)

    def inventory(self, node: str, volume: str) -> InventoryDigest | None:
        """The last InventoryDigest that ``node`` published for ``volume``."""
        return self._inventories.get((node, volume))

    def inventoried(self) -> list[Replica]:
        """Every ``(node, volume)`` with an InventoryDigest."""
        return list(self._inventories)

    def drift(self, node: str, volume: str) -> bool | None:
        """Whether ``node``'s last InventoryDigest for ``volume`` disagrees with the projection.

        None when no digest is known. True means the projected roots on that volume do not hash
        to the digest the agent reported: the controller then asks the agent for its full list.
        A digest taken while events were still in flight can disagree briefly; check again after
        the next digest before acting.
        """
        reported = self._inventories.get((node, volume))
        if reported is None:
            return None
        return inventory_digest(self.cids_on(node, volume)) != reported.digest

    # -- events -----------------------------------------------------------------------------------

    def apply_event(
        self, envelope: Envelope, *, node: str | None = None, at: float | None = None
    ) -> set[Cid]:
        """Apply one event; returns the CIDs it makes due for reconcile.

        ``node`` is the publishing node (the subject token); None falls back to the envelope's
        owner. ``at`` is when the event was stored (the stream's timestamp), used as
        ``first_seen`` of a new object; None means now. An event with an invalid body, or of a
        kind other than ``event``, is counted in :attr:`rejected` and changes nothing; one with a
        stream sequence at or below :attr:`last_sequence` (a redelivery) in :attr:`replayed`.
        """
        if envelope.sequence is not None:
            # At-least-once delivery may hand a batch over again: what was applied stays applied.
            if envelope.sequence <= self.last_sequence:
                self.replayed += 1
                return set()
            self.last_sequence = envelope.sequence
        if at is None:
            at = time.time()
        # Nothing reaches the state below unless it is believable (validate.py says what that
        # means); a rejection is counted, reported and otherwise ignored.
        publisher = node or envelope.owner
        content = envelope.content
        fields = None
        if content.type == ObjectStored.TYPE and content.kind == "event" and valid_name(publisher):
            # The bulk of every rebuild: read once, checked, applied without a typed event.
            fields = object_fields(content.body)
        rejection = (
            check_event(envelope, publisher) if fields is None else check_object_fields(fields)
        )
        if rejection is not None:
            self._reject(rejection, publisher, content.type)
            return set()
        if fields is not None:
            if self._deleted:
                self._stored_after_removal(fields[0])
            self.applied += 1
            self._store(fields, publisher, envelope.sequence or 0, at)
            return {fields[0]}
        try:
            event = parse_event(envelope)
        except EventBodyError as exc:
            self._reject(Rejection("malformed", str(exc)), publisher, content.type)
            return set()
        self.applied += 1
        sequence = envelope.sequence or 0
        if isinstance(event, ObjectStored):
            self._stored_after_removal(event.root)
            self._stored(event, publisher, sequence, at)
            return {event.root}
        if isinstance(event, ObjectDeleted):
            if event.root not in self._index:
                return set()
            self._deleted[event.root] = event
            return {event.root}
        if isinstance(event, ObjectRemoved):
            if self._removed(event, publisher, sequence):
                return {event.root}
            return set()
        if isinstance(event, TaskCompleted | TaskFailed):
            return self._task_ended(event, envelope, sequence, at)
        if isinstance(event, ReplicaDamaged):
            return self._damage(event, publisher)
        if isinstance(event, InventoryDigest):
            self._inventories[(publisher, event.volume)] = event
        # NodeJoined / NodeLeft: the heartbeats in KV are the source of truth for nodes.
        return set()

    def _reject(self, rejection: Rejection, node: str, event_type: str) -> None:
        self.rejected += 1
        self.rejections[rejection.reason] = self.rejections.get(rejection.reason, 0) + 1
        if self.on_reject is not None:
            self.on_reject(rejection, node, event_type)

    def drop_replica(self, cid: Cid, node: str, volume: str) -> set[Cid]:
        """Forget the replica of ``cid`` on ``(node, volume)`` (the node does not hold it)."""
        slot = self._index.get(cid)
        location = self._location_id.get((node, volume))
        if slot is None or location is None or location not in self._replica_ids(slot):
            return set()
        self._drop_replica(slot, location)
        return {cid}

    def apply_events(self, envelopes: Iterable[Envelope]) -> set[Cid]:
        """Apply a batch (a rebuild, a fetched batch); the union of their dirty CIDs."""
        dirty: set[Cid] = set()
        for envelope in envelopes:
            dirty |= self.apply_event(envelope)
        return dirty

    def removal(self, cid: Cid) -> ObjectDeleted | None:
        """The tombstone of ``cid`` when it was removed from the domain (``cim-place rm``)."""
        return self._deleted.get(cid)

    def _stored_after_removal(self, root: Cid) -> None:
        # A copy confirmed while the removal is under way (a fetch that was in flight) is
        # dropped with the others; once no copy is left, storing the content again is a new add.
        if root in self._deleted and not self.replicas(root) and not self._tasks_by_cid.get(root):
            del self._deleted[root]

    def _stored(self, event: ObjectStored, node: str, sequence: int, at: float) -> None:
        fields = (
            event.root,
            event.size,
            event.blocks,
            event.volume,
            event.owner,
            event.name,
            event.metadata,
        )
        self._store(fields, node, sequence, at)

    def _store(self, fields: ObjectFields, node: str, sequence: int, at: float) -> None:
        # The hot path of a rebuild (every object's first event comes through here): the common
        # lookups are inlined, and a new slot takes its first replica without a search.
        root, size, _, volume, owner, name, metadata = fields
        slot, new = self._index.get_or_add(root)
        if new:
            self._new_slot(slot, at)
        self.total_size += size - self._size[slot]
        try:
            self._size[slot] = size
        except OverflowError:
            self._widen("_size")[slot] = size
        owner_id = self._string_id.get(owner)
        self._owner[slot] = self._intern(owner) if owner_id is None else owner_id
        self._set_name(slot, name)
        self._meta[slot] = self._intern_meta(metadata) if metadata else 0
        if sequence:
            self._set_sequence(slot, sequence)
        replica = (node, volume)
        location = self._location_id.get(replica)
        if location is None:
            location = self._location(replica)
        if new:
            self._rep[slot * _WIDTH] = location
            self._rep_at[slot * _WIDTH] = _seconds(at)
        else:
            self._add_replica(slot, location, at)
        if self._damaged:
            self._undamage(root, replica)  # stored again whole: a repair or a new fetch

    def _damage(self, event: ReplicaDamaged, publisher: str) -> set[Cid]:
        if event.node != publisher:
            self.rejected += 1  # a node reports only its own replicas
            return set()
        replica = (publisher, event.volume)
        if replica not in self.replicas(event.root):
            return set()  # not (or no longer) a confirmed replica: nothing to mark
        per_cid = self._damaged.setdefault(event.root, {})
        per_cid[replica] = per_cid.get(replica, frozenset()) | frozenset(event.blocks)
        return {event.root}

    def _undamage(self, cid: Cid, replica: Replica) -> None:
        per_cid = self._damaged.get(cid)
        if per_cid is not None and per_cid.pop(replica, None) is not None and not per_cid:
            del self._damaged[cid]

    def _removed(self, event: ObjectRemoved, node: str, sequence: int) -> bool:
        self._undamage(event.root, (node, event.volume))
        slot = self._index.get(event.root)
        if slot is None:
            return False
        if sequence:
            self._set_sequence(slot, sequence)
        location = self._location_id.get((node, event.volume))
        if location is not None:
            self._drop_replica(slot, location)
        return True

    def _task_ended(
        self, event: TaskCompleted | TaskFailed, envelope: Envelope, sequence: int, at: float
    ) -> set[Cid]:
        task = self._tasks.pop(event.task_id, None)
        if task is None and envelope.causation_id is not None:
            task = self._tasks.pop(envelope.causation_id, None)
        root = event.root if event.root is not None else (task.root if task else None)
        if task is not None:
            self._unindex_task(task)
        if root is None:
            return set()
        if isinstance(event, TaskFailed):
            kind = event.action or (task.kind if task else None)
            if kind is not None:
                volume = event.volume
                if volume is None and task is not None:
                    volume = task.volume
                key: FailureKey = (kind, event.node, volume)
                per_cid = self._failures.setdefault(root, {})
                per_cid[key] = per_cid.get(key, 0) + 1
                self._last_failure.setdefault(root, {})[key] = LastFailure(
                    at, event.permanent, event.reason
                )
        slot = self._index.get(root)
        if slot is not None and sequence:
            self._set_sequence(slot, sequence)
        return {root}

    # -- tasks ------------------------------------------------------------------------------------

    def task_enqueued(self, task: Task, now: float, *, repair_policy: str | None = None) -> None:
        """Record a task the controller just enqueued; a TaskCompleted/TaskFailed ends it.
        ``repair_policy``: the policy whose repair limit the task counts against, if any."""
        self._tasks[task.id] = TaskInFlight(
            task.id, task.kind, task.node, task.root, task.volume, now, repair_policy
        )
        self._tasks_by_cid.setdefault(task.root, set()).add(task.id)
        self.task_changes += 1

    def expire_tasks(self, older_than: float) -> set[Cid]:
        """Forget tasks enqueued before ``older_than`` (their report was lost); their CIDs."""
        stale = [t for t in self._tasks.values() if t.enqueued_at < older_than]
        for task in stale:
            del self._tasks[task.id]
            self._unindex_task(task)
        return {t.root for t in stale}

    def _unindex_task(self, task: TaskInFlight) -> None:
        self.task_changes += 1
        ids = self._tasks_by_cid.get(task.root)
        if ids is not None:
            ids.discard(task.id)
            if not ids:
                del self._tasks_by_cid[task.root]

    # -- nodes and policies -----------------------------------------------------------------------

    def update_node(self, record: NodeRecord) -> set[Cid]:
        """A heartbeat of ``record.node``; marks its CIDs if it (re)appeared or its labels, tags
        or volume names changed (free bytes and beat times change every beat and mark nothing).

        A new node holds no replica, so it marks nothing (rebalancing onto it is a separate
        pass); a node that comes back marks the CIDs it holds, whose repair may now be moot.
        """
        if check_node_record(record) is not None:
            return set()  # not believed (the controller counts it where it reads the bucket)
        return self.cids_on(record.node) if self._note_node(record) else set()

    def _note_node(self, record: NodeRecord) -> bool:
        signature = _node_signature(record)
        previous = self._signatures.get(record.node)
        self.nodes[record.node] = record
        self._signatures[record.node] = signature
        return previous != signature

    def remove_node(self, node: str) -> set[Cid]:
        """``node``'s heartbeat expired (or was deleted): every CID with a replica on it."""
        if self.nodes.pop(node, None) is None:
            return set()
        self._signatures.pop(node, None)
        return self.cids_on(node)

    def sync_nodes(self, records: Iterable[NodeRecord]) -> set[Cid]:
        """Replace the node set with ``records`` (a full ``list_nodes``); the union of changes.

        One scan covers every changed node, so a controller starting with many nodes pays it
        once.
        """
        changed = set()
        seen = set()
        for record in records:
            if check_node_record(record) is not None:
                continue
            seen.add(record.node)
            if self._note_node(record):
                changed.add(record.node)
        for node in [n for n in self.nodes if n not in seen]:
            del self.nodes[node]
            self._signatures.pop(node, None)
            changed.add(node)
        return self.cids_on_nodes(changed)

    def set_draining(self, node: str, draining: bool) -> set[Cid]:
        """Set ``node``'s drain flag; marks its CIDs when the flag changes."""
        if (node in self.draining) == draining:
            return set()
        if draining:
            self.draining.add(node)
        else:
            self.draining.discard(node)
        return self.cids_on(node)

    def set_policies(self, policies: PolicySet) -> set[Cid]:
        """Apply a new policy set; marks every CID unless the set is unchanged.

        The controller works through the result rate-limited.
        """
        if policies == self.policies:
            return set()
        self.policies = policies
        return set(self._index.keys())

    def forget(self, cid: Cid) -> None:
        """Stop tracking ``cid`` (deleted or expired everywhere); its slot is reused."""
        slot = self._index.pop(cid)
        if slot is None:
            return
        self.total_size -= self._size[slot]
        self._size[slot] = 0
        self._name_at[slot] = -1
        base = slot * _WIDTH
        for k in range(_WIDTH):
            self._rep[base + k] = _EMPTY
        self._rep_more.pop(slot, None)
        self._deleted.pop(cid, None)
        self._damaged.pop(cid, None)
        self.clear_failures(cid)

    # -- internals --------------------------------------------------------------------------------

    def _new_slot(self, slot: int, at: float) -> None:
        # The columns of a slot the index just gave out: reset if reused, else appended.
        if slot < len(self._size):  # a freed slot, reused
            self._size[slot] = 0
            self._first_seen[slot] = _seconds(at)
            self._sequence[slot] = 0
            self._owner[slot] = 0
            self._meta[slot] = 0
        else:
            self._name_at.append(-1)
            self._name_len.append(0)
            self._size.append(0)
            self._first_seen.append(_seconds(at))
            self._sequence.append(0)
            self._owner.append(0)
            self._meta.append(0)
            self._rep.extend(_ZEROS)
            self._rep_at.extend(_NO_TIMES)

    def _name(self, slot: int) -> str | None:
        start = self._name_at[slot]
        if start < 0:
            return None
        return self._names[start : start + self._name_len[slot]].decode()

    def _set_name(self, slot: int, name: str | None) -> None:
        if name is None:
            self._name_at[slot] = -1
            return
        data = name.encode()
        start = self._name_at[slot]
        if start >= 0 and self._names[start : start + self._name_len[slot]] == data:
            return
        try:
            self._name_at[slot] = len(self._names)
        except OverflowError:
            self._widen("_name_at")[slot] = len(self._names)
        try:
            self._name_len[slot] = len(data)
        except OverflowError:
            self._widen("_name_len")[slot] = len(data)
        self._names += data

    def _set_sequence(self, slot: int, sequence: int) -> None:
        try:
            self._sequence[slot] = sequence
        except OverflowError:
            self._widen("_sequence")[slot] = sequence

    def _widen(self, column: str) -> array[int]:
        # Once per column at most: an O(objects) copy into 64-bit values.
        wide = array("q", getattr(self, column))
        setattr(self, column, wide)
        return wide

    def _intern(self, text: str) -> int:
        sid = self._string_id.get(text)
        if sid is None:
            sid = self._string_id[text] = len(self._strings)
            self._strings.append(text)
        return sid

    def _intern_meta(self, metadata: Mapping[str, str]) -> int:
        if not metadata:
            return 0
        items = tuple(metadata.items())
        key = items if len(items) == 1 else tuple(sorted(items))
        mid = self._meta_id.get(key)
        if mid is None:
            mid = self._meta_id[key] = len(self._metas)
            self._metas.append(dict(key))
        return mid

    def _location(self, replica: Replica) -> int:
        lid = self._location_id.get(replica)
        if lid is None:
            lid = len(self._locations)
            if lid > _MAX_LOCATIONS:
                raise OverflowError(
                    f"more than {_MAX_LOCATIONS} (node, volume) pairs seen; the projection "
                    "stores location ids in 16 bits: widen the replica column"
                )
            self._location_id[replica] = lid
            self._locations.append(replica)
        return lid

    def _replica_ids(self, slot: int) -> list[int]:
        base = slot * _WIDTH
        ids = [i for i in self._rep[base : base + _WIDTH] if i]
        more = self._rep_more.get(slot)
        if more:
            ids.extend(more)
        return ids

    def _add_replica(self, slot: int, location: int, at: float = 0.0) -> None:
        rep = self._rep
        base = slot * _WIDTH
        free = -1
        for k in range(base, base + _WIDTH):
            value = rep[k]
            if value == location:
                self._rep_at[k] = _seconds(at)
                return
            if value == _EMPTY and free < 0:
                free = k
        more = self._rep_more.get(slot)
        if more is not None and location in more:
            return
        if free >= 0:
            rep[free] = location
            self._rep_at[free] = _seconds(at)
        elif more is None:
            self._rep_more[slot] = [location]
        else:
            more.append(location)

    def _drop_replica(self, slot: int, location: int) -> None:
        rep = self._rep
        base = slot * _WIDTH
        for k in range(base, base + _WIDTH):
            if rep[k] == location:
                rep[k] = _EMPTY
                return
        more = self._rep_more.get(slot)
        if more is not None and location in more:
            more.remove(location)
            if not more:
                del self._rep_more[slot]

    def _slots_with(self, locations: list[int]) -> list[int]:
        # A transient numpy view of the column (the array cannot grow while a view exists).
        # A lookup table over all 2**16 ids is one gather per entry, several times faster than
        # np.isin over the column.
        column = np.frombuffer(self._rep, dtype=np.uint16).reshape(-1, _WIDTH)
        table = np.zeros(_MAX_LOCATIONS + 1, dtype=bool)
        table[locations] = True
        hit = table[column].any(axis=1)
        slots: list[int] = np.flatnonzero(hit).tolist()
        del column, hit
        if self._rep_more:
            wanted = set(locations)
            extra = [s for s, more in self._rep_more.items() if wanted.intersection(more)]
            if extra:
                return sorted(set(slots).union(extra))
        return slots


_ZEROS = array("H", [_EMPTY] * _WIDTH)
_NO_TIMES = array("I", [0] * _WIDTH)
_SECONDS = 2**32


def _seconds(at: float) -> int:
    """``at`` in whole seconds for a 32-bit column (clamped: times before 1970 or after 2106,
    which validation rejects anyway, and NaN, cannot be stored)."""
    return int(at) if 0 <= at < _SECONDS else (_SECONDS - 1 if at > 0 else 0)

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

The objects' columns are :mod:`cim_place.cluster.controller.projection_columns`, tasks in flight
and failures :mod:`cim_place.cluster.controller.projection_tasks`, nodes and drain flags
:mod:`cim_place.cluster.controller.projection_nodes`; this module owns what events do to them.

The node that published an event is passed by the caller (the subject token of
``<prefix>.evt.<node>.<Type>``) or, failing that, taken from the envelope's ``owner``, which the
agent sets to its node id.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping

from cim_place.cluster.controller.projection_columns import _EMPTY, _WIDTH, ObjectView, _seconds
from cim_place.cluster.controller.projection_nodes import NodeBook
from cim_place.cluster.controller.projection_tasks import (
    FailureKey,
    LastFailure,
    TaskBook,
    TaskInFlight,
)
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


class Projection(NodeBook, TaskBook):
    """Objects, replicas, tasks in flight, failures, inventories, nodes and policies.

    Not thread-safe; the controller owns one and mutates it from its event loop. Every mutator
    returns the set of CIDs (binary) whose reconcile is due.
    """

    def __init__(self) -> None:
        super().__init__()
        # Damaged replicas, sparse: cid -> replica -> bad block CIDs.
        self._damaged: dict[bytes, dict[Replica, frozenset[Cid]]] = {}
        # -- sparse state -----------------------------------------------------------------------
        self._inventories: dict[Replica, InventoryDigest] = {}
        self._deleted: dict[bytes, ObjectDeleted] = {}
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

    def damaged(self, cid: Cid) -> Mapping[Replica, frozenset[Cid]]:
        """Confirmed replicas of ``cid`` reported damaged (with their bad blocks)."""
        return dict(self._damaged.get(cid, {}))

    @property
    def damaged_replicas(self) -> int:
        """Damaged replicas across every object (for the summary)."""
        return sum(len(replicas) for replicas in self._damaged.values())

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

    # -- policies and forgetting ------------------------------------------------------------------

    def set_policies(self, policies: PolicySet) -> bool:
        """Apply a new policy set; True unless it is unchanged (then every CID is due: the
        controller marks them all, without listing them)."""
        if policies == self.policies:
            return False
        self.policies = policies
        return True

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

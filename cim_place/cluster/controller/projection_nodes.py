"""Nodes and drain flags in the controller's projection.

This module owns :class:`NodeBook`: the nodes with a live heartbeat (KV ``cim-place-nodes``) and
the nodes being drained, and which CIDs a change of them makes due: a node that disappears,
changes its labels, tags or volume names, comes back, or is (un)drained marks every CID with a
replica on it; a new node marks nothing.
"""

from __future__ import annotations

from collections.abc import Iterable

from cim_place.cluster.controller.projection_columns import ObjectColumns
from cim_place.cluster.state.nodes import NodeRecord, check_node_record
from cim_place.objectstore.cid import Cid

__all__ = ["NodeBook"]


def _node_signature(record: NodeRecord) -> tuple[object, ...]:
    # What makes a node change relevant to placement: not free bytes or the heartbeat time,
    # which change every beat and would otherwise mark every CID of the node every 5 s.
    return (
        tuple(sorted(record.labels.items())),
        tuple(sorted(record.tags)),
        tuple(sorted(v.name for v in record.volumes)),
    )


class NodeBook(ObjectColumns):
    """Nodes and drain flags (see :class:`~cim_place.cluster.controller.projection.Projection`)."""

    def __init__(self) -> None:
        super().__init__()
        self.nodes: dict[str, NodeRecord] = {}
        """Nodes with a live heartbeat, by id."""
        self._signatures: dict[str, tuple[object, ...]] = {}
        self.draining: set[str] = set()
        """Nodes being drained (``cim-place node drain``)."""

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

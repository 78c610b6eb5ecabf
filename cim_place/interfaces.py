"""The components of cim-place and what each promises. Read this file first.

Every component is a Protocol with a one-line promise per method; the implementations live in the
subpackages (named beside each Protocol) and are wired together in one place per process: the
agent in :mod:`cim_place.cluster.agent.service`, the controller in
:mod:`cim_place.cluster.controller.service`, a whole domain in :mod:`cim_place.local.domain`, and
each CLI command in :mod:`cim_place.cli`. Those composition roots hold their parts in fields typed
by these Protocols, so mypy checks that every implementation keeps its promise.

The data path, in one line each:
- content is chunked into blocks (:mod:`cim_place.objectstore.unixfs`) and kept in a
  :class:`BlockStore` per volume; a :class:`PinIndex` records what is complete there;
- an agent announces what it stores on the :class:`EventLog`, serves blocks to peers
  (:mod:`cim_place.cluster.exchange.blocks`), runs :class:`Fetcher` tasks from its
  :class:`TaskSource`, and re-reads its blocks with a :class:`Scrubber`;
- the controller projects the event log, the :class:`NodeRegistry` and the :class:`PolicySource`
  into one view, asks the :class:`Planner` where each object belongs (pure: no I/O), queues the
  difference on the :class:`TaskQueue`, and writes what it found to the :class:`LocationView`.

Where a thing happens: placement is decided in :func:`cim_place.placement.planner.plan` and
turned into tasks by :func:`cim_place.placement.reconciler.reconcile`; a block is verified in
:meth:`BlockSource.get` (on disk) and in :mod:`cim_place.cluster.exchange.fetch` (on arrival); a
task is executed in ``Agent.run_task`` (:mod:`cim_place.cluster.agent.task_runner`).

Pure-logic tests may use in-memory implementations of these Protocols; anything that talks to
NATS is tested against real nats-server processes (see :mod:`cim_place.testing`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from cim_place.objectstore.cid import Cid

if TYPE_CHECKING:  # types only: this module is imported by the lowest layers
    from cim_place.cluster.events.types import AnyEvent
    from cim_place.cluster.exchange.fetch_model import FetchResult, Holder
    from cim_place.cluster.nats.envelope import Envelope
    from cim_place.cluster.state.nodes import NodeRecord
    from cim_place.cluster.state.policies import StoredSet
    from cim_place.cluster.tasks.model import Task
    from cim_place.cluster.tasks.queue import Enqueued
    from cim_place.placement.model import NodeMap, PlacedObject, Placement, PlacementRule, VolumeId
    from cim_place.placement.reconcile_model import ReconcileInput, ReconcileResult
    from cim_place.placement.status import ObjectStatus, Summary


class BlockSource(Protocol):
    """Where blocks are read from."""

    def has(self, cid: Cid) -> bool:
        """True when the block is present. Cheap: never reads the block's bytes."""
        ...

    def get(self, cid: Cid) -> bytes:
        """The block's bytes, verified against ``cid``.

        Raises BlockNotFoundError when absent and CorruptBlockError when the stored bytes do not
        hash to ``cid``; a corrupt block is never returned.
        """
        ...


class BlockSink(Protocol):
    """Where blocks are written to."""

    def put(self, cid: Cid, data: bytes) -> bool:
        """Store a block. Idempotent: returns False when it was already present.

        The caller vouches that ``data`` hashes to ``cid`` (the importer computed it); blocks
        from outside are verified before they get here. Safe under concurrent writers of the same
        block. Raises StoreFullError when there is no room, leaving nothing addressable.
        """
        ...


class BlockStore(BlockSource, BlockSink, Protocol):
    """One volume's blocks: a directory on one disk."""

    def delete(self, cid: Cid) -> bool:
        """Remove a block; returns False when it was absent. Idempotent."""
        ...

    def cids(self) -> Iterator[Cid]:
        """Every block present, in no particular order."""
        ...

    def used_bytes(self) -> int:
        """Bytes of block data held (the sum of block sizes)."""
        ...


@dataclass(frozen=True, slots=True)
class Pin:
    """A pinned root: the DAG below it is kept until unpinned."""

    root: Cid
    size: int
    """File bytes of the content (for UnixFS files, the file size)."""
    blocks: int
    """Number of distinct blocks in the DAG."""
    name: str | None = None
    owner: str = ""
    metadata: Mapping[str, str] = field(default_factory=dict)
    pinned_at: float = 0.0
    """Unix time of the pin."""


class PinIndex(Protocol):
    """The local index of pinned roots of one store."""

    def add(self, pin: Pin) -> None:
        """Record a pin; pinning the same root again replaces its record. Call only once the
        whole DAG is present, so that a pin always means "complete here"."""
        ...

    def remove(self, root: Cid) -> bool:
        """Forget a pin; returns False when it was absent. Blocks stay until garbage collection."""
        ...

    def get(self, root: Cid) -> Pin | None: ...

    def by_name(self, name: str) -> Pin | None: ...

    def list(self) -> list[Pin]: ...


# -- the long-running parts of a process ------------------------------------------------------


class Service(Protocol):
    """A part of an agent or controller that runs in the background between start and stop.

    Implementations: the block server, the block stream, the who-has responder, the upload
    service, the heartbeat, the task worker, the scrub and inventory services of the agent
    (:mod:`cim_place.cluster`)."""

    async def start(self) -> None:
        """Begin serving; returns once ready. Called once."""
        ...

    async def stop(self) -> None:
        """Stop serving and release what ``start`` took; safe to call when never started."""
        ...


# -- the event log ----------------------------------------------------------------------------


class EventLog(Protocol):
    """Where a node records what happened
    (:class:`cim_place.cluster.events.publisher.EventPublisher`): every event persisted, in order
    per node, delivered to the hub even across link cuts."""

    async def publish_event(
        self, event: AnyEvent, *, owner: str | None = None, cause: Envelope | None = None
    ) -> Envelope:
        """Persist ``event`` (in the node's outbox); returns its envelope once stored.
        Idempotent by envelope id: a retried publish is stored once."""
        ...


# -- domain state -----------------------------------------------------------------------------


class NodeRegistry(Protocol):
    """The nodes that are up (:func:`cim_place.cluster.state.nodes.list_nodes`, read from the
    heartbeats in KV ``cim-place-nodes``)."""

    async def __call__(self, js_hub: Any, /) -> list[NodeRecord]:
        """Every node whose heartbeat has not expired, by node id; malformed records skipped."""
        ...


class PolicySource(Protocol):
    """The applied policy set (:class:`cim_place.cluster.state.policies.PolicyStore`)."""

    async def load(self, revision: int | None = None) -> StoredSet:
        """The applied set (or the one of ``revision``); empty, revision 0, before any apply."""
        ...

    def watch(self) -> AsyncIterator[StoredSet]:
        """The applied set now and after every apply, for as long as the caller iterates."""
        ...


class LocationView(Protocol):
    """Where every object is and whether it is healthy, materialised by the controller so a
    status read is one lookup (:class:`cim_place.cluster.state.locations.LocationStore`)."""

    async def get(self, cid: Cid | str) -> ObjectStatus | None:
        """The status of one object, None when the domain does not track it."""
        ...

    async def put(self, status: ObjectStatus) -> None:
        """Record an object's status."""
        ...

    async def summary(self) -> Summary | None:
        """The domain-wide counts, None before a controller wrote them."""
        ...

    def list(self, state: str | None = None) -> AsyncIterator[ObjectStatus]:
        """Every tracked object (or those in ``state``), in no particular order."""
        ...


# -- work -------------------------------------------------------------------------------------


class TaskQueue(Protocol):
    """The controller's side of the task queue (:class:`cim_place.cluster.tasks.queue.TaskQueue`):
    one work-queue subject per node, durable until the node's agent acknowledges."""

    async def enqueue(self, task: Task, *, cause: Envelope | None = None) -> Enqueued:
        """Queue ``task``; a task with the same id within the duplicate window is a no-op."""
        ...


class TaskSource(Protocol):
    """The agent's side (:class:`cim_place.cluster.tasks.worker.TaskWorker`): pulls its node's
    tasks, runs each with bounded concurrency, reports the outcome, acks after reporting."""

    async def start(self) -> None:
        """Begin pulling and running tasks."""
        ...

    async def stop(self) -> None:
        """Stop pulling; tasks in progress finish or are left unacked for redelivery."""
        ...


class Planner(Protocol):
    """Where one object belongs (:func:`cim_place.placement.planner.plan`): a pure function of
    the object, its rule, the node map and its current copies; deterministic."""

    def __call__(
        self,
        obj: PlacedObject,
        rule: PlacementRule,
        node_map: NodeMap,
        current: frozenset[VolumeId] = ...,
        /,
    ) -> Placement:
        """The desired volumes, each with a reason; existing valid copies kept where allowed."""
        ...


class Reconciler(Protocol):
    """What to do about one object (:func:`cim_place.placement.reconciler.reconcile`): desired
    against actual, copy before drop, never below the policy's minimum; pure."""

    def __call__(self, inp: ReconcileInput, /) -> ReconcileResult:
        """The tasks to queue and the object's status; running it twice changes nothing."""
        ...


class Fetcher(Protocol):
    """Getting a DAG from the nodes that hold it
    (:func:`cim_place.cluster.exchange.fetch.fetch_dag`)."""

    async def __call__(
        self, nc: Any, root: Cid, holders: Sequence[Holder], store: BlockStore, /
    ) -> FetchResult:
        """Make every block under ``root`` present in ``store``, each verified on arrival;
        resumes (blocks already present are not fetched again); does not pin."""
        ...


class Scrubber(Protocol):
    """Re-reading a volume's pinned content to find damage before a reader does."""

    def scrub(self, roots: Sequence[Cid]) -> Iterator[tuple[Cid, Cid, str]]:
        """Verify every block of every root; yields (root, block, "corrupt"|"missing") for each
        damaged block. Never changes the store."""
        ...

"""Static proof that every implementation keeps the promise of its Protocol in interfaces.py.

Each function below hands a concrete part to a caller that expects the Protocol; ``mypy --strict``
(``make check``) type-checks them, so a signature that drifts from its contract fails the build.
Nothing calls these functions at run time.
"""

from __future__ import annotations

from cim_place import interfaces
from cim_place.cluster.agent.inventory import InventoryService
from cim_place.cluster.agent.scrubbing import ScrubService
from cim_place.cluster.events.publisher import EventPublisher
from cim_place.cluster.exchange.blocks import BlockServer
from cim_place.cluster.exchange.fetch import fetch_dag
from cim_place.cluster.exchange.holders import HolderResponder
from cim_place.cluster.exchange.stream import BlockStreamServer
from cim_place.cluster.exchange.upload_server import UploadService
from cim_place.cluster.state.locations import LocationStore
from cim_place.cluster.state.nodes import Heartbeat, list_nodes
from cim_place.cluster.state.policies import PolicyStore
from cim_place.cluster.tasks.queue import TaskQueue
from cim_place.cluster.tasks.worker import TaskWorker
from cim_place.objectstore.blockstore import FsBlockStore
from cim_place.objectstore.pins import SqlitePinIndex
from cim_place.objectstore.scrub import VolumeScrubber
from cim_place.placement.planner import plan
from cim_place.placement.reconciler import reconcile


def block_store(store: FsBlockStore) -> interfaces.BlockStore:
    return store


def pin_index(pins: SqlitePinIndex) -> interfaces.PinIndex:
    return pins


def services(
    blocks: BlockServer,
    stream: BlockStreamServer,
    holders: HolderResponder,
    uploads: UploadService,
    heartbeat: Heartbeat,
    scrub: ScrubService,
    inventory: InventoryService,
) -> list[interfaces.Service]:
    return [blocks, stream, holders, uploads, heartbeat, scrub, inventory]


def event_log(publisher: EventPublisher) -> interfaces.EventLog:
    return publisher


def node_registry() -> interfaces.NodeRegistry:
    return list_nodes


def policy_source(store: PolicyStore) -> interfaces.PolicySource:
    return store


def location_view(store: LocationStore) -> interfaces.LocationView:
    return store


def task_queue(queue: TaskQueue) -> interfaces.TaskQueue:
    return queue


def task_source(worker: TaskWorker) -> interfaces.TaskSource:
    return worker


def planner() -> interfaces.Planner:
    return plan


def reconciler() -> interfaces.Reconciler:
    return reconcile


def fetcher() -> interfaces.Fetcher:
    return fetch_dag


def scrubber(volume: VolumeScrubber) -> interfaces.Scrubber:
    return volume

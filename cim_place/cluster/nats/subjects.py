"""Every NATS subject and stream name cim-place uses, built in one place.

The prefix is configurable (default ``cim.place``) so that several deployments can share a NATS
system. Node ids become subject tokens and stream-name parts, so they are restricted to
``[A-Za-z0-9_-]``; :func:`check_node_id` says so with the offending id.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from cim_place.errors import CimPlaceError

DEFAULT_PREFIX = "cim.place"
EVENTS_STREAM = "CIM_PLACE_EVENTS"
TASKS_STREAM = "CIM_PLACE_TASKS"

_NODE_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
HUB_DOMAIN = "hub"
"""The hub's JetStream domain: where the event store, the task queue and every KV bucket live."""

_PREFIX = re.compile(r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$")


class InvalidSubjectError(CimPlaceError):
    """A node id or subject prefix that cannot be used in NATS subjects or stream names."""


def check_node_id(node: str) -> str:
    if not _NODE_ID.match(node):
        raise InvalidSubjectError(
            f"node id {node!r} is not usable: use 1-64 letters, digits, '-' or '_' "
            "(it becomes part of NATS subjects and of the node's JetStream domain)"
        )
    return node


def outbox_stream(node: str) -> str:
    """The stream in a leaf's own JetStream domain that buffers its events for the hub."""
    return f"OUTBOX_{check_node_id(node)}"


@dataclass(frozen=True, slots=True)
class Subjects:
    prefix: str = DEFAULT_PREFIX

    def __post_init__(self) -> None:
        if not _PREFIX.match(self.prefix):
            raise InvalidSubjectError(
                f"subject prefix {self.prefix!r} is not usable: use dot-separated tokens of "
                "letters, digits, '-' or '_' (for example cim.place)"
            )

    def event(self, node: str, event_type: str) -> str:
        return f"{self.prefix}.evt.{check_node_id(node)}.{event_type}"

    def events_of(self, node: str) -> str:
        return f"{self.prefix}.evt.{check_node_id(node)}.>"

    @property
    def all_events(self) -> str:
        return f"{self.prefix}.evt.>"

    def events_of_type(self, event_type: str) -> str:
        """Every node's events of one type (``<prefix>.evt.*.<type>``); application events
        (``<prefix>.evt.<node>.app.<type>``) never match."""
        return f"{self.prefix}.evt.*.{event_type}"

    def task(self, node: str) -> str:
        return f"{self.prefix}.task.{check_node_id(node)}"

    @property
    def all_tasks(self) -> str:
        return f"{self.prefix}.task.*"

    def block_get(self, node: str) -> str:
        return f"{self.prefix}.blk.{check_node_id(node)}.get"

    def demand(self, node: str) -> str:
        """Where ``node``'s agent publishes its read counts (cim_place.cluster.agent.demand)."""
        return f"{self.prefix}.demand.{check_node_id(node)}"

    @property
    def all_demand(self) -> str:
        """Every node's read counts, for the controller."""
        return f"{self.prefix}.demand.*"

    def api(self, name: str) -> str:
        return f"{self.prefix}.api.{name}"

    def agent_add(self, node: str) -> str:
        """Where ``node``'s agent takes uploads of new content
        (cim_place.cluster.exchange.upload_server)."""
        return f"{self.prefix}.agent.{check_node_id(node)}.add"

    def agent_scrub(self, node: str) -> str:
        """Where ``node``'s agent takes a request to scrub its volumes now
        (cim_place.cluster.agent.scrubbing)."""
        return f"{self.prefix}.agent.{check_node_id(node)}.scrub"

    def agent_inventory(self, node: str) -> str:
        """Where ``node``'s agent lists its pins and re-announces roots on a drift
        (cim_place.cluster.agent.inventory)."""
        return f"{self.prefix}.agent.{check_node_id(node)}.inventory"

    @property
    def all_agent_inventories(self) -> str:
        return f"{self.prefix}.agent.*.inventory"

    @property
    def all_agent_scrubs(self) -> str:
        return f"{self.prefix}.agent.*.scrub"

    @property
    def has(self) -> str:
        """Who-has queries, answered by every agent holding a root
        (cim_place.cluster.exchange.holders)."""
        return f"{self.prefix}.has"

"""The least-privilege permissions of each role: what its NATS user may publish and subscribe to.

This module owns the allow lists of a domain's users (``docs/SECURITY.md``): an agent
(``agent-<node>``) publishes only its own event subjects, pulls only its own task consumer and
serves only its own block subject; a leaf link (``leaf-<node>``, the credentials a leaf server
uses to reach the hub) carries only what that leaf's agent and users need; the controller
writes tasks and locations; a read-only operator queries status; a reader (a person or an
application) fetches content and uploads. :mod:`cim_place.cluster.nats.users` gives them to
users.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from cim_place.cluster.nats import kv
from cim_place.cluster.nats.security import (
    CONTROLLER,
    INBOX_ROOT,
    OPERATOR,
    agent_user,
    inbox_prefix,
)
from cim_place.cluster.nats.subjects import (
    EVENTS_STREAM,
    TASKS_STREAM,
    Subjects,
    check_node_id,
    outbox_stream,
)

__all__ = [
    "S3_AGENT_KV",
    "Permissions",
    "agent_permissions",
    "controller_permissions",
    "leaf_link_permissions",
    "operator_permissions",
    "reader_permissions",
]

# The account-info request ($JS.API.INFO) that JetStream tools send before anything else.
_JS_INFO = "INFO"


@dataclass(frozen=True, slots=True)
class Permissions:
    """Subjects a user may publish to and subscribe to (allow lists; everything else is denied)."""

    publish: tuple[str, ...]
    subscribe: tuple[str, ...]


def _js(domain: str | None, rest: str) -> str:
    return f"$JS.{domain}.API.{rest}" if domain else f"$JS.API.{rest}"


def _both(domain: str, rest: str) -> list[str]:
    """A JetStream API subject reached locally (on a hub server) and through a leaf (prefixed)."""
    return [_js(None, rest), _js(domain, rest)]


def _kv_read(domain: str, bucket: str) -> list[str]:
    stream = f"KV_{bucket}"
    subjects = []
    for rest in (
        f"STREAM.INFO.{stream}",
        f"STREAM.MSG.GET.{stream}",
        f"DIRECT.GET.{stream}",
        f"DIRECT.GET.{stream}.>",
        f"CONSUMER.CREATE.{stream}",
        f"CONSUMER.CREATE.{stream}.>",
        f"CONSUMER.DELETE.{stream}.>",
        f"CONSUMER.INFO.{stream}.>",
    ):
        subjects += _both(domain, rest)
    return [*subjects, f"$JS.FC.{stream}.>"]


def _kv_write(domain: str, bucket: str, key: str = ">") -> list[str]:
    stream = f"KV_{bucket}"
    return [
        *_kv_read(domain, bucket),
        *_both(domain, f"STREAM.CREATE.{stream}"),
        f"$KV.{bucket}.{key}",
        _js(domain, f"$KV.{bucket}.{key}"),
    ]


S3_AGENT_KV: tuple[tuple[str, bool], ...] = (
    # (bucket, written) for the S3 API and gateway of every agent (cim_place/http): the access
    # keys it verifies signatures with (read only; `cim-place s3 key` writes them as admin),
    # buckets, the object index and multipart uploads. Not the names: where agents have users,
    # S3 objects get no domain name (cim_place/http/s3/app.py S3Node.names_writable).
    ("cim-place-s3-keys", False),
    ("cim-place-s3-buckets", True),
    ("cim-place-s3-objects", True),
    ("cim-place-s3-uploads", True),
)


def _kv(domain: str, bucket: str, write: bool) -> list[str]:
    # Listings read these buckets with pull consumers (cim_place/http/s3/index.kv_entries).
    pull = _both(domain, f"CONSUMER.MSG.NEXT.KV_{bucket}.>")
    return [*(_kv_write(domain, bucket) if write else _kv_read(domain, bucket)), *pull]


def agent_permissions(node: str, subjects: Subjects, hub_domain: str) -> Permissions:
    """An agent: its own events, outbox, task consumer, block and upload subjects, heartbeat."""
    check_node_id(node)
    user = agent_user(node)
    consumer = f"tasks-{node}"
    outbox = outbox_stream(node)
    publish = [
        subjects.events_of(node),
        # The outbox, in the leaf's own domain (the agent's local JetStream).
        *(
            _js(None, f"STREAM.{op}.{outbox}")
            for op in ("INFO", "CREATE", "UPDATE")  # ensure_outbox
        ),
        # Its task consumer in the hub domain, and nothing else of the task stream.
        *_both(hub_domain, f"CONSUMER.CREATE.{TASKS_STREAM}.{consumer}"),
        *_both(hub_domain, f"CONSUMER.CREATE.{TASKS_STREAM}.{consumer}.>"),
        *_both(hub_domain, f"CONSUMER.DURABLE.CREATE.{TASKS_STREAM}.{consumer}"),
        *_both(hub_domain, f"CONSUMER.INFO.{TASKS_STREAM}.{consumer}"),
        *_both(hub_domain, f"CONSUMER.MSG.NEXT.{TASKS_STREAM}.{consumer}"),
        f"$JS.ACK.{TASKS_STREAM}.{consumer}.>",
        f"$JS.ACK.*.*.{TASKS_STREAM}.{consumer}.>",
        # Attaching its outbox to the hub's event store (events.sources.attach_leaf).
        *_both(hub_domain, f"STREAM.INFO.{EVENTS_STREAM}"),
        *_both(hub_domain, f"STREAM.UPDATE.{EVENTS_STREAM}"),
        *_kv_write(hub_domain, "cim-place-event-sources"),
        # Heartbeat: its own key of the nodes bucket; the other nodes' records are read.
        *_kv_write(hub_domain, kv.NODES, node),
        # Its gateway's /name/{name} resolves domain names (cim_place/http/node.py).
        *_kv_read(hub_domain, kv.NAMES),
        # Its read counts (demand-driven copies, docs/DEMAND.md).
        subjects.demand(node),
        # The gateway and S3 of a node that holds no copy read an object's owner and readers
        # from its status (http/node.py DomainAccess); agents may read every block anyway.
        *(r for b in (kv.LOCATIONS, *kv.LOCATION_SHARD_BUCKETS) for r in _kv_read(hub_domain, b)),
        # The HTTP APIs every agent serves (cim_place/http): see S3_AGENT_KV.
        *(subject for bucket, write in S3_AGENT_KV for subject in _kv(hub_domain, bucket, write)),
        # Fetching from peers and finding holders.
        f"{subjects.prefix}.blk.*.get",
        subjects.has,
        # Answers: block streams, who-has answers, upload progress go to requesters' inboxes.
        f"{INBOX_ROOT}.>",
    ]
    subscribe = [
        f"{inbox_prefix(user)}.>",
        subjects.block_get(node),
        subjects.has,
        subjects.agent_add(node),
        subjects.agent_scrub(node),
        subjects.agent_inventory(node),
    ]
    return Permissions(tuple(_unique(publish)), tuple(_unique(subscribe)))


def controller_permissions(subjects: Subjects, hub_domain: str) -> Permissions:
    """The controller: tasks, locations, the event store, policies, leadership, queries."""
    publish = [
        subjects.all_tasks,
        # The controller owns the hub's streams and buckets (it creates and updates them).
        "$JS.API.>",
        _js(hub_domain, ">"),
        "$KV.>",
        "$JS.ACK.>",
        "$JS.FC.>",
        f"{INBOX_ROOT}.>",  # answers to status queries
        subjects.has,
        # Tombstones of `cim-place rm` (cluster/controller/removal.py): the hub domain's
        # events, a token no leaf can have.
        subjects.events_of(hub_domain),
        subjects.all_agent_inventories,  # reconciling inventory drift
    ]
    subscribe = [f"{inbox_prefix(CONTROLLER)}.>", subjects.api(">"), subjects.all_demand]
    return Permissions(tuple(publish), tuple(subscribe))


def operator_permissions(subjects: Subjects, hub_domain: str) -> Permissions:
    """A read-only operator: status queries, stream/consumer info, reading every bucket, and
    asking agents to scrub their volumes now (which reads, never changes, content)."""
    publish = [subjects.api(">"), subjects.has, subjects.all_agent_scrubs]
    for rest in (
        _JS_INFO,
        "STREAM.NAMES",
        "STREAM.LIST",
        "STREAM.INFO.*",
        "CONSUMER.NAMES.*",
        "CONSUMER.LIST.*",
        "CONSUMER.INFO.*.*",
    ):
        publish += _both(hub_domain, rest)
    for bucket in (*kv.ALL_BUCKETS, kv.SETTINGS):
        publish += _kv_read(hub_domain, bucket)
    subscribe = [f"{inbox_prefix(OPERATOR)}.>"]
    return Permissions(tuple(_unique(publish)), tuple(subscribe))


def reader_permissions(
    user: str, subjects: Subjects, hub_domain: str, home: str | None = None
) -> Permissions:
    """A person or application: fetch content, find holders, upload, resolve names, and exchange
    application commands and queries (``<prefix>.app.>``, cim_place.comms).

    A reader homed on a leaf uploads through that leaf's agent only, so the leaf's link never
    carries uploads meant for other nodes. Application events (stored in a node's outbox) and
    their consumers are not granted here: they belong to a node's identity.
    """
    uploads = subjects.agent_add(home) if home else f"{subjects.prefix}.agent.*.add"
    app = f"{subjects.prefix}.app.>"
    publish = [
        f"{subjects.prefix}.blk.*.get",
        subjects.has,
        uploads,
        app,
        *_kv_read(hub_domain, kv.NAMES),
        *_kv_read(hub_domain, kv.NODES),
        # The offload threshold of application messages (cim_place.comms).
        *_kv_read(hub_domain, kv.SETTINGS),
        *_both(hub_domain, _JS_INFO),
    ]
    subscribe = [f"{inbox_prefix(user)}.>", app]
    return Permissions(tuple(_unique(publish)), tuple(subscribe))


def leaf_link_permissions(
    node: str, homed: Iterable[str], subjects: Subjects, hub_domain: str
) -> Permissions:
    """What the hub lets leaf ``node``'s server carry: its agent's and homed readers' traffic.

    A leaf server that an attacker controls can act as any user defined on it, but no more:
    the hub refuses it another node's events, tasks, block subject or inbox.

    The list is the same for both directions: over a leaf link, nats-server propagates the hub's
    interest in a subject only if the link may subscribe to it, so publishing a request to a hub
    subscriber needs both (measured with nats-server 2.15.1; nats-io/nats-server#2469).
    """
    users = [agent_user(node), *homed]
    agent = agent_permissions(node, subjects, hub_domain)
    # The leaf's own JetStream API ($JS.API / OUTBOX_) never crosses the link.
    carried = [s for s in agent.publish if not s.startswith("$JS.API.") and "OUTBOX_" not in s]
    for user in homed:
        carried += reader_permissions(user, subjects, hub_domain, node).publish
    carried += [
        *(f"{inbox_prefix(user)}.>" for user in users),
        subjects.block_get(node),
        subjects.agent_add(node),
        subjects.agent_scrub(node),
        subjects.agent_inventory(node),
        # The hub's event store sources the outbox: it calls the leaf domain's API, the leaf
        # answers on the hub's internal reply subjects and delivers events and flow control.
        _js(node, ">"),
        "$JSC.R.>",
        "$JS.S.>",
        "$JS.FC.>",
    ]
    # Every inbox: this leaf's agent answers requests from users anywhere, and the hub forwards
    # those answers only if the link may subscribe to them (measured: publish alone, or
    # allow_responses, is not enough). SECURITY.md says what this lets a seized leaf see.
    allowed = tuple(_unique(s for s in carried if not s.startswith("$JS.API.")))
    return Permissions(allowed, allowed)


def _unique(items: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(items))

"""Who may do what in a cim-place domain: NATS users, their permissions, and requester identity.

This module owns the security model of a domain (``docs/SECURITY.md`` explains it):

1. **Users and least privilege.** :func:`plan_domain` builds every NATS user of a domain, each
   with the narrowest permissions its role needs: an agent (``agent-<node>``) publishes only its
   own event subjects, pulls only its own task consumer and serves only its own block subject; a
   leaf link (``leaf-<node>``, the credentials a leaf server uses to reach the hub) carries only
   what that leaf's agent and users need; the controller writes tasks and locations; a read-only
   operator queries status; a reader (a person or an application) fetches content and uploads.
   :func:`render_accounts` writes them as a nats-server ``accounts`` block (users with passwords,
   included by the configs in ``deploy/nats``); ``cim-place security gen`` writes the files.
2. **Requester identity.** Every user may subscribe only under its own inbox prefix
   ``_CIM_INBOX.<user>``. A request's reply subject therefore names a user that NATS has
   authenticated: a client claiming another user's prefix may publish the request, but the
   answer goes to an inbox it cannot subscribe to. :func:`requester_of` reads that identity; the
   block exchange (``cim_place.cluster.exchange.blocks``) uses it to refuse readers an object does
   not list.
3. **Object access.** :class:`ReadAccess` decides whether a requester may read a root from its
   pin: the owner, the users in the pin's ``readers`` metadata (comma separated, ``*`` for every
   authenticated user) and every agent (they replicate) may; an object without an owner is public.

Clients take their identity from the user name in their server URL (``nats://alice:...@host``):
see :func:`identity_of` and :func:`client_options`.
"""

from __future__ import annotations

import json
import secrets
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit

from cim_place.cluster.nats import kv
from cim_place.cluster.nats.subjects import (
    EVENTS_STREAM,
    HUB_DOMAIN,
    TASKS_STREAM,
    Subjects,
    check_node_id,
    outbox_stream,
)
from cim_place.errors import CimPlaceError
from cim_place.interfaces import BlockSource, Pin
from cim_place.objectstore import dag
from cim_place.objectstore.cid import Cid, to_str

__all__ = [
    "ACCOUNT",
    "AGENT_PREFIX",
    "CONTROLLER",
    "INBOX_ROOT",
    "LEAF_PREFIX",
    "OPERATOR",
    "READERS_KEY",
    "AccessDeniedError",
    "DomainPlan",
    "Permissions",
    "ReadAccess",
    "SecurityConfigError",
    "User",
    "agent_user",
    "client_options",
    "identity_of",
    "inbox_prefix",
    "leaf_user",
    "may_read",
    "plan_domain",
    "render_accounts",
    "render_files",
    "render_hub_link",
    "requester_of",
]

ACCOUNT = "CIM"
"""The NATS account every cim-place user belongs to (one account: JetStream domains span it)."""
INBOX_ROOT = "_CIM_INBOX"
"""Inboxes live under ``_CIM_INBOX.<user>``; each user may subscribe under its own only."""
AGENT_PREFIX = "agent-"
LEAF_PREFIX = "leaf-"
CONTROLLER = "controller"
OPERATOR = "operator"
READERS_KEY = "readers"
"""Pin metadata key listing who may read an object besides its owner (comma separated)."""
_SERVICE_NAMES = (AGENT_PREFIX, LEAF_PREFIX)
_RESERVED = (CONTROLLER, OPERATOR)
# The account-info request ($JS.API.INFO) that JetStream tools send before anything else.
_JS_INFO = "INFO"


class AccessDeniedError(CimPlaceError):
    """A requester asked for an object it may not read."""


class SecurityConfigError(CimPlaceError):
    """A user list that cannot be turned into a safe configuration."""


# -- identity ------------------------------------------------------------------------------------


def inbox_prefix(user: str) -> str:
    """The inbox prefix of ``user``: the only place it may subscribe for replies."""
    return f"{INBOX_ROOT}.{_check_user(user)}"


def requester_of(reply: str | None) -> str | None:
    """The authenticated user a reply subject belongs to, or None (anonymous, no prefix).

    Sound only when every user's subscriptions are restricted to its own inbox prefix, as
    :func:`plan_domain` generates: otherwise anyone could claim any prefix.
    """
    if not reply or not reply.startswith(INBOX_ROOT + "."):
        return None
    user = reply[len(INBOX_ROOT) + 1 :].split(".", 1)[0]
    return user or None


def identity_of(servers: str | Sequence[str] | None) -> str | None:
    """The user name in the first server URL that carries one (``nats://user:pw@host``)."""
    if servers is None:
        return None
    urls = servers.split(",") if isinstance(servers, str) else list(servers)
    for url in urls:
        url = url.strip()
        if "://" not in url:
            url = "nats://" + url
        user = urlsplit(url).username
        if user:
            return unquote(user)
    return None


def client_options(servers: str | Sequence[str] | None) -> dict[str, object]:
    """Extra nats-py connect options for a client of a secured domain: its inbox prefix.

    Empty for an open (development) domain, where the URL names no user.
    """
    user = identity_of(servers)
    return {"inbox_prefix": inbox_prefix(user)} if user else {}


def agent_user(node: str) -> str:
    return AGENT_PREFIX + check_node_id(node)


def leaf_user(node: str) -> str:
    return LEAF_PREFIX + check_node_id(node)


def _check_user(user: str) -> str:
    # A user name becomes a subject token (its inbox), so it is held to node-id rules.
    try:
        return check_node_id(user)
    except CimPlaceError:
        raise SecurityConfigError(
            f"user name {user!r} is not usable: use 1-64 letters, digits, '-' or '_' "
            "(it becomes a subject token of the user's inbox)"
        ) from None


# -- object access -------------------------------------------------------------------------------


def readers_of(pin: Pin) -> frozenset[str]:
    """Who besides the owner may read ``pin``: its ``readers`` metadata, comma separated."""
    text = pin.metadata.get(READERS_KEY, "")
    return frozenset(part.strip() for part in text.split(",") if part.strip())


def may_read(requester: str | None, pin: Pin) -> bool:
    """The read rule: public objects to anyone; else owner, listed readers and agents."""
    if not pin.owner:
        return True
    if requester is None:
        return False
    if requester.startswith(AGENT_PREFIX) or requester == pin.owner:
        return True
    readers = readers_of(pin)
    return "*" in readers or requester in readers


class ReadAccess:
    """The enforcement point of a block server: may ``requester`` read these blocks of ``root``?

    ``pin_of(root)`` returns the local pin (None when the root is not pinned here); ``blocks``
    reads the local DAG to check that every requested CID lies under the named root, so naming
    a readable root does not open the blocks of another. DAG membership comes from
    :class:`RootMembers` (cached per root once the local DAG is whole); the pin, whose readers
    may change, is read on every request.
    """

    def __init__(
        self,
        pin_of: Callable[[Cid], Pin | None],
        blocks: BlockSource,
        *,
        cache_roots: int = 64,
    ) -> None:
        self.pin_of = pin_of
        self.blocks = blocks
        self._members = RootMembers(blocks, cache_roots)

    def check(self, requester: str | None, root: Cid | None, cids: Sequence[Cid]) -> str | None:
        """None when allowed, else the reason for refusing (said to the requester)."""
        who = requester or "an anonymous requester"
        if requester is not None and requester.startswith(AGENT_PREFIX):
            return None  # agents replicate whatever the controller assigns them
        if root is None:
            return (
                f"{who} did not name the root it fetches for; this node serves owned objects "
                "only to requests that name their root (update the client)"
            )
        pin = self.pin_of(root)
        if pin is None:
            return f"{to_str(root)} is not pinned on this node, so its readers are unknown here"
        if not may_read(requester, pin):
            return (
                f"not allowed: {who} may not read {to_str(root)}; ask its owner "
                f"{pin.owner!r} to add you to its readers"
            )
        if not cids:
            return None
        members = self._members_of(root)
        outside = [cid for cid in cids if cid not in members]
        if outside:
            return f"not allowed: block {to_str(outside[0])} is not part of {to_str(root)}"
        return None

    def _members_of(self, root: Cid) -> frozenset[Cid]:
        return self._members(root)


class RootMembers:
    """The CIDs under each root in a local store, for the checks of block servers: a walk is
    cached (the ``capacity`` most recently used roots) once it found the whole DAG, which
    content addressing makes immutable; a DAG held only in part is walked again next time."""

    def __init__(self, blocks: BlockSource, capacity: int = 64) -> None:
        self.blocks = blocks
        self.capacity = capacity
        self._cache: OrderedDict[Cid, frozenset[Cid]] = OrderedDict()

    def cached(self, root: Cid) -> frozenset[Cid] | None:
        found = self._cache.get(root)
        if found is not None:
            self._cache.move_to_end(root)
        return found

    def walk(self, root: Cid) -> tuple[frozenset[Cid], bool]:
        """Read the local DAG (no cache; safe to run in a thread)."""
        return dag.members(self.blocks, root)

    def remember(self, root: Cid, found: frozenset[Cid], complete: bool) -> frozenset[Cid]:
        if complete:
            self._cache[root] = found
            if len(self._cache) > self.capacity:
                self._cache.popitem(last=False)
        return found

    def __call__(self, root: Cid) -> frozenset[Cid]:
        cached = self.cached(root)
        return cached if cached is not None else self.remember(root, *self.walk(root))


# -- permissions ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Permissions:
    """Subjects a user may publish to and subscribe to (allow lists; everything else is denied)."""

    publish: tuple[str, ...]
    subscribe: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class User:
    name: str
    password: str
    permissions: Permissions
    role: str


@dataclass(frozen=True, slots=True)
class DomainPlan:
    """Every user of a domain: the hub's accounts, and each leaf's (its agent and readers)."""

    hub: tuple[User, ...]
    leaves: Mapping[str, tuple[User, ...]]
    """Per node: users defined on that leaf's server (its agent and the readers homed there)."""
    leaf_links: Mapping[str, User]
    """Per node: the user its leaf server authenticates with at the hub."""
    subjects: Subjects = field(default_factory=Subjects)
    hub_domain: str = HUB_DOMAIN

    def all_users(self) -> list[User]:
        users = list(self.hub)
        for members in self.leaves.values():
            users.extend(members)
        return users


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
        # Attaching its outbox to the hub's event store (eventstore.attach_leaf).
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


def _password() -> str:
    return secrets.token_urlsafe(24)


def plan_domain(
    nodes: Sequence[str],
    *,
    readers: Mapping[str, str | None] | None = None,
    subjects: Subjects | None = None,
    hub_domain: str = HUB_DOMAIN,
    password: Callable[[], str] = _password,
) -> DomainPlan:
    """Every user of a domain with ``nodes`` and ``readers`` (user -> home leaf, None: the hub).

    Reader names may not start with ``agent-`` or ``leaf-`` nor be ``controller``/``operator``:
    those name services, and agents may read every object.
    """
    subjects = subjects if subjects is not None else Subjects()
    readers = dict(readers or {})
    if len(set(nodes)) != len(nodes):
        raise SecurityConfigError(f"a node is listed twice in {list(nodes)}")
    for node in nodes:
        check_node_id(node)
    for user, home in readers.items():
        _check_user(user)
        if user.startswith(_SERVICE_NAMES) or user in _RESERVED:
            raise SecurityConfigError(
                f"reader {user!r} takes a name reserved for cim-place services "
                f"({', '.join(_SERVICE_NAMES)}*, {', '.join(_RESERVED)}); choose another name"
            )
        if home is not None and home not in nodes:
            raise SecurityConfigError(
                f"reader {user!r} is homed on leaf {home!r}, which is not a node of this domain "
                f"({', '.join(nodes) or 'none'}); pass it with --node"
            )
    hub_users = [
        User(CONTROLLER, password(), controller_permissions(subjects, hub_domain), "controller"),
        User(OPERATOR, password(), operator_permissions(subjects, hub_domain), "operator"),
    ]
    for user, home in sorted(readers.items()):
        if home is None:
            hub_users.append(
                User(user, password(), reader_permissions(user, subjects, hub_domain), "reader")
            )
    leaves: dict[str, tuple[User, ...]] = {}
    links: dict[str, User] = {}
    for node in nodes:
        homed = sorted(user for user, home in readers.items() if home == node)
        members = [
            User(
                agent_user(node),
                password(),
                agent_permissions(node, subjects, hub_domain),
                "agent",
            )
        ]
        members += [
            User(user, password(), reader_permissions(user, subjects, hub_domain, node), "reader")
            for user in homed
        ]
        leaves[node] = tuple(members)
        link = User(
            leaf_user(node),
            password(),
            leaf_link_permissions(node, homed, subjects, hub_domain),
            "leaf-link",
        )
        links[node] = link
        hub_users.append(link)
    return DomainPlan(
        hub=tuple(hub_users),
        leaves=leaves,
        leaf_links=links,
        subjects=subjects,
        hub_domain=hub_domain,
    )


# -- rendering -----------------------------------------------------------------------------------


def _q(text: str) -> str:
    return json.dumps(text)


def _list(items: Sequence[str]) -> str:
    return "[" + ", ".join(_q(s) for s in items) + "]"


def render_accounts(users: Sequence[User], *, account: str = ACCOUNT) -> str:
    """A nats-server config fragment: the ``accounts`` block with ``users`` and JetStream on."""
    lines = [
        "# Generated by `cim-place security gen`: cim-place users with least privilege.",
        "# Keep this file readable by the nats-server user only (it holds passwords).",
        "accounts {",
        f"  {account} {{",
        "    jetstream: enabled",
        "    users: [",
    ]
    for user in users:
        lines += [
            f"      # {user.role}",
            "      {",
            f"        user: {_q(user.name)}",
            f"        password: {_q(user.password)}",
            "        permissions: {",
            f"          publish: {{ allow: {_list(user.permissions.publish)} }}",
            f"          subscribe: {{ allow: {_list(user.permissions.subscribe)} }}",
            "        }",
            "      }",
        ]
    lines += ["    ]", "  }", "}"]
    return "\n".join(lines) + "\n"


def render_hub_link(link: User, hub_leaf_urls: Sequence[str]) -> str:
    """The leaf's hub-link fragment: variable ``CIM_PLACE_HUB_URLS``, the hub's leafnode URLs
    with this leaf's link credentials (``deploy/nats/leaf.conf`` uses it in its remote)."""
    urls = [_with_user(url, link) for url in hub_leaf_urls]
    return (
        "# Generated by `cim-place security gen`: how this leaf authenticates at the hub.\n"
        f"CIM_PLACE_HUB_URLS: {_list(urls)}\n"
    )


def _with_user(url: str, user: User) -> str:
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "nats", url
    rest = rest.rpartition("@")[2]
    return f"{scheme}://{user.name}:{user.password}@{rest}"


def render_files(
    plan: DomainPlan,
    *,
    hub_client_urls: Sequence[str],
    hub_leaf_urls: Sequence[str],
    leaf_client_url: str = "nats://127.0.0.1:4222",
) -> dict[str, str]:
    """Every file ``cim-place security gen`` writes, by relative path.

    - ``hub/accounts.conf``: included by every hub server's config;
    - ``<node>/accounts.conf`` and ``<node>/hub-link.conf``: included by that leaf's config;
    - ``credentials/<user>.env``: ``CIM_PLACE_SERVER=<url with the user's password>`` for the
      user's systemd unit or shell (agents: the same URL goes into ``nats.servers`` of their
      agent.yaml); readers homed on a leaf connect to it, the others to the hub;
    - ``users.json``: who is who (names, roles, homes; no passwords).
    """
    files = {"hub/accounts.conf": render_accounts(plan.hub)}
    roster: list[dict[str, str]] = []

    def credentials(user: User, urls: Sequence[str], home: str) -> None:
        server = ",".join(_with_user(url, user) for url in urls)
        files[f"credentials/{user.name}.env"] = (
            f"# cim-place {user.role} {user.name}: keep this file private.\n"
            f"CIM_PLACE_SERVER={server}\n"
        )
        roster.append({"user": user.name, "role": user.role, "home": home})

    for user in plan.hub:
        if user.role != "leaf-link":
            credentials(user, hub_client_urls, plan.hub_domain)
    for node, members in plan.leaves.items():
        files[f"{node}/accounts.conf"] = render_accounts(members)
        files[f"{node}/hub-link.conf"] = render_hub_link(plan.leaf_links[node], hub_leaf_urls)
        for user in members:
            credentials(user, [leaf_client_url.replace("{node}", node)], node)
    files["users.json"] = json.dumps({"users": roster}, indent=2) + "\n"
    return files

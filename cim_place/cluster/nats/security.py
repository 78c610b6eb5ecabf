"""Who is who in a cim-place domain: requester identity, user names and object access.

This module owns the security model of a domain (``docs/SECURITY.md`` explains it); the users and
their least-privilege permissions are built in :mod:`cim_place.cluster.nats.users` (from the
per-role allow lists of :mod:`cim_place.cluster.nats.permissions`):

1. **Requester identity.** Every user may subscribe only under its own inbox prefix
   ``_CIM_INBOX.<user>``. A request's reply subject therefore names a user that NATS has
   authenticated: a client claiming another user's prefix may publish the request, but the
   answer goes to an inbox it cannot subscribe to. :func:`requester_of` reads that identity; the
   block exchange (``cim_place.cluster.exchange.blocks``) uses it to refuse readers an object does
   not list.
2. **Object access.** :class:`ReadAccess` decides whether a requester may read a root from its
   pin: the owner, the users in the pin's ``readers`` metadata (comma separated, ``*`` for every
   authenticated user) and every agent (they replicate) may; an object without an owner is public.

Clients take their identity from the user name in their server URL (``nats://alice:...@host``):
see :func:`identity_of` and :func:`client_options`.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from urllib.parse import unquote, urlsplit

from cim_place.cluster.nats.subjects import check_node_id
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
    "ReadAccess",
    "RootMembers",
    "SecurityConfigError",
    "agent_user",
    "check_user",
    "client_options",
    "identity_of",
    "inbox_prefix",
    "leaf_user",
    "may_read",
    "readers_of",
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


class AccessDeniedError(CimPlaceError):
    """A requester asked for an object it may not read."""


class SecurityConfigError(CimPlaceError):
    """A user list that cannot be turned into a safe configuration."""


# -- identity ------------------------------------------------------------------------------------


def inbox_prefix(user: str) -> str:
    """The inbox prefix of ``user``: the only place it may subscribe for replies."""
    return f"{INBOX_ROOT}.{check_user(user)}"


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


def check_user(user: str) -> str:
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

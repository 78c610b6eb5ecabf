"""Every NATS user of a domain, and the nats-server configuration files that define them.

This module owns :func:`plan_domain`, which builds every user of a domain (controller, operator,
an agent and a leaf link per node, readers homed on the hub or a leaf), each with the
permissions of its role (:mod:`cim_place.cluster.nats.permissions`), and the rendering of that
plan: :func:`render_accounts` writes a nats-server ``accounts`` block (users with passwords,
included by the configs in ``deploy/nats``), :func:`render_files` every file
``cim-place security gen`` writes.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from cim_place.cluster.nats.permissions import (
    Permissions,
    agent_permissions,
    controller_permissions,
    leaf_link_permissions,
    operator_permissions,
    reader_permissions,
)
from cim_place.cluster.nats.security import (
    ACCOUNT,
    AGENT_PREFIX,
    CONTROLLER,
    LEAF_PREFIX,
    OPERATOR,
    SecurityConfigError,
    agent_user,
    check_user,
    leaf_user,
)
from cim_place.cluster.nats.subjects import HUB_DOMAIN, Subjects, check_node_id

__all__ = [
    "DomainPlan",
    "User",
    "plan_domain",
    "render_accounts",
    "render_files",
    "render_hub_link",
]

_SERVICE_NAMES = (AGENT_PREFIX, LEAF_PREFIX)
_RESERVED = (CONTROLLER, OPERATOR)


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
        check_user(user)
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

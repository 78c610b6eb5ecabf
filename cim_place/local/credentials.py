"""The users of a local domain: the production security model, generated for `cim-place up`.

This module owns the credentials ``up`` gives every process it starts (``docs/SECURITY.md``):
:func:`plan_local` builds the users with :func:`cim_place.cluster.nats.users.plan_domain`
(one ``agent-<node>`` per leaf, one ``leaf-<node>`` link per leaf, the ``controller``, the
read-only ``operator``) and adds ``admin``, the user of the CLI: at the hub the operator's reads
plus what the README's commands write (policies, names, drain flags, uploads through any agent,
reads of content), on each leaf a reader homed there. Like every other user it may not publish
events or tasks.

Passwords are new at every start (the servers are started with them), written to
``<dir>/credentials/<user>.env`` (``CIM_PLACE_SERVER=<url with the password>``, mode 0600, the
format ``cim-place security gen`` writes), and listed in ``context.json`` by path, never by value.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from cim_place.cluster.nats import kv
from cim_place.cluster.nats.permissions import (
    Permissions,
    leaf_link_permissions,
    operator_permissions,
    reader_permissions,
)
from cim_place.cluster.nats.security import LEAF_PREFIX, inbox_prefix
from cim_place.cluster.nats.subjects import HUB_DOMAIN, Subjects
from cim_place.cluster.nats.users import DomainPlan, User, plan_domain
from cim_place.errors import CimPlaceError

__all__ = [
    "ADMIN",
    "CREDENTIALS_DIR",
    "LocalCredentials",
    "admin_permissions",
    "leaf_cli_key",
    "plan_local",
    "read_credentials",
    "with_user",
]

ADMIN = "admin"
CREDENTIALS_DIR = "credentials"
_VARIABLE = "CIM_PLACE_SERVER="


def admin_permissions(subjects: Subjects, hub_domain: str = HUB_DOMAIN) -> Permissions:
    """The CLI of a local domain: the operator's reads, a hub reader's content access, and the
    writes the README's commands make (KV policies, names, drain flags, settings; the task and
    event streams are read with consumers of its own). No events, no tasks."""
    operator = operator_permissions(subjects, hub_domain)
    reader = reader_permissions(ADMIN, subjects, hub_domain)
    publish = [*operator.publish, *reader.publish]
    for bucket in (kv.POLICIES, kv.NAMES, kv.DRAIN, kv.SETTINGS):
        publish += [f"$KV.{bucket}.>", f"$JS.{hub_domain}.API.$KV.{bucket}.>"]
    publish += [
        # Policy apply, names and the tools read streams and buckets through JetStream's API
        # (consumers, direct gets, stream creation of the buckets they own).
        "$JS.API.>",
        f"$JS.{hub_domain}.API.>",
        "$JS.ACK.>",
        "$JS.FC.>",
    ]
    subscribe = [f"{inbox_prefix(ADMIN)}.>", *reader.subscribe[1:]]
    return Permissions(tuple(dict.fromkeys(publish)), tuple(dict.fromkeys(subscribe)))


@dataclass(frozen=True, slots=True)
class LocalCredentials:
    """The plan of a local domain and where each user's credentials file is."""

    plan: DomainPlan
    directory: Path

    def path(self, user: str) -> Path:
        return self.directory / f"{user}.env"

    def password(self, user: str) -> str:
        for candidate in self.plan.all_users():
            if candidate.name == user:
                return candidate.password
        raise CimPlaceError(f"no user {user!r} in this domain")

    def url(self, user: str, url: str) -> str:
        """``url`` (or a comma-separated list: a clustered hub) with ``user``'s password."""
        password = self.password(user)
        return ",".join(with_user(one.strip(), user, password) for one in url.split(","))

    def write(self, hub_url: str, leaf_urls: dict[str, str]) -> None:
        """Write every client user's credentials file (mode 0600, in a 0700 directory)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        os.chmod(self.directory, 0o700)
        for user in self.plan.hub:
            if user.role != "leaf-link":
                self._write_one(user.name, self.url(user.name, hub_url))
        for node, url in leaf_urls.items():
            for user in self.plan.leaves[node]:
                key = leaf_cli_key(node) if user.name == ADMIN else user.name
                self._write_one(key, with_user(url, user.name, user.password))

    def _write_one(self, user: str, url: str) -> None:
        path = self.path(user)
        partial = path.with_name(path.name + ".partial")
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(f"# cim-place user {user}: keep this file private.\n{_VARIABLE}{url}\n")
        partial.replace(path)


def plan_local(
    directory: Path, nodes: Sequence[str], subjects: Subjects | None = None
) -> LocalCredentials:
    """New users (and passwords) for a local domain of ``nodes`` under ``directory``.

    The CLI is one person, ``admin``, wherever it connects: at the hub with
    :func:`admin_permissions`, on each leaf as a reader homed there (uploads through that
    leaf's agent, content, names), so what it adds through a leaf it reads back through the hub.
    """
    subjects = subjects if subjects is not None else Subjects()
    plan = plan_domain(nodes, subjects=subjects)
    password = secrets.token_urlsafe(24)
    hub_domain = plan.hub_domain
    # `add --name` through a leaf writes the name: the leaf's CLI user (and its link) may write
    # KV cim-place-names in the hub's domain, and nothing else a reader may not.
    names = [
        f"$JS.{hub_domain}.API.STREAM.CREATE.KV_{kv.NAMES}",
        f"$JS.{hub_domain}.API.$KV.{kv.NAMES}.>",
    ]

    def with_names(permissions: Permissions) -> Permissions:
        publish = tuple(dict.fromkeys((*permissions.publish, *names)))
        subscribe = permissions.subscribe
        if permissions.subscribe == permissions.publish:  # a link: the same list both ways
            subscribe = publish
        return Permissions(publish, subscribe)

    leaves = {
        node: (
            *users,
            User(
                ADMIN,
                password,
                with_names(reader_permissions(ADMIN, subjects, hub_domain, node)),
                "reader",
            ),
        )
        for node, users in plan.leaves.items()
    }
    links = {
        node: replace(
            link,
            permissions=with_names(leaf_link_permissions(node, [ADMIN], subjects, hub_domain)),
        )
        for node, link in plan.leaf_links.items()
    }
    hub = tuple(
        links.get(u.name[len(LEAF_PREFIX) :], u) if u.role == "leaf-link" else u for u in plan.hub
    )
    admin = User(ADMIN, password, admin_permissions(subjects, hub_domain), "admin")
    plan = replace(plan, hub=(*hub, admin), leaves=leaves, leaf_links=links)
    return LocalCredentials(plan, Path(directory) / CREDENTIALS_DIR)


def leaf_cli_key(node: str) -> str:
    """The key of the CLI's credentials for leaf ``node``'s server (file and context.json)."""
    return f"{ADMIN}@{node}"


def with_user(url: str, user: str, password: str) -> str:
    """``url`` with ``user:password@`` (replacing any user it had)."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "nats", url
    rest = rest.rpartition("@")[2]
    return f"{scheme}://{user}:{password}@{rest}"


def read_credentials(path: Path) -> str:
    """The server URL (with user and password) in a credentials file; a clear error if none."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise CimPlaceError(
            f"cannot read the credentials file {path}: {exc.strerror or exc}; start the domain "
            "again with `cim-place up` (it writes them)"
        ) from None
    for line in text.splitlines():
        if line.startswith(_VARIABLE):
            return line[len(_VARIABLE) :].strip()
    raise CimPlaceError(f"{path} names no {_VARIABLE.rstrip('=')}; start the domain again")

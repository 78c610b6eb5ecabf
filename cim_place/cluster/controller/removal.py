"""Removing objects from the domain (``cim-place rm``) and expiring old versions of names.

Who publishes the tombstone: the operator's NATS user is read-only (it may publish only on
``<prefix>.api.>``, cluster/nats/security.py), and events are a node's to publish on its own
subjects. So the CLI asks the controller on ``<prefix>.api.rm``, and the **leading** controller
(standbys stay silent; no answer means no leader) checks the request and publishes
``ObjectDeleted`` on ``<prefix>.evt.<hub domain>.ObjectDeleted``. That subject belongs to no leaf
(a leaf's JetStream domain is its node id, and the hub's domain is taken), so no agent may
publish it. It is stored in ``OUTBOX_<hub domain>``, a stream in the hub's own domain that
``CIM_PLACE_EVENTS`` sources like a leaf's outbox: one event log, the same readers.

Steps of one removal (:meth:`Removals.remove`):

1. Resolve the reference (a CID, else a domain name); an object the projection does not track
   is refused (nothing to remove), one already removed is answered as such (idempotent).
2. Refuse while the object's policy is ``protected``, naming the policy.
3. Publish the tombstone, listing the names that point at the object; then remove those names.
4. Wait until the controller's own projection has applied the tombstone and reconcile the
   object once, so ``status`` says ``removed`` when the CLI returns. The reconciler drops every
   copy (the policy's minimum does not hold back an explicit removal); agents then collect the
   blocks that no other pin uses.

A request is JSON ``{"ref": str, "by": str, "reason": str}``; the answer is JSON: ``{"cid",
"names", "copies", "policy", "already"}``, or ``{"error": str, "code": "unknown" | "protected"
| "bad_request"}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import nats.errors
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext

from cim_place.cluster.events.publisher import EventPublisher
from cim_place.cluster.events.sources import attach_hub_outbox
from cim_place.cluster.events.store import ensure_outbox
from cim_place.cluster.events.types import ObjectDeleted
from cim_place.cluster.nats.kv import NAMES
from cim_place.cluster.nats.subjects import Subjects
from cim_place.cluster.state.names import NameRegistry, NamingError
from cim_place.errors import CimPlaceError, InvalidCidError
from cim_place.objectstore import cid as cids
from cim_place.objectstore.cid import Cid
from cim_place.policies.model import Policy
from cim_place.policies.selectors import ObjectFacts, match_policy

if TYPE_CHECKING:
    from cim_place.cluster.controller.service import Controller

__all__ = ["RM_API", "RemovalRefused", "Removals", "expire_name_versions"]

RM_API = "rm"
"""``<prefix>.api.rm``: the subject ``cim-place rm`` asks on."""
_APPLY_WAIT = 5.0
"""Seconds to wait for the feed to bring the tombstone back before answering anyway."""

_log = logging.getLogger(__name__)


class RemovalRefused(CimPlaceError):
    """A removal that cannot be done: ``code`` says why (unknown, protected, bad_request)."""

    def __init__(self, message: str, code: str) -> None:
        super().__init__(message)
        self.code = code


class _NotOurs(Exception):
    """The object belongs to a shard another controller process leads: it answers."""


class Removals:
    """The controller's side of ``cim-place rm``; :meth:`start` subscribes, :meth:`stop` ends."""

    def __init__(self, controller: Controller, js_hub: JetStreamContext) -> None:
        self.controller = controller
        self.js = js_hub
        self.hub = controller.config.hub_domain
        self.subjects: Subjects = controller.subjects
        self._publisher = EventPublisher(js_hub, self.hub, subjects=self.subjects)
        self._sub: Subscription | None = None

    async def start(self) -> None:
        await ensure_outbox(self.js, self.hub, self.subjects)
        await attach_hub_outbox(self.js, self.hub)
        nc = self.controller.nc
        assert nc is not None
        self._sub = await nc.subscribe(self.subjects.api(RM_API), cb=self._on_request)

    async def stop(self) -> None:
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
            self._sub = None

    async def _on_request(self, msg: Msg) -> None:
        if not self.controller.is_leader or not msg.reply:
            return  # the leader answers; a standby's answer could race it with stale state
        try:
            request = json.loads(msg.data)
            if not isinstance(request, dict) or not isinstance(request.get("ref"), str):
                raise RemovalRefused("a removal request is JSON with a string `ref`", "bad_request")
            answer: dict[str, Any] = await self.remove(
                request["ref"], by=str(request.get("by", "")), reason=str(request.get("reason", ""))
            )
        except _NotOurs:
            return
        except ValueError:
            answer = {"error": "a removal request is JSON", "code": "bad_request"}
        except RemovalRefused as exc:
            answer = {"error": str(exc), "code": exc.code}
        except (CimPlaceError, nats.errors.Error) as exc:
            answer = {"error": f"the controller could not remove it: {exc}", "code": "failed"}
        with contextlib.suppress(nats.errors.Error):
            await msg.respond(json.dumps(answer, sort_keys=True).encode())

    async def remove(self, ref: str, *, by: str, reason: str = "") -> dict[str, Any]:
        """Remove the object ``ref`` names from the domain (steps: module docstring)."""
        controller = self.controller
        projection = controller.projection
        names = NameRegistry(self.js)
        root = await self._resolve(names, ref)
        if not controller.leads(root):
            raise _NotOurs  # with shards, only the leader of the object's shard answers
        text = cids.to_str(root)
        view = projection.object(root)
        if view is None:
            raise RemovalRefused(
                f"no object {text} in the domain: the controller has seen no copy of it "
                "(`cim-place status` lists what it tracks)",
                "unknown",
            )
        policy = self.policy_of(root)
        copies = len(view.replicas)
        previous = projection.removal(root)
        if previous is not None:
            return _answer(text, list(previous.names), copies, policy.name, already=True)
        if policy.protected:
            raise RemovalRefused(
                f"{text} is protected by policy {policy.name!r} (`protected: true`); "
                "change that policy, or the object's match, before removing it",
                "protected",
            )
        pointing = sorted(r.name for r in await names.ls() if r.cid == root)
        event = ObjectDeleted(root=root, by=by, reason=reason, names=tuple(pointing))
        await self._publisher.publish_event(event, owner=controller.identity)
        removed = []
        for name in pointing:
            try:
                await names.rm(name, by=by)
                removed.append(name)
            except NamingError as exc:  # changed or removed meanwhile: not ours to remove now
                _log.info("removing name %s of %s: %s", name, text, exc)
        await self._settle(root)
        _log.info("%s removed %s (names: %s)", by or "someone", text, ", ".join(removed) or "-")
        return _answer(text, removed, copies, policy.name, already=False)

    def keep_versions(self, root: Cid) -> int | None:
        """``keep_versions`` of the policy of a tracked object (None for anything else)."""
        if self.controller.projection.object(root) is None:
            return None
        return self.policy_of(root).keep_versions

    def policy_of(self, root: Cid) -> Policy:
        view = self.controller.projection.object(root)
        facts = ObjectFacts(cid=cids.to_str(root))
        if view is not None:
            facts = ObjectFacts(
                cid=cids.to_str(root),
                name=view.name,
                owner=view.owner,
                metadata=view.metadata,
                size=view.size,
            )
        policies = self.controller.projection.policies.policies
        if not policies:
            from cim_place.policies.model import BUILTIN_DEFAULT

            return BUILTIN_DEFAULT
        return match_policy(policies, facts)[0]

    async def _resolve(self, names: NameRegistry, ref: str) -> Cid:
        try:
            return cids.parse(ref)
        except InvalidCidError:
            pass
        try:
            return await names.resolve(ref)
        except NamingError as exc:
            raise RemovalRefused(str(exc), "unknown") from None

    async def _settle(self, root: Cid) -> None:
        """Wait for the tombstone to come back through the feed, then reconcile the object."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + _APPLY_WAIT
        while self.controller.projection.removal(root) is None and loop.time() < deadline:
            await asyncio.sleep(0.02)
        if self.controller.projection.removal(root) is not None:
            await self.controller.reconcile_one(root)


def _answer(
    text: str, names: list[str], copies: int, policy: str, *, already: bool
) -> dict[str, Any]:
    return {"cid": text, "names": names, "copies": copies, "policy": policy, "already": already}


async def expire_name_versions(
    js_hub: JetStreamContext, keep_for: Callable[[Cid], int | None]
) -> int:
    """Purge the history of names whose object's policy sets ``keep_versions``; returns how
    many names were trimmed. ``keep_for(cid)``: the ``keep_versions`` of the policy governing
    ``cid`` (None: keep what the bucket keeps). A name keeps its latest ``keep_versions``
    revisions, the current one included; JetStream purges the older ones of its KV subject.
    """
    trimmed = 0
    for record in await NameRegistry(js_hub).ls():
        keep = keep_for(record.cid)
        if keep is None:
            continue
        subject = f"$KV.{NAMES}.{record.name}"
        try:
            await js_hub.purge_stream(f"KV_{NAMES}", subject=subject, keep=keep)
            trimmed += 1
        except nats.errors.Error as exc:
            _log.warning("expiring old versions of name %s: %s", record.name, exc)
    return trimmed

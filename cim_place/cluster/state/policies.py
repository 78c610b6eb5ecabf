"""The policy store: the applied set of policies in the KV bucket ``cim-place-policies``.

Layout of the bucket (history 64):

- ``_set``: the whole applied set (every policy in canonical form with its YAML source, the
  consumers, who applied it and when). It is the only key readers and the controller trust.
  KV has no multi-key transactions, so an apply writes exactly one revision of ``_set``: all
  policies change together or none do. Writes are compare-and-set on the revision read, so two
  operators applying at once cannot silently overwrite each other.
- ``<policy name>`` and ``_consumers``: a per-policy view written after ``_set``, for people
  reading the bucket with generic KV tools. It is derived, rewritten by every apply; after a
  failure between the two writes the next apply repairs it.

A policy's revision history is derived from the history of ``_set``.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

import nats.errors
import nats.js.errors
from nats.js.client import JetStreamContext
from nats.js.kv import KeyValue

from cim_place.cluster.nats.kv import POLICIES, ensure_bucket
from cim_place.errors import PolicyError, TransportError
from cim_place.policies.codec import consumers_to_dict, policy_to_dict
from cim_place.policies.diff import SetDiff, diff_sets
from cim_place.policies.model import PolicySet
from cim_place.policies.problems import PolicyValidationError
from cim_place.policies.validate import (
    LoadedPolicies,
    PolicySource,
    consumers_from_dict,
    policy_from_dict,
)

SET_KEY = "_set"
CONSUMERS_KEY = "_consumers"
HISTORY = 64
FORMAT = 1


@dataclass(frozen=True, slots=True)
class StoredSet:
    """The applied set at one revision of ``_set`` (revision 0: nothing applied yet)."""

    revision: int = 0
    policy_set: PolicySet = field(default_factory=PolicySet)
    sources: Mapping[str, PolicySource] = field(default_factory=dict)
    applied_at: str = ""
    applied_by: str = ""
    files: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class ApplyResult:
    diff: SetDiff
    revision: int
    """The revision of ``_set`` now in force (unchanged when nothing changed or dry run)."""
    written: bool


@dataclass(frozen=True, slots=True)
class PolicyRevision:
    """One change of one policy: at which revision of the set, and what it became."""

    revision: int
    change: Literal["added", "changed", "removed"]
    applied_at: str
    applied_by: str
    policy: dict[str, Any] | None
    """The canonical policy after the change; None when removed."""


def encode_set(
    policy_set: PolicySet,
    sources: Mapping[str, PolicySource],
    *,
    applied_at: str,
    applied_by: str,
    files: tuple[str, ...] = (),
) -> bytes:
    """The JSON value of ``_set``."""
    return json.dumps(
        {
            "format": FORMAT,
            "applied_at": applied_at,
            "applied_by": applied_by,
            "files": list(files),
            "policies": {
                p.name: {"policy": policy_to_dict(p), "source": _source(sources.get(p.name))}
                for p in policy_set.policies
            },
            "consumers": consumers_to_dict(policy_set.consumers),
        },
        sort_keys=True,
    ).encode()


def decode_set(value: bytes, revision: int) -> StoredSet:
    """Read a ``_set`` value; PolicyError when it is not one cim-place wrote."""
    where = f"{POLICIES}/{SET_KEY}@{revision}"
    try:
        doc = json.loads(value)
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise ValueError(f"unknown format {doc.get('format') if isinstance(doc, dict) else ''}")
        entries = doc["policies"]
        policies = tuple(
            policy_from_dict(entry["policy"], f"{where}:{name}") for name, entry in entries.items()
        )
        sources = {
            name: PolicySource(
                str(entry["source"].get("file", "")),
                int(entry["source"].get("line", 0)),
                str(entry["source"].get("text", "")),
            )
            for name, entry in entries.items()
        }
        consumers = consumers_from_dict(doc.get("consumers", {}), where)
        return StoredSet(
            revision=revision,
            policy_set=PolicySet(
                policies=tuple(sorted(policies, key=lambda p: p.name)), consumers=consumers
            ),
            sources=sources,
            applied_at=str(doc.get("applied_at", "")),
            applied_by=str(doc.get("applied_by", "")),
            files=tuple(doc.get("files", ())),
        )
    except PolicyValidationError as exc:
        raise PolicyError(f"the stored policy set {where} is invalid: {exc}") from None
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise PolicyError(
            f"the stored policy set {where} is not readable ({exc}); apply the policy files "
            "again to replace it"
        ) from None


class PolicyStore:
    """The applied policies of a domain, in one KV bucket."""

    def __init__(self, kv: KeyValue | None) -> None:
        # None: the bucket does not exist yet (read-only use); nothing has been applied.
        self._kv = kv

    @classmethod
    async def open(cls, js: JetStreamContext, *, create: bool = True) -> PolicyStore:
        """Open the bucket; ``create`` makes it when absent (writers), else reads see nothing."""
        try:
            if create:
                return cls(await ensure_bucket(js, POLICIES, history=HISTORY))
            try:
                return cls(await js.key_value(POLICIES))
            except nats.js.errors.BucketNotFoundError:
                return cls(None)
        except nats.errors.Error as exc:
            raise TransportError(f"cannot open KV bucket {POLICIES}: {exc}") from exc

    async def load(self, revision: int | None = None) -> StoredSet:
        """The applied set now, or at ``revision`` of ``_set``."""
        if self._kv is None:
            if revision is not None:
                raise PolicyError(f"no policies have been applied; revision {revision} is unknown")
            return StoredSet()
        try:
            entry = await self._kv.get(SET_KEY, revision=revision)
        except nats.js.errors.KeyNotFoundError:
            if revision is not None:
                raise PolicyError(
                    f"revision {revision} is not a revision of the policy set (it may have been "
                    f"trimmed: {HISTORY} are kept); list revisions with "
                    "`cim-place policy history NAME`"
                ) from None
            return StoredSet()
        except nats.errors.Error as exc:
            raise TransportError(f"cannot read {POLICIES}/{SET_KEY}: {exc}") from exc
        return decode_set(entry.value or b"", entry.revision or 0)

    async def apply(
        self,
        loaded: LoadedPolicies,
        *,
        dry_run: bool = False,
        actor: str = "",
        now: datetime | None = None,
    ) -> ApplyResult:
        """Replace the applied set with ``loaded`` in one write; nothing is written when nothing
        changed or on a dry run. Raises PolicyError when someone else applied in between."""
        current = await self.load()
        return await self._replace(
            current, loaded.policy_set, loaded.sources, loaded.files, dry_run, actor, now
        )

    async def remove(
        self, name: str, *, actor: str = "", now: datetime | None = None
    ) -> ApplyResult:
        """Remove one policy from the applied set (a new revision without it)."""
        current = await self.load()
        if current.policy_set.policy(name) is None:
            known = ", ".join(p.name for p in current.policy_set.policies) or "none"
            raise PolicyError(f"no applied policy named {name!r} (applied: {known})")
        remaining = PolicySet(
            policies=tuple(p for p in current.policy_set.policies if p.name != name),
            consumers=current.policy_set.consumers,
        )
        sources = {k: v for k, v in current.sources.items() if k != name}
        return await self._replace(current, remaining, sources, current.files, False, actor, now)

    async def set_history(self) -> list[StoredSet]:
        """Every kept revision of the applied set, oldest first."""
        if self._kv is None:
            return []
        try:
            entries = await self._kv.history(SET_KEY)
        except nats.js.errors.NoKeysError:
            return []
        except nats.errors.Error as exc:
            raise TransportError(f"cannot read the history of {POLICIES}/{SET_KEY}: {exc}") from exc
        return [
            decode_set(e.value or b"", e.revision or 0)
            for e in entries
            if e.operation is None and e.value
        ]

    async def history(self, name: str) -> list[PolicyRevision]:
        """The revisions of the set at which policy ``name`` was added, changed or removed."""
        revisions: list[PolicyRevision] = []
        previous: dict[str, Any] | None = None
        for stored in await self.set_history():
            policy = stored.policy_set.policy(name)
            current = policy_to_dict(policy) if policy is not None else None
            if current != previous:
                change: Literal["added", "changed", "removed"] = (
                    "added" if previous is None else "removed" if current is None else "changed"
                )
                revisions.append(
                    PolicyRevision(
                        stored.revision, change, stored.applied_at, stored.applied_by, current
                    )
                )
            previous = current
        return revisions

    async def watch(self) -> AsyncIterator[StoredSet]:
        """The applied set now, then again at every apply (for the controller)."""
        if self._kv is None:
            raise PolicyError(f"the bucket {POLICIES} does not exist; open the store with create")
        watcher = await self._kv.watch(SET_KEY)
        try:
            async for entry in watcher:
                if entry is None:
                    continue  # the end of the initial values
                if entry.operation is None and entry.value:
                    yield decode_set(entry.value, entry.revision or 0)
        finally:
            await watcher.stop()  # type: ignore[no-untyped-call]

    async def _replace(
        self,
        current: StoredSet,
        new: PolicySet,
        sources: Mapping[str, PolicySource],
        files: tuple[str, ...],
        dry_run: bool,
        actor: str,
        now: datetime | None,
    ) -> ApplyResult:
        diff = diff_sets(current.policy_set, new)
        if dry_run or diff.empty:
            return ApplyResult(diff=diff, revision=current.revision, written=False)
        if self._kv is None:
            raise PolicyError(f"the bucket {POLICIES} does not exist; open the store with create")
        applied_at = (now or datetime.now(UTC)).isoformat(timespec="seconds")
        value = encode_set(new, sources, applied_at=applied_at, applied_by=actor, files=files)
        try:
            if current.revision == 0:
                revision = await self._kv.create(SET_KEY, value)
            else:
                revision = await self._kv.update(SET_KEY, value, last=current.revision)
        except nats.js.errors.KeyWrongLastSequenceError:
            raise PolicyError(
                "the policies were changed by someone else while this apply ran; nothing was "
                "applied: run `cim-place policy diff` again and re-apply"
            ) from None
        except nats.errors.MaxPayloadError:
            raise PolicyError(
                f"the policy set is too large for one message ({len(value)} bytes); "
                "raise max_payload of the hub or shorten the files"
            ) from None
        except nats.errors.Error as exc:
            raise TransportError(f"cannot write {POLICIES}/{SET_KEY}: {exc}") from exc
        await self._write_view(new, sources, diff, revision)
        return ApplyResult(diff=diff, revision=revision, written=True)

    async def _write_view(
        self, new: PolicySet, sources: Mapping[str, PolicySource], diff: SetDiff, revision: int
    ) -> None:
        assert self._kv is not None
        try:
            for policy in new.policies:
                entry = {
                    "policy": policy_to_dict(policy),
                    "source": _source(sources.get(policy.name)),
                    "set_revision": revision,
                }
                await self._kv.put(policy.name, json.dumps(entry, sort_keys=True).encode())
            for name in diff.removed:
                await self._kv.delete(name)
            consumers = {"consumers": consumers_to_dict(new.consumers), "set_revision": revision}
            await self._kv.put(CONSUMERS_KEY, json.dumps(consumers, sort_keys=True).encode())
        except nats.errors.Error as exc:
            raise TransportError(
                f"the policy set was applied (revision {revision}) but the per-policy view "
                f"could not be written ({exc}); apply again to repair it"
            ) from exc


async def load_policies(js: JetStreamContext, revision: int | None = None) -> StoredSet:
    """The applied set (empty, revision 0, when nothing has been applied)."""
    store = await PolicyStore.open(js, create=False)
    return await store.load(revision)


async def watch_policies(js: JetStreamContext) -> AsyncIterator[StoredSet]:
    """The applied set now and after every apply, for as long as the caller iterates."""
    store = await PolicyStore.open(js, create=True)
    async for stored in store.watch():
        yield stored


def _source(source: PolicySource | None) -> dict[str, Any]:
    if source is None:
        return {"file": "", "line": 0, "text": ""}
    return {"file": source.file, "line": source.line, "text": source.text}

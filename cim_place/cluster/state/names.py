"""Domain-wide names: pointers from a name to a CID, kept in the KV bucket ``cim-place-names``.

This module owns every read and write of the bucket (in the hub's JetStream domain, history 64);
the name rules and the stored record are :mod:`cim_place.cluster.state.name_record`. Many names
may point at one CID; a name points at one CID at a time, and the bucket's history keeps what it
pointed at before.

Layout: one key per name; the value is JSON (readable with generic KV tools)::

    {"cid": "bafy...", "set_by": "ana@host", "set_at": "2026-11-28T01:02:03+00:00",
     "previous": "bafk...", "note": "release 3"}

``previous`` and ``note`` are left out when empty. ``rm`` writes a KV delete marker whose body is
the same JSON, naming who removed the name and (as ``cid``) what it pointed at, so history says
who removed what; generic KV tools see an ordinary delete. Every write is compare-and-set on the
revision read first, so ``previous`` is exact even when two writers race.
"""

from __future__ import annotations

import asyncio
import logging
import random
from dataclasses import dataclass
from datetime import UTC, datetime

import nats.errors
import nats.js.errors
from nats.js import api
from nats.js.client import JetStreamContext
from nats.js.kv import KeyValue

from cim_place.cluster.nats.kv import MAX_HISTORY, NAMES, ensure_bucket
from cim_place.cluster.nats.kv_listing import latest_entries
from cim_place.cluster.state.name_record import (
    InvalidNameError,
    NameConflictError,
    NameRecord,
    NamingError,
    UnknownNameError,
    check_name,
    decode_record,
    encode_record,
)
from cim_place.errors import InvalidCidError, TransportError
from cim_place.objectstore import cid as cids
from cim_place.objectstore.cid import Cid

# NamingError is named here too: the controller's removal imports it with NameRegistry.
__all__ = ["HISTORY", "NameRegistry", "NamingError"]

_log = logging.getLogger(__name__)

HISTORY = MAX_HISTORY
"""Revisions kept per name (the most JetStream KV allows)."""

# KV headers (as nats-py and nats.go write them), for the delete marker with a body.
_KV_OPERATION = "KV-Operation"
_KV_DELETE = "DEL"
_KV_PURGE = "PURGE"
# How often a write without an expected revision re-reads and retries after losing a race: every
# round of a race has a winner, so this many writers of one name at once all get through; a
# random pause spreads the losers out.
_WRITE_ATTEMPTS = 16
_RETRY_PAUSE = 0.01


def _to_cid(cid: Cid | str) -> Cid:
    if isinstance(cid, str):
        return cids.parse(cid)
    cids.split(cid)  # raises InvalidCidError on a malformed binary CID
    return bytes(cid)


@dataclass(frozen=True, slots=True)
class _Latest:
    """The last revision of a key, live or a delete marker (revision 0: never written)."""

    revision: int
    record: NameRecord | None
    """The live record; None when the name does not exist now."""


class NameRegistry:
    """The domain's names, in the KV bucket ``cim-place-names`` of the hub's JetStream domain.

    Build it from a JetStream context bound to the hub's domain (``jetstream(nc, "hub")``, which
    also works from a leaf connection). Readers never create the bucket: before the first ``set``
    a domain simply has no names. Every method raises TransportError when NATS fails.
    """

    def __init__(self, js: JetStreamContext) -> None:
        self._js = js
        self._kv: KeyValue | None = None

    async def set(
        self,
        name: str,
        cid: Cid | str,
        *,
        by: str = "",
        note: str = "",
        expect_revision: int | None = None,
    ) -> int:
        """Point ``name`` at ``cid``; return the new revision.

        ``expect_revision``: write only if the name's current revision is this one (0: only if
        the name does not exist now), else raise NameConflictError. Without it the write still
        compares-and-sets, re-reading after a lost race, so the recorded ``previous`` is exact.
        Setting a name to the CID it already has writes a new revision (a deliberate re-set).
        """
        check_name(name)
        target = _to_cid(cid)
        kv = await self._writable_bucket()
        for _ in range(_WRITE_ATTEMPTS):
            latest = await self._latest(name)
            self._check_expected(name, latest, expect_revision)
            value = encode_record(
                target,
                set_by=by,
                set_at=_now(),
                previous=latest.record.cid if latest.record else None,
                note=note,
            )
            try:
                return int(await kv.update(name, value, last=latest.revision))
            except nats.js.errors.KeyWrongLastSequenceError:
                if expect_revision is not None:
                    raise self._conflict(name, expect_revision) from None
                await _pause()
            except nats.errors.Error as exc:
                raise TransportError(f"cannot write {NAMES}/{name}: {exc}") from exc
        raise NameConflictError(
            f"name {name!r} kept changing while it was being set ({_WRITE_ATTEMPTS} attempts); "
            "try again"
        )

    async def get(self, name: str) -> NameRecord | None:
        """The current record of ``name``, or None when it does not exist (or was removed)."""
        check_name(name)
        kv = await self._bucket(create=False)
        if kv is None:
            return None
        return (await self._latest(name)).record

    async def resolve(self, ref: str) -> Cid:
        """The CID ``ref`` stands for: a CID string parses to itself, anything else is a name.

        Raises UnknownNameError when ``ref`` is neither a CID nor an existing name; for a name
        that existed, the error says who removed it and what it pointed at.
        """
        ref = ref.strip()
        try:
            return cids.parse(ref)
        except InvalidCidError:
            pass
        try:
            check_name(ref)
        except InvalidNameError:
            raise self._unknown(ref) from None
        record = await self.get(ref)
        if record is None:
            raise await self._gone(ref)
        return record.cid

    async def _gone(self, name: str) -> UnknownNameError:
        # Only on the failure path: one history read to tell "removed" from "never existed".
        history = await self.history(name)
        last = history[-1] if history else None
        if last is None or not last.removed or not last.cid:
            return self._unknown(name)
        return UnknownNameError(
            f"name {name!r} was removed by {last.set_by or 'someone'}; it pointed at "
            f"{last.cid_text} (`cim-place status {last.cid_text}`)"
        )

    async def ls(self, prefix: str | None = None) -> list[NameRecord]:
        """Every existing name (optionally only those starting with ``prefix``), sorted by name.

        A value cim-place cannot read (written by another tool) is skipped with a warning.
        """
        kv = await self._bucket(create=False)
        if kv is None:
            return []
        records: list[NameRecord] = []
        for entry in await latest_entries(kv):
            if prefix and not entry.key.startswith(prefix):
                continue
            try:
                records.append(self._from_entry(entry))
            except TransportError as exc:
                # One foreign value must not hide every other name from a listing.
                _log.warning("skipping %s", exc)
        return sorted(records, key=lambda r: r.name)

    async def history(self, name: str) -> list[NameRecord]:
        """Every kept revision of ``name``, oldest first, removals included (``removed``).

        An empty list when the name was never set (or its history was purged).
        """
        check_name(name)
        kv = await self._bucket(create=False)
        if kv is None:
            return []
        try:
            entries = await kv.history(name)
        except nats.js.errors.NoKeysError:
            return []
        except nats.errors.Error as exc:
            raise TransportError(f"cannot read the history of {NAMES}/{name}: {exc}") from exc
        records: list[NameRecord] = []
        last_cid: Cid = b""
        for entry in entries:
            record = self._from_entry(entry)
            if record.removed and not record.cid:
                # A plain delete marker: it removed whatever the revision before pointed at.
                record = NameRecord(
                    name, last_cid, revision=record.revision, time=record.time, removed=True
                )
            records.append(record)
            last_cid = b"" if record.removed else record.cid
        return records

    async def rm(self, name: str, *, by: str = "", expect_revision: int | None = None) -> int:
        """Remove ``name`` (a delete marker; history keeps the past); return the marker's revision.

        Raises UnknownNameError when the name does not exist now, NameConflictError when
        ``expect_revision`` is given and is not the current revision.
        """
        check_name(name)
        kv = await self._bucket(create=False)
        if kv is None:
            raise self._unknown(name, cid_hint=False)
        for _ in range(_WRITE_ATTEMPTS):
            latest = await self._latest(name)
            if latest.record is None:
                raise self._unknown(name, cid_hint=False)
            self._check_expected(name, latest, expect_revision)
            body = encode_record(latest.record.cid, set_by=by, set_at=_now())
            headers = {
                _KV_OPERATION: _KV_DELETE,
                api.Header.EXPECTED_LAST_SUBJECT_SEQUENCE.value: str(latest.revision),
            }
            try:
                ack = await self._js.publish(f"$KV.{NAMES}.{name}", body, headers=headers)
                return int(ack.seq)
            except nats.js.errors.APIError as exc:
                if exc.err_code not in (10071, 10164):  # wrong last sequence
                    raise TransportError(f"cannot remove {NAMES}/{name}: {exc}") from exc
                if expect_revision is not None:
                    raise self._conflict(name, expect_revision) from None
                await _pause()
            except nats.errors.Error as exc:
                raise TransportError(f"cannot remove {NAMES}/{name}: {exc}") from exc
        raise NameConflictError(
            f"name {name!r} kept changing while it was being removed ({_WRITE_ATTEMPTS} "
            "attempts); try again"
        )

    # -- internals --------------------------------------------------------------------------------
    async def _writable_bucket(self) -> KeyValue:
        bucket = await self._bucket(create=True)
        assert bucket is not None  # ensure_bucket creates it or raises
        return bucket

    async def _bucket(self, *, create: bool) -> KeyValue | None:
        if self._kv is not None:
            return self._kv
        try:
            if create:
                self._kv = await ensure_bucket(self._js, NAMES, history=HISTORY)
            else:
                self._kv = await self._js.key_value(NAMES)
        except nats.js.errors.BucketNotFoundError:
            return None
        except nats.errors.Error as exc:
            raise TransportError(f"cannot open KV bucket {NAMES}: {exc}") from exc
        return self._kv

    async def _latest(self, name: str) -> _Latest:
        # A stream message read (not kv.get) so a delete marker's revision is seen too: a write
        # after a removal must compare-and-set against the marker.
        try:
            msg = await self._js.get_msg(f"KV_{NAMES}", subject=f"$KV.{NAMES}.{name}")
        except nats.js.errors.NotFoundError:
            return _Latest(0, None)
        except nats.errors.Error as exc:
            raise TransportError(f"cannot read {NAMES}/{name}: {exc}") from exc
        revision = int(msg.seq or 0)
        operation = (msg.headers or {}).get(_KV_OPERATION)
        if operation in (_KV_DELETE, _KV_PURGE):
            return _Latest(revision, None)
        return _Latest(revision, decode_record(name, msg.data, revision=revision, time=msg.time))

    @staticmethod
    def _from_entry(entry: KeyValue.Entry) -> NameRecord:
        removed = entry.operation in (_KV_DELETE, _KV_PURGE)
        created = entry.created if isinstance(entry.created, datetime) else None
        return decode_record(
            entry.key, entry.value, revision=int(entry.revision or 0), time=created, removed=removed
        )

    def _check_expected(self, name: str, latest: _Latest, expect_revision: int | None) -> None:
        if expect_revision is None:
            return
        current = latest.record.revision if latest.record else 0
        if current != expect_revision:
            raise self._conflict(name, expect_revision, current)

    @staticmethod
    def _conflict(name: str, expected: int, current: int | None = None) -> NameConflictError:
        now = (
            ""
            if current is None
            else " (it does not exist now)"
            if current == 0
            else f" (it is at revision {current})"
        )
        want = "not to exist" if expected == 0 else f"to be at revision {expected}"
        return NameConflictError(
            f"name {name!r} was expected {want}{now}; someone else changed it: "
            f"check `cim-place name history {name}` and try again"
        )

    @staticmethod
    def _unknown(ref: str, *, cid_hint: bool = True) -> UnknownNameError:
        if cid_hint:
            return UnknownNameError(f"no name or CID `{ref}`; list names with `cim-place name ls`")
        return UnknownNameError(f"no name `{ref}`; list names with `cim-place name ls`")


async def _pause() -> None:
    await asyncio.sleep(random.uniform(0, _RETRY_PAUSE))


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")

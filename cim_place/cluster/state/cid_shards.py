"""Controller shards: which shard a CID belongs to, and who leads each shard (read side).

With ``cim-place controller --shards N`` the domain's CIDs are split into N shards, each led by
one controller process through its own lease in KV ``cim-place-leader``
(:mod:`cim_place.cluster.state.leader`); the controller side is
:mod:`cim_place.cluster.controller.shards`. This module owns what both that side and readers
(``cim-place status CID``) need:

- :func:`shard_of`: shard ``i`` of ``n`` holds the CIDs whose multihash digest, read as a
  big-endian number from its first 8 bytes, falls in ``[i * 2**64 / n, (i + 1) * 2**64 / n)``.
  The ranges are contiguous and depend on the digest only (not on the CID's version, codec or
  text), so every process, every release and every reader computes the same shard.
- the keys: the lease of shard ``i`` of ``n`` is ``shard.<i>-of-<n>`` (the single-controller
  lease keeps its key, ``controller``); each running sharded controller process writes
  ``member.<identity>`` (expiring with the bucket's TTL, so it counts live processes); each
  shard's summary is ``_summary.<i>-of-<n>`` in KV ``cim-place-locations``, and readers sum them
  (:func:`merge_summaries`).
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace

import nats.errors
import nats.js.errors
from nats.js.client import JetStreamContext
from nats.js.kv import KeyValue

from cim_place.cluster.nats import kv
from cim_place.cluster.nats.kv_listing import live_keys
from cim_place.cluster.state.lease import LEADER_KEY, LeaderRecord, read_leader
from cim_place.errors import CimPlaceError, TransportError
from cim_place.objectstore.cid import Cid, split
from cim_place.placement.status import Summary

__all__ = [
    "MEMBER_PREFIX",
    "MemberRecord",
    "ShardOwner",
    "merge_summaries",
    "read_shard_summaries",
    "shard_key",
    "shard_of",
    "shard_owner",
    "shard_range",
    "summary_key",
]

MEMBER_PREFIX = "member."
_SHARD_KEY = re.compile(r"^shard\.(\d+)-of-(\d+)$")
_SUMMARY_KEY = re.compile(r"^_summary\.(\d+)-of-(\d+)$")
_SPAN = 1 << 64


def _digest(cid: Cid) -> bytes:
    # Fast path: a sha2-256 multihash (0x12, 0x20) ends every CID of this domain in practice.
    if len(cid) >= 34 and cid[-34] == 0x12 and cid[-33] == 0x20:
        return cid[-32:]
    try:
        return split(cid)[3]
    except CimPlaceError:
        return cid  # not a CID the projection would hold; any stable answer will do


def shard_of(cid: Cid, shards: int) -> int:
    """The shard (0 .. ``shards`` - 1) that owns ``cid``: a range of its digest's first 8 bytes."""
    if shards <= 1:
        return 0
    lead = int.from_bytes(_digest(cid)[:8].ljust(8, b"\0"), "big")
    return (lead * shards) >> 64


def shard_range(index: int, shards: int) -> tuple[str, str]:
    """First and last 8-byte digest prefix (hex) of shard ``index`` of ``shards``."""
    low = -(-index * _SPAN // shards)
    high = -(-(index + 1) * _SPAN // shards) - 1
    return f"{low:016x}", f"{high:016x}"


def shard_key(index: int, shards: int) -> str:
    """The lease key of shard ``index`` of ``shards`` in KV ``cim-place-leader``."""
    return f"shard.{index}-of-{shards}"


def summary_key(index: int, shards: int) -> str:
    """The key of shard ``index``'s summary in KV ``cim-place-locations``."""
    return f"_summary.{index}-of-{shards}"


@dataclass(frozen=True, slots=True)
class MemberRecord:
    """A running sharded controller process: its identity, the shard count and what it leads."""

    identity: str
    shards: int
    leads: tuple[int, ...]
    at: float

    def encode(self) -> bytes:
        return json.dumps(
            {
                "identity": self.identity,
                "shards": self.shards,
                "leads": list(self.leads),
                "at": self.at,
            },
            sort_keys=True,
        ).encode()

    @classmethod
    def decode(cls, data: bytes) -> MemberRecord:
        try:
            doc = json.loads(data)
            return cls(
                identity=str(doc["identity"]),
                shards=int(doc["shards"]),
                leads=tuple(int(i) for i in doc.get("leads", [])),
                at=float(doc.get("at", 0.0)),
            )
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"malformed member record in {kv.LEADER}: {exc!r}") from None


@dataclass(frozen=True, slots=True)
class ShardOwner:
    """Which shard holds a CID and who leads it (``leader`` None: nobody holds its lease now)."""

    index: int
    shards: int
    leader: LeaderRecord | None

    def to_dict(self) -> dict[str, object]:
        low, high = shard_range(self.index, self.shards)
        return {
            "index": self.index,
            "of": self.shards,
            "digest_range": [low, high],
            "leader": None if self.leader is None else self.leader.leader_id,
            "term": None if self.leader is None else self.leader.term,
        }


async def _shard_count(bucket: KeyValue) -> int | None:
    """The shard count live controllers use: from a held lease's key, else a member record."""
    # The usual case first, one get: an unsharded controller holds the single lease.
    with contextlib.suppress(nats.js.errors.KeyNotFoundError):
        entry = await bucket.get(LEADER_KEY)
        if entry.value:
            return 1
    keys = await live_keys(bucket)
    for key in keys:
        found = _SHARD_KEY.match(key)
        if found:
            return int(found.group(2))
    for key in keys:
        if key.startswith(MEMBER_PREFIX):
            with contextlib.suppress(nats.js.errors.KeyNotFoundError, ValueError):
                entry = await bucket.get(key)
                if entry.value:
                    return MemberRecord.decode(entry.value).shards
    return None


async def shard_owner(js_hub: JetStreamContext, cid: Cid) -> ShardOwner | None:
    """The shard of ``cid`` and its leader, or None when the controllers run unsharded (or none
    runs). Raises TransportError when the hub cannot be reached."""
    try:
        bucket = await js_hub.key_value(kv.LEADER)
    except nats.js.errors.BucketNotFoundError:
        return None
    except nats.errors.Error as exc:
        raise TransportError(f"could not read the shards from {kv.LEADER}: {exc}") from exc
    try:
        shards = await _shard_count(bucket)
    except nats.errors.Error as exc:
        raise TransportError(f"could not read the shards from {kv.LEADER}: {exc}") from exc
    if shards is None or shards <= 1:
        return None
    index = shard_of(cid, shards)
    return ShardOwner(index, shards, await read_leader(js_hub, shard_key(index, shards)))


def merge_summaries(parts: Sequence[Summary]) -> Summary:
    """One domain summary from per-shard ones: object counts are summed; what every controller
    sees whole (nodes, damaged replicas, rejected events, warnings) comes from the newest."""
    newest = max(parts, key=lambda s: s.updated_at)
    by_state: dict[str, int] = {}
    for part in parts:
        for state, count in part.by_state.items():
            by_state[state] = by_state.get(state, 0) + count
    return replace(
        newest,
        objects=sum(p.objects for p in parts),
        by_state=by_state,
        under_replicated=sum(p.under_replicated for p in parts),
        total_bytes=sum(p.total_bytes for p in parts),
        updated_at=min(p.updated_at for p in parts),
    )


async def read_shard_summaries(bucket: KeyValue) -> tuple[Summary | None, int]:
    """The merged summary of the newest shard layout in the locations base ``bucket`` and the
    number of shards whose summary is missing (None, 0: no sharded summary at all)."""
    by_layout: dict[int, dict[int, Summary]] = {}
    try:
        keys = await live_keys(bucket)
    except nats.errors.Error as exc:
        raise TransportError(
            f"could not list the shard summaries in {kv.LOCATIONS}: {exc}"
        ) from exc
    for key in keys:
        found = _SUMMARY_KEY.match(key)
        if not found:
            continue
        index, shards = int(found.group(1)), int(found.group(2))
        with contextlib.suppress(nats.errors.Error, ValueError):
            entry = await bucket.get(key)
            if entry.value:
                by_layout.setdefault(shards, {})[index] = Summary.decode(entry.value)
    if not by_layout:
        return None, 0
    # Summaries of an earlier shard count linger (nothing deletes them): the newest layout wins.
    shards, parts = max(
        by_layout.items(), key=lambda item: max(s.updated_at for s in item[1].values())
    )
    return merge_summaries(list(parts.values())), shards - len(parts)

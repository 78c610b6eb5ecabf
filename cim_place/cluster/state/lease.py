"""The controller lease's record and its reading: who leads the domain (or one shard of it).

This module owns the value stored under the lease key of bucket ``cim-place-leader``
(``kv.LEADER``): the ``LeaderRecord`` (who leads, from which host and address, since when, and
the term), its encoding, and every read of it (``read_leader`` for readers such as ``status``,
``read_entry`` and ``leader_in`` for the election). Taking, renewing and releasing the lease
belong to :mod:`cim_place.cluster.state.leader`.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

import nats.errors
import nats.js.errors
from nats.js.client import JetStreamContext
from nats.js.kv import KeyValue

from cim_place.cluster.nats import kv
from cim_place.errors import CimPlaceError, TransportError

__all__ = [
    "DEFAULT_LEASE",
    "LEADER_KEY",
    "LeaderRecord",
    "LeaseError",
    "leader_in",
    "read_entry",
    "read_leader",
]

DEFAULT_LEASE = 6.0
"""Seconds a leader's lease lasts without renewal (the TTL of the ``cim-place-leader`` bucket)."""

LEADER_KEY = "controller"
"""The one key of the leadership bucket."""

_MALFORMED_HINT = "it expires within one lease and the next controller replaces it"


class LeaseError(CimPlaceError):
    """The leadership bucket cannot hold a safe lease (no TTL, or one too short for the timing)."""


@dataclass(frozen=True, slots=True)
class LeaderRecord:
    """The value of the leadership key: who leads and since when.

    ``elected_at`` and ``renewed_at`` are the leader's wall-clock times, for people reading
    ``status``; nothing decides on them (expiry is the server's TTL). ``term`` is 0 only in the
    first write of a leadership, whose own KV revision is the term (``read_leader`` fills it in).
    """

    leader_id: str
    host: str
    address: str
    instance: str
    term: int
    elected_at: float
    renewed_at: float

    def encode(self) -> bytes:
        return json.dumps(
            {
                "leader_id": self.leader_id,
                "host": self.host,
                "address": self.address,
                "instance": self.instance,
                "term": self.term,
                "elected_at": self.elected_at,
                "renewed_at": self.renewed_at,
            },
            sort_keys=True,
        ).encode()

    @classmethod
    def decode(cls, data: bytes) -> LeaderRecord:
        """Parse a record; raises ValueError (saying what was wrong) for anything malformed."""
        try:
            doc = json.loads(data)
            return cls(
                leader_id=str(doc["leader_id"]),
                host=str(doc.get("host", "")),
                address=str(doc.get("address", "")),
                instance=str(doc["instance"]),
                term=int(doc.get("term", 0)),
                elected_at=float(doc.get("elected_at", 0.0)),
                renewed_at=float(doc.get("renewed_at", 0.0)),
            )
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"malformed leader record in {kv.LEADER}: {exc!r}") from None


async def read_entry(bucket: KeyValue, key: str = LEADER_KEY) -> tuple[LeaderRecord, int] | None:
    """The current record and its revision, or None when nobody holds the lease."""
    try:
        entry = await bucket.get(key)
    except nats.js.errors.KeyNotFoundError:  # also KeyDeletedError: a released lease
        return None
    if not entry.value or entry.revision is None:
        return None
    record = LeaderRecord.decode(entry.value)
    if record.term == 0:
        # The creating write: its revision is the term (later renewals carry it explicitly).
        record = dataclasses.replace(record, term=entry.revision)
    return record, entry.revision


async def read_leader(js_hub: JetStreamContext, key: str = LEADER_KEY) -> LeaderRecord | None:
    """Who leads the domain (or, with ``key``, one shard of it: cluster/state/cid_shards.py) now
    (None: nobody, or the bucket does not exist yet).

    For readers such as ``cim-place status``; it never creates the bucket. Raises
    TransportError when the hub cannot be reached.
    """
    try:
        bucket = await js_hub.key_value(kv.LEADER)
    except nats.js.errors.BucketNotFoundError:
        return None
    except nats.errors.Error as exc:
        raise TransportError(f"could not read the leader from {kv.LEADER}: {exc}") from exc
    return await leader_in(bucket, key)


async def leader_in(bucket: KeyValue, key: str = LEADER_KEY) -> LeaderRecord | None:
    """The record of whoever holds the lease (None: nobody); TransportError if unreadable."""
    try:
        found = await read_entry(bucket, key)
    except ValueError as exc:
        raise TransportError(f"{exc}; {_MALFORMED_HINT}") from exc
    except nats.errors.Error as exc:
        raise TransportError(f"could not read the leader from {kv.LEADER}: {exc}") from exc
    return None if found is None else found[0]

"""The KV buckets of a cim-place domain: their names, and creating them idempotently.

Every bucket lives in the hub's JetStream domain. Keeping the names here, in one module, means the
controller, the agents and the CLI can never disagree on where state is kept.
"""

from __future__ import annotations

import asyncio

import nats.errors
import nats.js.errors
from nats.js import api
from nats.js.client import JetStreamContext
from nats.js.kv import KeyValue

from cim_place.errors import TransportError

POLICIES = "cim-place-policies"
"""Replication policies: the applied set under one key (revision history kept)."""
NODES = "cim-place-nodes"
"""Node heartbeats: labels, tags, volumes, capacity, free bytes."""
NAMES = "cim-place-names"
"""Domain-wide names pointing at CIDs (history kept)."""
LOCATIONS = "cim-place-locations"
"""The domain summary and the layout of the locations; each CID's status (where it is held, per
volume and state) lives in one of the :data:`LOCATION_SHARDS` shard buckets."""
LEADER = "cim-place-leader"
"""The controller's leadership lease (bucket TTL; renewed with compare-and-set)."""
DRAIN = "cim-place-drain"
"""Nodes an operator asked to drain (``cim-place node drain``): key ``drain.<node>``."""
EVENT_SOURCES = "cim-place-event-sources"
"""The lock serialising changes to the event store's sources (bucket TTL 30 s; created by
cim_place.cluster.events.store only: created with other settings it would not work as a lock)."""
SETTINGS = "cim-place-settings"
"""Domain-wide settings, one key each (e.g. the comms offload threshold, cim_place.comms)."""

LOCATION_SHARDS = 16
"""How many buckets the per-CID statuses are spread over (see cim_place.cluster.state.locations)."""


def location_shard(index: int) -> str:
    """The name of shard ``index`` of the locations: ``cim-place-locations-07``."""
    return f"{LOCATIONS}-{index:02d}"


LOCATION_SHARD_BUCKETS = tuple(location_shard(i) for i in range(LOCATION_SHARDS))

ALL_BUCKETS = (POLICIES, NODES, NAMES, LOCATIONS, *LOCATION_SHARD_BUCKETS, LEADER)

MAX_HISTORY = 64
"""JetStream keeps at most 64 revisions per key in a KV bucket."""

DEFAULT_REPLICAS = 3
"""Replicas of a bucket created without an explicit count: a 3-server hub survives the loss of
one server with every bucket readable and writable; a standalone server gets 1."""
_NOT_CLUSTERED = 10074  # JetStream: "replicas > 1 not supported in non-clustered mode"


OPEN_ATTEMPTS = 4
"""Look-ups of a bucket tried before a timeout is an error: a hub cluster electing a new leader
for a bucket's stream (a member killed or restarted) leaves its API requests unanswered for a few
seconds, and a reader such as ``cim-place status`` should ride that out, not fail."""


async def open_bucket(js: JetStreamContext, name: str) -> KeyValue:
    """Open the existing KV bucket ``name``, retrying a timed-out look-up :data:`OPEN_ATTEMPTS`
    times. BucketNotFoundError and other NATS errors pass through unchanged."""
    for attempt in range(1, OPEN_ATTEMPTS + 1):
        try:
            return await js.key_value(name)
        except nats.errors.TimeoutError:
            if attempt == OPEN_ATTEMPTS:
                raise
            await asyncio.sleep(0.5 * attempt)
    raise AssertionError("unreachable")  # pragma: no cover


async def ensure_bucket(
    js: JetStreamContext,
    name: str,
    *,
    history: int = 1,
    ttl: float | None = None,
    replicas: int | None = None,
) -> KeyValue:
    """Return the KV bucket ``name``, creating it with ``history``, ``ttl``, ``replicas`` if absent.

    Idempotent and safe when several processes race to create the same bucket: an existing
    bucket is opened as it is (its configuration is not changed).
    """
    if not 1 <= history <= MAX_HISTORY:
        raise ValueError(f"KV history must be between 1 and {MAX_HISTORY}, got {history}")
    try:
        return await open_bucket(js, name)
    except nats.js.errors.BucketNotFoundError:
        pass
    except nats.errors.Error as exc:
        raise TransportError(f"could not open KV bucket {name}: {exc}") from exc
    config = api.KeyValueConfig(
        bucket=name, history=history, ttl=ttl, replicas=replicas or DEFAULT_REPLICAS
    )
    try:
        try:
            return await js.create_key_value(config=config)
        except nats.js.errors.APIError as error:
            if replicas is not None or error.err_code != _NOT_CLUSTERED:
                raise
            # A standalone hub server (`cim-place up`, development): one replica is all it has.
            config.replicas = 1
            return await js.create_key_value(config=config)
    except nats.js.errors.APIError as refused:
        # Another process may have created it between our look-up and our create (possibly with
        # a slightly different configuration): use the bucket that exists.
        try:
            return await js.key_value(name)
        except nats.errors.Error:
            raise TransportError(
                f"could not create KV bucket {name} with {config.replicas} replicas: {refused}"
            ) from refused
    except nats.errors.Error as exc:
        raise TransportError(f"could not create KV bucket {name}: {exc}") from exc

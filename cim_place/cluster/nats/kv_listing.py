"""Complete listings of a KV bucket: the latest value of every key, none missed.

nats-py's ``KeyValue.keys()`` and the end marker of ``watchall()`` decide that the current values
are all read when the watch consumer's pending count is zero and the client has handled nothing
yet. Through a leaf node on a loaded machine the server can have pushed every value already
(pending zero) before the first one is handled, so the listing ends empty while the bucket holds
keys: a CLI saw "no node 'leaf-2'; known nodes: none" seconds after listing three nodes.

Here a listing ends only when it is known to be complete: at the value the server says nothing
is pending after (its ``delta``), or when the consumer reports nothing pending and no more
delivered than was handled. A bucket with no values ends at once.
"""

from __future__ import annotations

import contextlib
import time

import nats.errors
from nats.js.kv import KV_DEL, KV_PURGE, KeyValue

from cim_place.errors import TransportError

_QUIET = 0.5
"""Seconds without a value after which the watch consumer is asked whether anything is left."""
STALL = 30.0
"""Seconds a listing may go without progress while the server still counts values pending."""


async def latest_entries(
    bucket: KeyValue, *, meta_only: bool = False, stall: float = STALL
) -> list[KeyValue.Entry]:
    """The latest entry of every key of ``bucket`` that is not deleted or purged, by key order
    of the stream. ``meta_only`` leaves the values out (keys and revisions only).

    TransportError when the hub cannot be read or the listing stalls for ``stall`` seconds with
    values still pending.
    """
    name = bucket._name
    try:
        if not (await bucket.status()).values:
            return []
        # Deletes included: the latest value of the last key may be a delete marker, and its
        # delta is the one that says the listing is complete.
        watcher = await bucket.watchall(meta_only=meta_only)
    except nats.errors.Error as exc:
        raise TransportError(f"cannot list KV {name}: {exc}") from exc
    entries: list[KeyValue.Entry] = []
    handled = 0
    last_progress = time.monotonic()
    try:
        while True:
            try:
                entry = await watcher.updates(timeout=_QUIET)  # type: ignore[no-untyped-call]
            except nats.errors.TimeoutError:
                entry = None
            if entry is not None:
                handled += 1
                last_progress = time.monotonic()
                if entry.operation not in (KV_DEL, KV_PURGE):
                    entries.append(entry)
                if entry.delta == 0:
                    return entries
                continue
            # nats-py's end marker, or a quiet moment: believe it only if the server agrees.
            assert watcher._sub is not None  # set by watchall
            info = await watcher._sub.consumer_info()
            if not info.num_pending and (info.delivered.consumer_seq or 0) <= handled:
                return entries
            if time.monotonic() - last_progress > stall:
                if not info.num_pending:
                    return entries  # what is left unhandled was a marker nats-py drops
                raise TransportError(
                    f"listing KV {name} stalled for {stall:.0f} s with {info.num_pending} "
                    "values pending; is the hub up? retry"
                )
    except nats.errors.Error as exc:
        raise TransportError(f"cannot list KV {name}: {exc}") from exc
    finally:
        # A consumer that cannot be stopped expires by itself (its inactive threshold).
        with contextlib.suppress(nats.errors.Error):
            await watcher.stop()  # type: ignore[no-untyped-call]


async def live_keys(bucket: KeyValue) -> list[str]:
    """Every key of ``bucket`` holding a value (not deleted or purged); empty for none."""
    return [entry.key for entry in await latest_entries(bucket, meta_only=True)]

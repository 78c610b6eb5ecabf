"""The domain-wide settings of comms, kept in the hub's KV bucket ``cim-place-settings``.

One setting so far: the **offload threshold**, key ``comms.offload-threshold``, a decimal number
of bytes (default 64 KiB). A bytes or text value of a message body longer than the threshold is
stored in the object store and travels as a CID link (``cim_place.comms.offload``).

Readers never create the bucket: a domain without it uses the defaults. Every client caches the
value for a short time (:class:`ThresholdCache`), so a change reaches all senders within that time,
and a sender cut off from the hub keeps using the last value it read.
"""

from __future__ import annotations

import logging
import time

import nats.errors
import nats.js.errors
from nats.js import JetStreamContext

from cim_place.cluster.nats.kv import SETTINGS, ensure_bucket
from cim_place.errors import CimPlaceError, TransportError

__all__ = [
    "DEFAULT_OFFLOAD_THRESHOLD",
    "OFFLOAD_THRESHOLD_KEY",
    "SettingsError",
    "ThresholdCache",
    "read_offload_threshold",
    "set_offload_threshold",
]

_log = logging.getLogger(__name__)

DEFAULT_OFFLOAD_THRESHOLD = 64 * 1024
"""Bytes; values longer than this are offloaded when the domain sets nothing else."""
OFFLOAD_THRESHOLD_KEY = "comms.offload-threshold"
_SETTINGS_HISTORY = 16
DEFAULT_REFRESH = 10.0
"""Seconds a client trusts the threshold it read before reading it again."""


class SettingsError(CimPlaceError):
    """A setting in ``cim-place-settings`` holds a value cim-place cannot use."""


def _parse_threshold(raw: bytes) -> int:
    text = raw.decode("ascii", errors="replace").strip()
    if not text.isdigit():
        raise SettingsError(
            f"KV {SETTINGS} key {OFFLOAD_THRESHOLD_KEY} holds {text!r}, not a number of bytes; "
            f"set it again with set_offload_threshold(js_hub, BYTES)"
        )
    return int(text)


async def read_offload_threshold(js_hub: JetStreamContext) -> int:
    """The domain's offload threshold in bytes (the default when the domain sets none).

    ``js_hub`` is JetStream of the hub's domain (``jetstream(nc, "hub")``, from any server).
    Raises TransportError when the hub cannot be asked, SettingsError for a malformed value.
    """
    try:
        kv = await js_hub.key_value(SETTINGS)
        entry = await kv.get(OFFLOAD_THRESHOLD_KEY)
    except (nats.js.errors.BucketNotFoundError, nats.js.errors.KeyNotFoundError):
        return DEFAULT_OFFLOAD_THRESHOLD
    except nats.errors.Error as error:
        raise TransportError(
            f"cannot read {OFFLOAD_THRESHOLD_KEY} from KV {SETTINGS}: {error or type(error)}; "
            "check that the hub (or this leaf's link to it) is up"
        ) from error
    return _parse_threshold(entry.value or b"")


async def set_offload_threshold(js_hub: JetStreamContext, threshold: int) -> int:
    """Set the domain's offload threshold (bytes, >= 0); returns the KV revision."""
    if threshold < 0:
        raise SettingsError(f"offload threshold must be >= 0 bytes, got {threshold}")
    kv = await ensure_bucket(js_hub, SETTINGS, history=_SETTINGS_HISTORY)
    try:
        return int(await kv.put(OFFLOAD_THRESHOLD_KEY, str(threshold).encode()))
    except nats.errors.Error as error:
        raise TransportError(
            f"cannot write {OFFLOAD_THRESHOLD_KEY} to KV {SETTINGS}: {error or type(error)}; "
            "check that the hub is up"
        ) from error


class ThresholdCache:
    """The offload threshold as one client sees it: read from KV, trusted for ``refresh`` s.

    ``fixed`` pins the value (no KV reads), for a client configured explicitly. When the hub
    cannot be read, the last value read (or the default) is used, and the failure is logged:
    a sender cut off from the hub keeps working.
    """

    def __init__(
        self,
        js_hub: JetStreamContext,
        *,
        refresh: float = DEFAULT_REFRESH,
        fixed: int | None = None,
    ) -> None:
        self._js = js_hub
        self.refresh = refresh
        self._value = DEFAULT_OFFLOAD_THRESHOLD if fixed is None else fixed
        self._fixed = fixed is not None
        self._read_at = -float("inf")

    def peek(self) -> int | None:
        """The threshold without waiting: None when it must be read from KV (see :meth:`get`)."""
        if self._fixed or time.monotonic() - self._read_at < self.refresh:
            return self._value
        return None

    async def get(self) -> int:
        if self._fixed:
            return self._value
        now = time.monotonic()
        if now - self._read_at < self.refresh:
            return self._value
        try:
            self._value = await read_offload_threshold(self._js)
        except CimPlaceError as error:
            _log.warning("using offload threshold %d bytes: %s", self._value, error)
        self._read_at = now
        return self._value

    def invalidate(self) -> None:
        """Read the setting again on the next :meth:`get` (after a change made here)."""
        self._read_at = -float("inf")

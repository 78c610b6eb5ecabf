"""Controller leadership: one active controller per domain, chosen through a lease in KV.

This module owns the election for the lease in bucket ``cim-place-leader`` (``kv.LEADER``): one
key, ``controller``, holding a ``LeaderRecord`` (who leads, from which host and address, since
when, and the term; the record and its reading are :mod:`cim_place.cluster.state.lease`). The
rules:

1. Expiry is decided by the server only: the bucket's TTL *is* the lease. A key that is not
   rewritten within the TTL disappears from the bucket, and only then can another controller
   ``create`` it (``create`` succeeds only when the key is absent or deleted).
2. The leader renews with compare-and-set (``update(key, value, last=revision)``) every
   ``renew_every`` seconds. A mismatch means another controller took the key: the leader is
   deposed at once.
3. A leader that has not renewed for ``lease - margin`` seconds, counted on its own monotonic
   clock from the moment it *sent* its last successful write, deposes itself even though it could
   not reach the hub to learn so. The server's TTL runs from when it *stored* that write, which
   is later, so the old leader always stops before the key can expire and a successor be elected.
   ``margin`` absorbs event-loop lag and clock-rate drift.
4. Deposition is synchronous: ``is_leader`` turns False and ``on_deposed()`` runs before the
   election does anything else, so the controller stops enqueuing tasks at once.
5. The term, the fencing token, is the KV revision of the winning ``create``. Revisions of a
   bucket only grow, so every takeover has a larger term (as long as the bucket is not deleted
   and recreated).

A bucket's TTL is fixed when the bucket is created. The first controller creates it with its
``lease``; a controller configured with another lease adopts the bucket's TTL (and says so in the
log). To change the lease, stop every controller and delete the bucket
(``nats kv rm cim-place-leader``); the next controller recreates it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
import uuid
from collections.abc import Callable

import nats.errors
import nats.js.errors
from nats.js.client import JetStreamContext
from nats.js.kv import KeyValue

from cim_place.cluster.nats import kv
from cim_place.cluster.state.lease import (
    DEFAULT_LEASE,
    LEADER_KEY,
    LeaderRecord,
    LeaseError,
    leader_in,
    read_entry,
)
from cim_place.errors import TransportError

# LEADER_KEY is named here too: the controller's shards import it with LeaderElection.
__all__ = ["LEADER_KEY", "LeaderElection"]

_log = logging.getLogger(__name__)

# Errors that mean "the hub did not answer in time": retried until the lease deadline.
_UNREACHABLE = (TimeoutError, nats.errors.Error, OSError, TransportError)


class LeaderElection:
    """Competes for the controller lease and keeps it while this process leads.

    Usage (the controller)::

        election = LeaderElection(js_hub, "controller-a", on_deposed=stop_enqueuing)
        await election.start()
        while True:
            term = await election.wait_elected()
            work = asyncio.create_task(run_as_leader(term))
            await election.wait_deposed()
            work.cancel()
        ...
        await election.stop()  # releases the lease: a standby takes over at its next try

    ``on_elected`` and ``on_deposed`` are plain (synchronous) callables so nothing can run between
    the change of ``is_leader`` and them; they must be quick and must not raise (errors are
    logged and ignored). ``on_elected`` runs after ``is_leader`` became True, ``on_deposed``
    after it became False.
    """

    def __init__(
        self,
        js_hub: JetStreamContext,
        identity: str,
        *,
        lease: float = DEFAULT_LEASE,
        renew_every: float | None = None,
        margin: float | None = None,
        poll_every: float | None = None,
        address: str = "",
        replicas: int = 1,
        on_elected: Callable[[], None] | None = None,
        on_deposed: Callable[[], None] | None = None,
        key: str = LEADER_KEY,
        may_campaign: Callable[[], bool] | None = None,
    ) -> None:
        """Prepare an election; nothing happens until ``start()``.

        ``lease``: seconds of the lease, the bucket's TTL when this call creates the bucket.
        ``renew_every``: seconds between renewals (default ``lease / 3``). ``margin``: how long
        before the lease's end a leader that could not renew deposes itself (default
        ``lease / 5``). ``poll_every``: how often a standby tries to take the lease (default
        ``renew_every``). ``address``: how to reach this controller (shown in the record).
        ``replicas``: the bucket's replicas when this call creates it; pass
        ``min(3, hub_size(nc))`` so the lease survives the loss of a hub server.
        ``key``: the lease's key (one per controller shard: ``cid_shards.shard_key``).
        ``may_campaign``: asked before each try for a free lease; False skips that try (a
        process already holding its share of the shards lets its peers take the others).
        """
        if not identity:
            raise ValueError("a leader election needs a non-empty identity")
        self._js = js_hub
        self.identity = identity
        self.address = address
        self.host = socket.gethostname()
        self._replicas = replicas
        self._requested_lease = lease
        self._explicit = (renew_every, margin, poll_every)
        self._set_timing(lease)
        self._on_elected = on_elected
        self._on_deposed = on_deposed
        self.key = key
        self._may_campaign = may_campaign
        # Distinguishes this process from an earlier one with the same identity, so a lease left
        # behind by our own unanswered write is recognised as ours (and released).
        self._instance = uuid.uuid4().hex
        self._bucket: KeyValue | None = None
        self._task: asyncio.Task[None] | None = None
        self._is_leader = False
        self._stopping = False
        self._term = 0
        self._revision = 0
        self._elected_at = 0.0
        self._lease_sent = 0.0  # monotonic time the last successful write was sent
        self._elected = asyncio.Event()
        self._nudged = asyncio.Event()
        self._deposed = asyncio.Event()
        self._deposed.set()
        self.deposed_reason = ""
        """Why this process last lost (or never had) the lease; empty before any loss."""

    def _set_timing(self, lease: float) -> None:
        renew_every, margin, poll_every = self._explicit
        self.lease = lease
        self.renew_every = renew_every if renew_every is not None else lease / 3
        self.margin = margin if margin is not None else lease / 5
        self.poll_every = poll_every if poll_every is not None else self.renew_every
        if lease <= 0 or self.margin <= 0 or self.renew_every <= 0 or self.poll_every <= 0:
            raise ValueError(
                f"lease ({lease}), renew_every ({self.renew_every}), margin ({self.margin}) and "
                f"poll_every ({self.poll_every}) must all be positive"
            )
        if self.renew_every >= lease - self.margin:
            raise ValueError(
                f"renew_every ({self.renew_every:g} s) must be shorter than lease - margin "
                f"({lease:g} - {self.margin:g} s), or a leader would lose its lease between two "
                "renewals; lower renew_every or margin, or raise the lease"
            )

    # -- what the controller reads ----------------------------------------------------------------
    @property
    def is_leader(self) -> bool:
        """True while this process holds the lease; turns False before anything else on loss."""
        return self._is_leader

    @property
    def term(self) -> int:
        """The fencing token of the current leadership (or of the last one; 0: never led)."""
        return self._term

    async def leader(self) -> LeaderRecord | None:
        """Who leads now, read from the lease key (None: nobody holds the lease)."""
        return await leader_in(await self._open_bucket(), self.key)

    async def wait_elected(self, timeout: float | None = None) -> int:
        """Wait until this process leads and return its term; TimeoutError after ``timeout``."""
        async with asyncio.timeout(timeout):
            await self._elected.wait()
        return self._term

    async def wait_deposed(self, timeout: float | None = None) -> None:
        """Wait until this process does not lead (returns at once if it does not lead now)."""
        async with asyncio.timeout(timeout):
            await self._deposed.wait()

    # -- lifecycle --------------------------------------------------------------------------------
    async def start(self) -> None:
        """Open (or create) the bucket, check its TTL, and compete for the lease in the background.

        Raises TransportError when the hub cannot be reached, LeaseError when the existing
        bucket cannot hold a lease (no TTL), ValueError when the bucket's TTL does not fit an
        explicitly configured ``renew_every``/``margin``.
        """
        if self._task is not None:
            return
        await self._open_bucket()
        self._stopping = False
        self._task = asyncio.create_task(self._run(), name=f"cim-place-leader-{self.identity}")

    async def stop(self, *, release: bool = True) -> None:
        """Stop competing; a leader is deposed first, then (``release``) frees the lease.

        Releasing deletes the key only if it still holds our last write, so a standby takes over
        at its next try instead of waiting for the TTL. ``release=False`` leaves the lease to
        expire, as a crashed process would.
        """
        self._stopping = True
        self._depose("this controller stopped")
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        bucket = self._bucket
        if release and bucket is not None:
            with contextlib.suppress(*_UNREACHABLE):
                async with asyncio.timeout(self.lease):
                    await self._release_if_ours(bucket)

    def nudge(self) -> None:
        """Try for the lease now rather than at the next poll (``may_campaign`` just turned
        True)."""
        self._nudged.set()

    async def resign(self, reason: str) -> None:
        """Give up the lease but keep competing (gated by ``may_campaign``): deposed first,
        then the key is deleted if it still holds our write, so a peer takes it at once."""
        if not self._is_leader:
            return
        self._depose(reason)
        bucket = self._bucket
        if bucket is not None:
            with contextlib.suppress(*_UNREACHABLE):
                async with asyncio.timeout(self.lease):
                    await self._release_if_ours(bucket)

    # -- the election -----------------------------------------------------------------------------
    async def _open_bucket(self) -> KeyValue:
        if self._bucket is not None:
            return self._bucket
        bucket = await kv.ensure_bucket(
            self._js, kv.LEADER, history=1, ttl=self._requested_lease, replicas=self._replicas
        )
        try:
            ttl = (await bucket.status()).ttl
        except nats.errors.Error as exc:
            raise TransportError(f"could not read the settings of {kv.LEADER}: {exc}") from exc
        if not ttl:
            raise LeaseError(
                f"KV bucket {kv.LEADER} has no TTL, so a lease would never expire and a crashed "
                "leader would never be replaced; stop every controller, delete the bucket "
                f"(`nats kv rm {kv.LEADER}`) and start a controller to recreate it"
            )
        if abs(ttl - self.lease) > 1e-3:
            _log.warning(
                "KV bucket %s has a TTL of %g s, not the configured lease of %g s: a bucket's TTL "
                "is fixed at creation, so the lease is %g s; to change it stop every controller "
                "and delete the bucket",
                kv.LEADER,
                ttl,
                self.lease,
                ttl,
            )
            self._set_timing(ttl)
        self._bucket = bucket
        return bucket

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while not self._stopping:
                elected = False
                try:
                    if self._may_campaign is None or self._may_campaign():
                        elected = await self._try_acquire()
                except _UNREACHABLE as exc:
                    _log.debug("%s: could not try for the lease: %s", self.identity, exc)
                    if isinstance(exc, nats.js.errors.APIError):
                        # The bucket may have been deleted: open (or recreate) it next round.
                        self._bucket = None
                except Exception:
                    # The election must outlive one bad round (a malformed record, say).
                    _log.exception("%s: leader election round failed", self.identity)
                if elected:
                    await self._lead(loop)
                    continue  # deposed: stand by (one try at once; the key is usually taken)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.poll_every):
                        await self._nudged.wait()
                self._nudged.clear()
        finally:
            # However the task ends (stop, cancellation, a bug), it no longer maintains the lease.
            self._depose("the election stopped running")

    async def _try_acquire(self) -> bool:
        """One attempt to take the lease; True when this process now leads."""
        bucket = await self._open_bucket()
        loop = asyncio.get_running_loop()
        now = time.time()
        record = self._record(term=0, elected_at=now, renewed_at=now)
        sent = loop.time()
        try:
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow a cancellation
            # (stop()) that races with the create's answer, and the stopped task would lead on.
            async with asyncio.timeout(self.lease - self.margin):
                revision = await bucket.create(self.key, record.encode())
        except nats.js.errors.KeyWrongLastSequenceError:
            # Held by someone. If it is our own write whose answer never reached us, free it
            # (it would otherwise block everyone until the TTL) and try again at once.
            if await self._release_if_ours(bucket):
                return await self._try_acquire()
            return False
        except nats.js.errors.KeyNotFoundError:
            return False  # expired between create's failure and its look-up: try next round
        self._revision = revision
        self._term = revision
        self._elected_at = now
        self._lease_sent = sent
        if self._stopping:
            return False  # stop() releases this write
        self._elect()
        return True

    async def _lead(self, loop: asyncio.AbstractEventLoop) -> None:
        """Renew the lease until deposed. The first renewal writes the term into the record."""
        next_renewal = loop.time()
        while self._is_leader and not self._stopping:
            await asyncio.sleep(max(0.0, next_renewal - loop.time()))
            if await self._renew(loop):
                next_renewal = self._lease_sent + self.renew_every
            else:
                deadline = self._lease_sent + self.lease - self.margin
                retry = min(self.renew_every / 4, 0.5)
                next_renewal = min(loop.time() + retry, deadline)

    async def _renew(self, loop: asyncio.AbstractEventLoop) -> bool:
        """One compare-and-set renewal; deposes on a mismatch or once the deadline has passed."""
        deadline = self._lease_sent + self.lease - self.margin
        remaining = deadline - loop.time()
        if remaining <= 0:
            self._depose(
                f"the lease was not renewed for {self.lease - self.margin:g} s "
                "(the hub was unreachable or too slow)"
            )
            return False
        record = self._record(term=self._term, elected_at=self._elected_at, renewed_at=time.time())
        sent = loop.time()
        bucket = await self._open_bucket()
        try:
            async with asyncio.timeout(remaining):
                revision = await bucket.update(self.key, record.encode(), last=self._revision)
        except nats.js.errors.KeyWrongLastSequenceError:
            self._depose("the lease key was overwritten (another controller holds it)")
            return False
        except _UNREACHABLE as exc:
            if loop.time() >= deadline:
                self._depose(f"the lease could not be renewed in time: {exc or type(exc).__name__}")
            else:
                _log.debug("%s: renewal failed, retrying: %s", self.identity, exc)
            return False
        self._revision = revision
        self._lease_sent = sent
        return True

    def _record(self, *, term: int, elected_at: float, renewed_at: float) -> LeaderRecord:
        return LeaderRecord(
            leader_id=self.identity,
            host=self.host,
            address=self.address,
            instance=self._instance,
            term=term,
            elected_at=elected_at,
            renewed_at=renewed_at,
        )

    async def _release_if_ours(self, bucket: KeyValue) -> bool:
        """Delete the lease key if it holds a write of this process; True if deleted."""
        try:
            found = await read_entry(bucket, self.key)
        except ValueError:
            return False
        if found is None or found[0].instance != self._instance:
            return False
        try:
            await bucket.delete(self.key, last=found[1])
        except nats.errors.Error as exc:
            # Someone wrote in between: the lease is theirs now.
            _log.debug("%s: lease not released: %s", self.identity, exc)
            return False
        return True

    def _elect(self) -> None:
        self._is_leader = True
        self._deposed.clear()
        what = "the domain" if self.key == LEADER_KEY else self.key
        _log.info("%s leads %s (term %d)", self.identity, what, self._term)
        self._call(self._on_elected, "on_elected")
        self._elected.set()

    def _depose(self, reason: str) -> None:
        if not self._is_leader:
            return
        # First of all: nothing may act as leader after this line.
        self._is_leader = False
        self._elected.clear()
        self.deposed_reason = reason
        what = "" if self.key == LEADER_KEY else f" {self.key}"
        _log.warning("%s no longer leads%s (term %d): %s", self.identity, what, self._term, reason)
        self._call(self._on_deposed, "on_deposed")
        self._deposed.set()

    def _call(self, callback: Callable[[], None] | None, what: str) -> None:
        if callback is None:
            return
        try:
            callback()
        except Exception:
            _log.exception("%s: %s callback failed", self.identity, what)

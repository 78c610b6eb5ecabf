"""Rate limits for block transfers: a token bucket (pure arithmetic over a clock reading) and
the awaitable limits built on it that fetches share.

:class:`TokenBucket` owns the arithmetic: ``reserve(amount, now)`` takes ``amount`` tokens at
once, going into debt when there are not enough, and returns how long the caller must wait for
the debt to be paid at ``rate`` tokens per second. Reserving up front (instead of waiting for
tokens to appear) keeps concurrent callers in order and lets a block larger than the burst pass
without special cases: its caller simply waits longer.

:class:`BandwidthLimit` is one bucket on the monotonic clock with ``await take(n)``; an agent
shares one between its fetches (the agent-wide ``tasks.bandwidth``) and one per repair limit
(a policy's ``repair.bandwidth``). :func:`combined` makes one limit that waits for all of them.

The burst is small on purpose (about 50 ms of traffic): a limit is promised over any transfer,
and a bucket that starts with a whole second of tokens lets a short transfer run at twice the
limit.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from typing import Protocol

__all__ = ["BandwidthLimit", "Throttle", "TokenBucket", "combined", "default_burst"]

_MIN_BURST = 64 * 1024


def default_burst(rate: float) -> float:
    """About 50 ms of traffic at ``rate``, at least 64 KiB."""
    return max(float(_MIN_BURST), rate / 20.0)


class TokenBucket:
    """``rate`` tokens per second up to ``burst``; the bucket starts full."""

    def __init__(self, rate: float, *, burst: float | None = None, now: float = 0.0) -> None:
        if not rate > 0 or rate == float("inf"):
            raise ValueError(f"a rate limit must be a positive number of bytes/s, not {rate}")
        self.rate = float(rate)
        self.burst = float(burst if burst is not None else default_burst(self.rate))
        if not self.burst > 0:
            raise ValueError(f"a burst must be positive, not {burst}")
        self.tokens = self.burst
        self.stamp = now

    def reserve(self, amount: int, now: float) -> float:
        """Take ``amount`` tokens; the seconds to wait before using them (0: at once)."""
        if now > self.stamp:
            self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now
        self.tokens -= amount
        return 0.0 if self.tokens >= 0 else -self.tokens / self.rate


class Throttle(Protocol):
    """What a fetch needs of a limit: wait until ``amount`` bytes may pass."""

    @property
    def rate(self) -> float: ...

    async def take(self, amount: int) -> None: ...


class BandwidthLimit:
    """A token bucket on the monotonic clock: ``await limit.take(n)`` returns once ``n`` bytes
    fit in ``rate`` bytes/s. Shareable between concurrent fetches so that their sum respects
    the limit."""

    def __init__(
        self,
        rate: float,
        *,
        burst: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._clock = clock
        self.bucket = TokenBucket(rate, burst=burst, now=clock())

    @property
    def rate(self) -> float:
        return self.bucket.rate

    def reserve(self, amount: int) -> float:
        return self.bucket.reserve(amount, self._clock())

    async def take(self, amount: int) -> None:
        wait = self.reserve(amount)
        if wait > 0:
            await asyncio.sleep(wait)


class _Combined:
    """Several limits at once: a transfer waits for the slowest of them."""

    def __init__(self, limits: Sequence[BandwidthLimit]) -> None:
        self.limits = tuple(limits)

    @property
    def rate(self) -> float:
        return min(limit.rate for limit in self.limits)

    async def take(self, amount: int) -> None:
        wait = max(limit.reserve(amount) for limit in self.limits)
        if wait > 0:
            await asyncio.sleep(wait)


def combined(*limits: BandwidthLimit | None) -> Throttle | None:
    """One throttle respecting every given limit (None entries ignored; None when none)."""
    present = [limit for limit in limits if limit is not None]
    if not present:
        return None
    if len(present) == 1:
        return present[0]
    return _Combined(present)

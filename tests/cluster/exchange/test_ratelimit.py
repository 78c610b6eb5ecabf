"""The token bucket behind fetch rate limits: pure arithmetic on a given clock."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cim_place.cluster.exchange.ratelimit import BandwidthLimit, TokenBucket, combined

MiB = 1 << 20


def test_a_full_bucket_lets_the_burst_pass_then_charges_the_rate() -> None:
    bucket = TokenBucket(MiB, burst=100, now=0.0)
    assert bucket.reserve(100, 0.0) == 0.0
    assert bucket.reserve(MiB, 0.0) == pytest.approx(1.0)
    # The next caller queues behind the debt.
    assert bucket.reserve(MiB // 2, 0.0) == pytest.approx(1.5)
    # Time pays the debt back.
    assert bucket.reserve(0, 1.5) == pytest.approx(0.0)


def test_refill_never_exceeds_the_burst() -> None:
    bucket = TokenBucket(1000, burst=500, now=0.0)
    assert bucket.reserve(500, 100.0) == 0.0
    assert bucket.reserve(1000, 100.0) == pytest.approx(1.0)


@pytest.mark.parametrize("rate", [0, -1, float("inf"), float("nan")])
def test_a_rate_must_be_positive_and_finite(rate: float) -> None:
    with pytest.raises(ValueError, match="positive number of bytes/s"):
        TokenBucket(rate)


@given(
    rate=st.integers(1024, 100 * MiB),
    sizes=st.lists(st.integers(1, 4 * MiB), min_size=1, max_size=50),
)
def test_back_to_back_transfers_take_their_bytes_over_the_rate(rate: int, sizes: list[int]) -> None:
    """Callers that start as soon as they are allowed finish the whole transfer no sooner than
    (bytes - burst) / rate: the limit holds over any transfer, whatever the block sizes."""
    bucket = TokenBucket(rate, now=0.0)
    clock = 0.0
    for size in sizes:
        clock += bucket.reserve(size, clock)
    total = sum(sizes)
    assert clock == pytest.approx(max(0.0, (total - bucket.burst) / rate), rel=1e-9, abs=1e-9)


async def test_combined_limits_wait_for_the_slowest() -> None:
    now = [0.0]
    fast = BandwidthLimit(10 * MiB, burst=1, clock=lambda: now[0])
    slow = BandwidthLimit(MiB, burst=1, clock=lambda: now[0])
    both = combined(fast, None, slow)
    assert both is not None and both.rate == MiB
    assert combined(None, slow) is slow
    assert combined(None) is None
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    original = asyncio.sleep
    asyncio.sleep = sleep  # type: ignore[assignment]
    try:
        await both.take(1 + MiB // 100)
    finally:
        asyncio.sleep = original
    assert slept == [pytest.approx(MiB // 100 / MiB)]  # the slow limit's wait, not the fast one's

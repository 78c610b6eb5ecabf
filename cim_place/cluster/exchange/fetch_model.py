"""What a fetch is given and what it returns: holders, nearness, per-holder stats, the result.

This module owns the vocabulary of :func:`cim_place.cluster.exchange.fetch.fetch_dag` that its
callers use: a ``Holder`` and the ``Labels`` of the fetching node, the nearest-first order of
holders (``order_holders``), what each holder did (``HolderStats``), the ``FetchResult``, the
``BlockUnavailableError`` a fetch raises when no holder is left, and ``request_timeout``, the
wait per reply derived from the heartbeat grace.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from cim_place.errors import TransportError
from cim_place.objectstore.cid import Cid, to_str

__all__ = [
    "MIN_TIMEOUT",
    "BlockUnavailableError",
    "FetchResult",
    "Holder",
    "HolderStats",
    "Labels",
    "order_holders",
    "proximity",
    "request_timeout",
]

MIN_TIMEOUT = 3.0
"""The shortest wait for a reply :func:`request_timeout` gives: below it a busy but live holder
(a loaded machine, a large block) would be taken for a dead one."""


def request_timeout(grace: float) -> float:
    """The wait for each reply that lets a fetch leave a holder that stopped answering within
    ``grace`` seconds (the heartbeat grace, :func:`cim_place.cluster.state.nodes.heartbeat_grace`).

    A dead holder costs a fetch at most two waits: its stream grant request, then the NATS
    request of the same batch. After that first failure the fetch asks the other holders for
    everything (a holder with failed requests is asked again only when no other is left), so
    the transfer goes on elsewhere. Hence half the grace, but never below ``MIN_TIMEOUT``.
    """
    return max(MIN_TIMEOUT, grace / 2)


class BlockUnavailableError(TransportError):
    """No holder could supply a block of the DAG being fetched."""

    def __init__(self, cid: Cid, root: Cid, tried: Sequence[str]) -> None:
        self.cid = cid
        self.root = root
        self.tried = list(tried)
        who = ", ".join(self.tried) if self.tried else "none (no usable holder was given)"
        super().__init__(
            f"block {to_str(cid)} of {to_str(root)} is not available from any holder "
            f"(tried: {who}); check that a holder's agent is running and still has it "
            "(`cim-place status`), then fetch again: blocks already fetched are kept"
        )


@dataclass(frozen=True, slots=True)
class Labels:
    """Where a node is: its failure-domain labels (empty: unknown)."""

    region: str = ""
    zone: str = ""
    host: str = ""


@dataclass(frozen=True, slots=True)
class Holder:
    """A node that holds the DAG (or part of it) and serves it on ``block_get(node)``."""

    node: str
    region: str = ""
    zone: str = ""
    host: str = ""


@dataclass(slots=True)
class HolderStats:
    """What one holder did during a fetch."""

    blocks: int = 0
    bytes: int = 0
    requests: int = 0
    missing: int = 0
    """CIDs it answered as missing."""
    corrupt: int = 0
    """Blocks it sent whose bytes did not match their CID (it is then skipped)."""
    failures: int = 0
    """Requests that timed out, lost messages, or were refused."""
    skipped: bool = False
    """True when the holder was dropped for the rest of the fetch."""
    reason: str = ""
    """Why it was skipped; while it is not, why its last request failed ("" when none did)."""
    stream_blocks: int = 0
    """Of ``blocks``, those that came over the holder's block stream (the rest over NATS)."""
    stream_bytes: int = 0
    fallbacks: int = 0
    """1 when this holder's blocks went over NATS although streams were wanted: it offered no
    stream, the connection failed, or it broke mid-way (``fallback`` says why)."""
    fallback: str = ""


@dataclass(slots=True)
class FetchResult:
    """The outcome of a complete fetch: every block below ``root`` is now in the store."""

    root: Cid
    blocks_fetched: int = 0
    bytes_fetched: int = 0
    blocks_present: int = 0
    """Blocks that were already in the store (not fetched again)."""
    holders: dict[str, HolderStats] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def corrupt_holders(self) -> list[str]:
        """Holders that served at least one mismatching block."""
        return [node for node, stats in self.holders.items() if stats.corrupt]


def proximity(holder: Holder, near: Labels | None) -> int:
    """0 same host, 1 same zone, 2 same region, 3 anything else (or no local labels).

    Labels are compared as paths, as placement does: a zone is named within its region and a
    host within its zone; a missing region or zone is the unnamed one (""), a missing host is a
    host of its own, so it is never "the same host".
    """
    if near is None:
        return 3
    if holder.region != near.region:
        return 3
    if holder.zone != near.zone:
        return 2
    if not near.host or holder.host != near.host:
        return 1
    return 0


def order_holders(holders: Sequence[Holder], near: Labels | None) -> list[list[Holder]]:
    """Holders grouped in tiers, nearest tier first; duplicates (same node) removed.

    Inside a tier the order is the given one; fetch rotates over a tier to spread the load.
    """
    tiers: dict[int, list[Holder]] = {}
    seen: set[str] = set()
    for holder in holders:
        if holder.node in seen:
            continue
        seen.add(holder.node)
        tiers.setdefault(proximity(holder, near), []).append(holder)
    return [tiers[rank] for rank in sorted(tiers)]

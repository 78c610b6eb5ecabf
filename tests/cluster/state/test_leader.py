"""Controller leader election through the KV lease, against real nats-servers.

Speed is never asserted: each test checks order and eventuality with generous timeouts, and a
sampler checks, every few milliseconds, that two elections never lead at the same time.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import pytest
from nats.aio.client import Client

from cim_place.cluster.nats import kv
from cim_place.cluster.nats.connection import connect, jetstream
from cim_place.cluster.state.leader import LeaderElection
from cim_place.cluster.state.lease import LEADER_KEY, LeaderRecord, LeaseError, read_leader
from cim_place.local.topologies import Hub

LEASE = 2.0
# Generous bounds for eventualities: far above what any of them takes, never a speed claim.
PATIENCE = 60.0


@dataclass
class Contender:
    """One controller: its own client connection and election, and what happened to it."""

    nc: Client
    election: LeaderElection
    log: list[str] = field(default_factory=list)


class Arena:
    """Starts contenders (one client each), samples their leadership, and cleans up."""

    def __init__(self) -> None:
        self.contenders: list[Contender] = []
        self.transitions: list[str] = []
        self.max_leaders = 0
        self.samples = 0
        self._sampler: asyncio.Task[None] | None = None

    async def add(
        self,
        name: str,
        servers: str | list[str],
        *,
        lease: float = LEASE,
        replicas: int = 1,
        start: bool = True,
    ) -> Contender:
        nc = await connect(servers, name=name, for_service=True)
        transitions = self.transitions

        def elected() -> None:
            transitions.append(f"{name}+")
            # The exact moment that matters: nobody else may lead when someone is elected.
            self.max_leaders = max(self.max_leaders, len(self.leaders()))

        def deposed() -> None:
            transitions.append(f"{name}-")

        election = LeaderElection(
            jetstream(nc, "hub"),
            name,
            lease=lease,
            replicas=replicas,
            address=f"test://{name}",
            on_elected=elected,
            on_deposed=deposed,
        )
        contender = Contender(nc, election)
        self.contenders.append(contender)
        if start:
            await election.start()
        if self._sampler is None:
            self._sampler = asyncio.create_task(self._sample())
        return contender

    async def _sample(self) -> None:
        while True:
            leading = sum(c.election.is_leader for c in self.contenders)
            self.max_leaders = max(self.max_leaders, leading)
            self.samples += 1
            await asyncio.sleep(0.005)

    def leaders(self) -> list[Contender]:
        return [c for c in self.contenders if c.election.is_leader]

    async def wait_leader(self, among: list[Contender] | None = None) -> Contender:
        """Wait until one of ``among`` (default: all) leads, and return it."""
        pool = among if among is not None else self.contenders
        waits = {asyncio.ensure_future(c.election.wait_elected()): c for c in pool}
        try:
            done, _ = await asyncio.wait(
                waits, timeout=PATIENCE, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            for waiter in waits:
                waiter.cancel()
        assert done, f"no leader among {[c.election.identity for c in pool]}"
        return waits[done.pop()]

    async def close(self) -> None:
        if self._sampler is not None:
            self._sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sampler
        for contender in self.contenders:
            with contextlib.suppress(Exception):
                await contender.election.stop()
            with contextlib.suppress(Exception):
                await contender.nc.close()


@pytest.fixture
async def arena() -> AsyncIterator[Arena]:
    ring = Arena()
    try:
        yield ring
    finally:
        await ring.close()


async def eventually(check: Callable[[], bool], what: str) -> None:
    for _ in range(int(PATIENCE / 0.02)):
        if check():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"not within {PATIENCE:.0f} s: {what}")


async def hold(seconds: float) -> None:
    """Let the elections run (renewals, standby polls) while the sampler watches."""
    await asyncio.sleep(seconds)


# -- configuration --------------------------------------------------------------------------------


def test_renewal_must_fit_inside_the_lease() -> None:
    with pytest.raises(ValueError, match="renew_every"):
        LeaderElection(None, "c", lease=3.0, renew_every=3.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="non-empty identity"):
        LeaderElection(None, "")  # type: ignore[arg-type]


def test_record_round_trips_and_rejects_garbage() -> None:
    record = LeaderRecord("c1", "host", "addr", "abc", 7, 1.5, 2.5)
    assert LeaderRecord.decode(record.encode()) == record
    with pytest.raises(ValueError, match=kv.LEADER):
        LeaderRecord.decode(b"{not json")


async def test_an_existing_bucket_ttl_is_the_lease(hub1: Hub, arena: Arena) -> None:
    nc = await connect(hub1.url)
    try:
        await kv.ensure_bucket(jetstream(nc, "hub"), kv.LEADER, ttl=3.0)
    finally:
        await nc.close()
    contender = await arena.add("c1", hub1.url, lease=9.0)
    assert contender.election.lease == pytest.approx(3.0)
    assert contender.election.renew_every == pytest.approx(1.0)
    await arena.wait_leader()


async def test_a_bucket_without_ttl_cannot_hold_a_lease(hub1: Hub, arena: Arena) -> None:
    nc = await connect(hub1.url)
    try:
        await kv.ensure_bucket(jetstream(nc, "hub"), kv.LEADER)
    finally:
        await nc.close()
    contender = await arena.add("c1", hub1.url, start=False)
    with pytest.raises(LeaseError, match="no TTL"):
        await contender.election.start()


# -- elections on a 1-server hub ------------------------------------------------------------------


async def test_two_contenders_elect_exactly_one_leader(hub1: Hub, arena: Arena) -> None:
    a = await arena.add("a", hub1.url)
    b = await arena.add("b", hub1.url)
    winner = await arena.wait_leader()
    loser = b if winner is a else a
    # Several renewals and standby polls: the leadership stays where it is.
    await hold(3 * LEASE)
    assert winner.election.is_leader
    assert not loser.election.is_leader
    assert arena.max_leaders == 1
    assert arena.samples > 10
    for view in (await winner.election.leader(), await loser.election.leader()):
        assert view is not None
        assert view.leader_id == winner.election.identity
        assert view.term == winner.election.term
        assert view.address == f"test://{winner.election.identity}"
    nc = await connect(hub1.url)
    try:
        seen = await read_leader(jetstream(nc, "hub"))
    finally:
        await nc.close()
    assert seen is not None and seen.leader_id == winner.election.identity


async def test_a_graceful_stop_hands_over_to_the_standby(hub1: Hub, arena: Arena) -> None:
    a = await arena.add("a", hub1.url)
    b = await arena.add("b", hub1.url)
    first = await arena.wait_leader()
    second = b if first is a else a
    first_term = first.election.term
    await first.election.stop()
    assert not first.election.is_leader
    await second.election.wait_elected(PATIENCE)
    assert second.election.term > first_term
    assert arena.max_leaders == 1
    name1, name2 = first.election.identity, second.election.identity
    assert arena.transitions == [f"{name1}+", f"{name1}-", f"{name2}+"]
    view = await second.election.leader()
    assert view is not None and view.leader_id == name2


async def test_a_crashed_leader_is_replaced_after_its_lease_expires(
    hub1: Hub, arena: Arena
) -> None:
    a = await arena.add("a", hub1.url)
    b = await arena.add("b", hub1.url)
    first = await arena.wait_leader()
    second = b if first is a else a
    first_term = first.election.term
    # A crash: the lease is not released, so only the bucket's TTL frees it.
    await first.election.stop(release=False)
    await second.election.wait_elected(PATIENCE)
    assert second.election.term > first_term
    assert arena.max_leaders == 1


async def test_a_leader_cut_off_from_the_hub_deposes_itself_before_a_successor_leads(
    hub1: Hub, arena: Arena
) -> None:
    a = await arena.add("a", hub1.url)
    b = await arena.add("b", hub1.url)
    first = await arena.wait_leader()
    second = b if first is a else a
    first_term = first.election.term
    # Its connection is gone, its election loop still runs: it cannot renew, so it must give up
    # on its own, before the server lets the standby take the lease.
    await first.nc.close()
    await first.election.wait_deposed(PATIENCE)
    await second.election.wait_elected(PATIENCE)
    assert "renew" in first.election.deposed_reason
    assert second.election.term > first_term
    assert arena.max_leaders == 1
    name1, name2 = first.election.identity, second.election.identity
    assert arena.transitions == [f"{name1}+", f"{name1}-", f"{name2}+"]


async def test_an_overwritten_lease_deposes_the_leader(hub1: Hub, arena: Arena) -> None:
    a = await arena.add("a", hub1.url)
    first_term = (await arena.wait_leader()).election.term
    intruder = LeaderRecord("intruder", "elsewhere", "", "other-instance", 10**9, 0.0, 0.0)
    bucket = await jetstream(a.nc, "hub").key_value(kv.LEADER)
    await bucket.put(LEADER_KEY, intruder.encode())
    await a.election.wait_deposed(PATIENCE)
    assert arena.transitions == ["a+", "a-"]
    assert "overwritten" in a.election.deposed_reason
    view = await a.election.leader()
    assert view is not None and view.leader_id == "intruder"
    # The intruder never renews: its write expires by TTL and the election leads again.
    await a.election.wait_elected(PATIENCE)
    assert a.election.term > first_term
    assert arena.transitions == ["a+", "a-", "a+"]


async def test_terms_strictly_increase_across_takeovers(hub1: Hub, arena: Arena) -> None:
    terms: list[int] = []
    standing = [await arena.add("c0", hub1.url), await arena.add("c1", hub1.url)]
    for round_ in range(2, 6):
        leader = await arena.wait_leader(standing)
        terms.append(leader.election.term)
        standing.remove(leader)
        standing.append(await arena.add(f"c{round_}", hub1.url))
        # Alternate graceful stops and crashes.
        await leader.election.stop(release=round_ % 2 == 0)
    terms.append((await arena.wait_leader(standing)).election.term)
    assert terms == sorted(set(terms)), terms
    assert arena.max_leaders == 1


# -- a 3-server hub losing the leader's server ----------------------------------------------------


async def test_losing_the_leaders_hub_server_never_makes_two_leaders(
    hub: Hub, arena: Arena
) -> None:
    lease = 4.0
    a = await arena.add("a", hub.urls, lease=lease, replicas=3)
    leader = await arena.wait_leader()
    url = leader.nc.connected_url
    assert url is not None
    lost = next(s for s in hub.servers if s.port == url.port)
    others = [s.url for s in hub.servers if s is not lost]
    b = await arena.add("b", others, lease=lease, replicas=3)
    await hold(lease)
    assert a.election.is_leader and not b.election.is_leader
    term = a.election.term

    await asyncio.to_thread(lost.stop)
    # Whatever the timing of the client's failover and the bucket's new stream leader: after the
    # dust settles exactly one contender leads, and a takeover has a larger term.
    await eventually(
        lambda: len(arena.leaders()) == 1 and not a.nc.is_reconnecting,
        "one leader after losing a hub server",
    )
    await hold(2 * lease)
    leaders = arena.leaders()
    assert len(leaders) == 1
    if leaders[0] is b or "a-" in arena.transitions:
        assert leaders[0].election.term > term
    assert arena.max_leaders == 1
    view = await b.election.leader()
    assert view is not None and view.leader_id == leaders[0].election.identity

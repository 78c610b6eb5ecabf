"""A local domain with a 3-server hub (``up --hub-servers 3``): every member is a supervised
process listed in the domain's processes, and one of them killed (SIGKILL) while adds run costs
nothing: adds go on once JetStream has elected new leaders, and the events the leaves buffered
in their outboxes meanwhile arrive in ``CIM_PLACE_EVENTS`` exactly once.

The member killed is the one leading the event store (the worst case: the stream must elect a new
leader before any sourced event lands). It is held down for a while, so that events buffer, then
released: the supervisor restarts it and it rejoins its cluster.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import signal
import time
from collections import Counter
from pathlib import Path

import pytest

from cim_place.cluster.events.readers import EventReader
from cim_place.cluster.events.types import EventBodyError, ObjectStored, parse_event
from cim_place.cluster.exchange.fetch import wait_for_holder
from cim_place.cluster.exchange.upload_client import upload
from cim_place.cluster.nats.connection import connected, jetstream
from cim_place.cluster.nats.envelope import EnvelopeError
from cim_place.cluster.nats.subjects import EVENTS_STREAM, HUB_DOMAIN
from cim_place.cluster.state.locations import LocationStore
from cim_place.errors import TransportError
from cim_place.local.credentials import ADMIN
from cim_place.local.domain import LocalDomain
from cim_place.objectstore import cid as cids
from cim_place.objectstore.testdata import chacha_stream
from cim_place.placement.status import ObjectStatus
from cim_place.testing import until

pytestmark = [pytest.mark.nats, pytest.mark.chaos, pytest.mark.timeout(900)]

ADD_TIMEOUT = 60.0


async def test_a_hub_server_killed_during_adds(tmp_path: Path) -> None:
    domain = LocalDomain(
        tmp_path / "domain", leaves=3, zones=3, heartbeat=1.0, hub_servers=3, http_listen=None
    )
    await domain.start()
    tasks: list[asyncio.Task[None]] = []
    try:
        hubs = [p for p in domain.processes() if p["role"] == "hub"]
        assert [p["node"] for p in hubs] == ["hub-1", "hub-2", "hub-3"]
        assert all(isinstance(p["pid"], int) for p in hubs)
        assert len(domain.hub_urls.split(",")) == 3

        stored: Counter[tuple[str, str]] = Counter()
        ids: Counter[str] = Counter()

        async with connected(domain.credentials.url(ADMIN, domain.hub_urls)) as nc:
            js = jetstream(nc, HUB_DOMAIN)
            info = await js.stream_info(EVENTS_STREAM)
            assert info.config.num_replicas == 3
            acked: list[tuple[float, str, str]] = []  # (when, cid, node)
            failed: list[str] = []

            async def add(number: int) -> None:
                node = domain.node_ids()[number % 3]
                data = chacha_stream(f"hub-kill-{number}", 64 * 1024).read()
                try:
                    async with asyncio.timeout(ADD_TIMEOUT):
                        assert await wait_for_holder(nc, node, timeout=30)
                        result = await upload(nc, node, io.BytesIO(data), name=None, owner="")
                except TimeoutError:
                    raise AssertionError(f"add #{number} hung past {ADD_TIMEOUT:.0f} s") from None
                except Exception as exc:
                    failed.append(f"add #{number} on {node}: {exc}")
                    return
                acked.append((time.monotonic(), result.cid_text, node))

            async def adds(stop: asyncio.Event) -> None:
                number = 0
                while not stop.is_set():
                    await add(number)
                    number += 1
                    await asyncio.sleep(0.1)

            for number in range(1000, 1006):
                await add(number)
            stop = asyncio.Event()
            tasks.append(asyncio.create_task(adds(stop)))
            await until(lambda: len(acked) >= 9, "adds before the kill", 120)

            # Kill the member leading the event store, and keep it down while adds go on.
            leader = (await js.stream_info(EVENTS_STREAM)).cluster
            assert leader is not None and leader.leader
            victim = next(
                s for s in domain.supervisor.children if s.role == "hub" and s.node == leader.leader
            )
            victim.held = True
            old_pid = victim.child.pid
            assert old_pid is not None
            os.kill(old_pid, signal.SIGKILL)
            killed_at = time.monotonic()

            async def new_leader() -> str:
                while True:
                    with contextlib.suppress(Exception):
                        cluster = (await js.stream_info(EVENTS_STREAM)).cluster
                        if cluster is not None and cluster.leader not in (None, leader.leader):
                            return cluster.leader
                    await asyncio.sleep(0.2)

            async with asyncio.timeout(120):
                elected = await new_leader()
            reelected = time.monotonic() - killed_at
            await until(
                lambda: sum(1 for when, _, _ in acked if when > killed_at + reelected) >= 6,
                "adds acknowledged after the re-election",
                240,
            )
            victim.held = False  # the supervisor restarts it; it rejoins the cluster
            await until(
                lambda: (
                    victim.child.pid not in (None, old_pid) and victim.child.returncode() is None
                ),
                "the killed hub server restarted",
                120,
            )
            await until(lambda: len(acked) >= 9 + 12, "adds after the restart", 240)
            stop.set()
            await tasks[-1]
            tasks.pop()

            # Every acknowledged object placed, and its copies' events stored once each.
            locations = await LocationStore(js).open(create=False)
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 240
            for _, cid, _ in acked:
                while True:
                    status: ObjectStatus | TransportError | None
                    try:
                        status = await locations.get(cids.parse(cid))
                    except TransportError as exc:  # a bucket's stream still electing
                        status = exc
                    if (
                        isinstance(status, ObjectStatus)
                        and status.state == "placed"
                        and status.pinned == 3
                    ):
                        break
                    assert loop.time() < deadline, f"{cid} never placed: {status}"
                    await asyncio.sleep(0.5)
            await asyncio.sleep(3.0)  # a duplicate sourced late would show here
            # The whole stream, read once everything settled (a reader opened before the kill
            # may have lived on the member killed).
            last = (await js.stream_info(EVENTS_STREAM)).state.last_seq
            reader = EventReader(js)
            while reader.last_sequence < last:
                for event in await reader.fetch_stored(timeout=2.0):
                    ids[event.envelope.id] += 1
                    with contextlib.suppress(EventBodyError, EnvelopeError):
                        parsed = parse_event(event.envelope)
                        if isinstance(parsed, ObjectStored):
                            stored[(cids.to_str(parsed.root), event.node)] += 1
            await reader.close()

        # Exactly once per envelope: the outboxes' guarantee. A copy may be announced twice in
        # two envelopes (a fetch task whose ack was lost in the election is redelivered, finds
        # its copy pinned and announces it again, as it should): not a duplicate delivery.
        repeated = {key: n for key, n in ids.items() if n > 1}
        assert not repeated, f"event envelopes stored more than once: {repeated}"
        for _, cid, node in acked:
            assert stored[(cid, node)] >= 1, (cid, node)
        after = sum(1 for when, _, _ in acked if when > killed_at)
        print(
            f"\nhub cluster: killed {leader.leader} (event store leader); {elected} led the "
            f"event store {reelected:.1f} s later; adds acknowledged {len(acked)} "
            f"({after} after the kill), failed cleanly {len(failed)}; "
            f"{sum(stored.values())} ObjectStored events, no envelope twice"
        )
        for line in failed[:5]:
            print("  " + line)
    finally:
        for task in tasks:
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
        await domain.stop()

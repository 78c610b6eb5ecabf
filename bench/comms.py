"""Comms: small inline messages per second beside raw nats-py, and offload latency for 10 MB.

    .venv/bin/python bench/comms.py [--messages N] [--events N] [--offload-size BYTES] [--rounds N]

Topology: a 1-server hub and two leaves on loopback, an agent on each (in this process, as the
tests run them). The sender is on node-a, the receiver on node-b, so every message crosses both
leaf links and the hub.

1. **Inline commands**: ``Comms.send(command("Tick", {...}))`` with a small body (about 200 bytes
   of envelope), beside ``nc.publish`` of a payload of the same size on the same path, in the
   same run. Rates are end to end: from the first send until the receiver has counted them all.
   Sender and receiver share this process, so its CPU time per message is printed too (less
   disturbed by other work on the machine than the rates), and the ratio of both.
2. **Events**: ``Comms.send(event(...))``: each one is stored in node-a's outbox and acknowledged
   before the next (the durability a sender gets), beside raw ``js.publish`` to the same stream.
3. **Offload latency**: ``Comms.send`` of a command carrying ``--offload-size`` bytes (upload
   through node-a's agent, pin, announce, publish), p50 over ``--rounds`` distinct payloads, and
   the receiver's ``read`` of it (who-has, fetch from node-a across the hub, verify).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from nats.aio.msg import Msg

from cim_place.cluster.agent.config import AgentConfig, VolumeConfig
from cim_place.cluster.agent.service import Agent
from cim_place.cluster.events.store import ensure_event_store
from cim_place.cluster.exchange.fetch import wait_for_holder
from cim_place.cluster.nats.connection import connect, connected, jetstream
from cim_place.cluster.nats.subjects import outbox_stream
from cim_place.cluster.tasks.queue import ensure_task_stream
from cim_place.comms import Comms, Message, command, event, query
from cim_place.local.topologies import add_leaf, start_hub
from cim_place.objectstore.testdata import chacha_stream

BODY = {"n": 0, "sku": "A-1042", "qty": 3, "note": "small inline message"}


class Counter:
    def __init__(self, want: int) -> None:
        self.want = want
        self.seen = 0
        self.done = asyncio.get_running_loop().create_future()

    def hit(self) -> None:
        self.seen += 1
        if self.seen >= self.want and not self.done.done():
            self.done.set_result(None)


@dataclass
class Inline:
    """Inline command rates, end to end, and this process's CPU time per message."""

    comms_rate: float
    raw_rate: float
    comms_cpu: float
    raw_cpu: float
    size: int


async def inline_commands(alice: Comms, bob: Comms, count: int) -> Inline:
    """Comms.send against raw nc.publish, same payload size, same path, same run."""
    counter = Counter(count)

    async def on_tick(message: Message) -> None:
        counter.hit()

    subscription = await bob.subscribe("Tick", on_tick, kinds=("command",))
    await _reachable(alice, bob)
    size = len((await alice.envelope(command("Tick", BODY))).encode())
    started, cpu = time.perf_counter(), time.process_time()
    for n in range(count):
        await alice.send(command("Tick", {**BODY, "n": n}))
    await asyncio.wait_for(counter.done, 120)
    comms_rate = count / (time.perf_counter() - started)
    comms_cpu = (time.process_time() - cpu) / count
    await subscription.stop()

    raw = Counter(count)

    async def on_raw(msg: Msg) -> None:
        raw.hit()

    subject = "bench.raw.tick"
    sub = await bob.nc.subscribe(subject, cb=on_raw, pending_msgs_limit=0, pending_bytes_limit=0)
    await bob.nc.flush()
    await asyncio.sleep(0.5)  # interest reaches node-a's leaf
    payload = b"x" * size
    started, cpu = time.perf_counter(), time.process_time()
    for _ in range(count):
        await alice.nc.publish(subject, payload)
    await asyncio.wait_for(raw.done, 120)
    raw_rate = count / (time.perf_counter() - started)
    raw_cpu = (time.process_time() - cpu) / count
    await sub.unsubscribe()
    return Inline(comms_rate, raw_rate, comms_cpu, raw_cpu, size)


async def events(alice: Comms, count: int) -> tuple[float, float]:
    """(comms events/s, raw js.publish/s) into node-a's outbox, each acknowledged."""
    started = time.perf_counter()
    for n in range(count):
        await alice.send(event("Ticked", {**BODY, "n": n}))
    comms_rate = count / (time.perf_counter() - started)
    js = alice.nc.jetstream()
    payload = b"x" * 120
    stream = outbox_stream(alice.node)
    started = time.perf_counter()
    for _ in range(count):
        await js.publish(f"cim.place.evt.{alice.node}.app.Raw", payload, stream=stream)
    raw_rate = count / (time.perf_counter() - started)
    return comms_rate, raw_rate


async def offload(
    alice: Comms, bob: Comms, size: int, rounds: int
) -> tuple[list[float], list[float]]:
    """Send latencies and receiver read latencies (seconds) of ``rounds`` offloaded payloads."""
    inbox: asyncio.Queue[Message] = asyncio.Queue()

    async def on_doc(message: Message) -> None:
        await inbox.put(message)

    await bob.subscribe("StoreDocument", on_doc, kinds=("command",))
    await _reachable(alice, bob)
    sends: list[float] = []
    reads: list[float] = []
    for n in range(rounds):
        payload = chacha_stream(f"offload-{n}", size).read()
        started = time.perf_counter()
        await alice.send(command("StoreDocument", {"pdf": payload}))
        sends.append(time.perf_counter() - started)
        message = await asyncio.wait_for(inbox.get(), 60)
        started = time.perf_counter()
        data = await message.read("pdf")
        reads.append(time.perf_counter() - started)
        assert data == payload
    return sends, reads


async def _reachable(alice: Comms, bob: Comms) -> None:
    async def pong(message: Message) -> None:
        return None

    probe = await bob.subscribe("Ping", pong, kinds=("query",))
    for _ in range(200):
        try:
            await alice.request(query("Ping"), timeout=0.5)
            break
        except Exception:
            await asyncio.sleep(0.05)
    await probe.stop()


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--events", type=int, default=2_000)
    parser.add_argument("--offload-size", type=int, default=10 * 1024 * 1024)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="cim-place-bench-comms-") as tmp:
        work = Path(tmp)
        hub = start_hub(work / "hub", size=1)
        leaves = {node: add_leaf(hub, work / node, node) for node in ("node-a", "node-b")}
        agents: list[Agent] = []
        try:
            async with connected(hub.url) as nc:
                await ensure_event_store(jetstream(nc, "hub"), replicas=1)
                await ensure_task_stream(jetstream(nc, "hub"), 1)
            for node, leaf in leaves.items():
                config = AgentConfig(
                    node=node,
                    volumes=(VolumeConfig("v0", work / node / "v0"),),
                    servers=(leaf.url,),
                    labels={"zone": node},
                )
                agents.append(Agent(config, fsync="none"))
                await agents[-1].start()
            alice = Comms(await connect(leaves["node-a"].url), "node-a", owner="alice")
            bob = Comms(await connect(leaves["node-b"].url), "node-b", owner="bob")
            assert await wait_for_holder(bob.nc, "node-a", timeout=10)

            inline = await inline_commands(alice, bob, args.messages)
            print(
                f"inline commands, {args.messages} x {inline.size} B envelopes, node-a -> node-b"
                " (rate end to end; CPU of this process, sender and receiver, per message):"
            )
            print(
                f"  Comms.send       {inline.comms_rate:10,.0f} msg/s"
                f"  {inline.comms_cpu * 1e6:5.1f} us CPU"
            )
            print(
                f"  raw nc.publish   {inline.raw_rate:10,.0f} msg/s"
                f"  {inline.raw_cpu * 1e6:5.1f} us CPU"
            )
            print(
                f"  Comms / raw      {inline.comms_rate / inline.raw_rate:10.2f} (rate)"
                f"  {inline.raw_cpu / inline.comms_cpu:5.2f} (CPU per message, raw / Comms)"
            )
            comms_events, raw_events = await events(alice, args.events)
            print(f"events into the outbox, {args.events}, each acknowledged:")
            print(f"  Comms.send       {comms_events:10,.0f} events/s")
            print(f"  raw js.publish   {raw_events:10,.0f} events/s")
            sends, reads = await offload(alice, bob, args.offload_size, args.rounds)
            mb = args.offload_size / 1e6
            print(f"offload of {mb:.1f} MB, {args.rounds} rounds (distinct payloads):")
            print(
                f"  send (upload, pin, publish)  p50 {statistics.median(sends) * 1e3:7.0f} ms"
                f"  (min {min(sends) * 1e3:.0f}, max {max(sends) * 1e3:.0f})"
            )
            print(
                f"  receiver read (fetch, verify) p50 {statistics.median(reads) * 1e3:6.0f} ms"
                f"  (min {min(reads) * 1e3:.0f}, max {max(reads) * 1e3:.0f})"
            )
            for comms in (alice, bob):
                await comms.close()
                await comms.nc.close()
        finally:
            for agent in agents:
                await agent.stop(grace=1)
            for leaf in leaves.values():
                leaf.stop()
            hub.stop()


if __name__ == "__main__":
    asyncio.run(main())

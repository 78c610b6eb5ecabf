"""Comms: small inline messages per second beside raw nats-py, and offload latency for 10 MB.

    .venv/bin/python bench/comms.py [--messages N] [--inline-rounds N] [--events N]
                                    [--offload-size BYTES] [--rounds N]

Topology: a 1-server hub and two leaves on loopback, an agent on each (in this process, as the
tests run them). The sender is on node-a, the receiver on node-b, so every message crosses both
leaf links and the hub.

1. **Inline commands**: ``Comms.send(command("Tick", {...}))`` with a small body (about 200 bytes
   of envelope), beside ``nc.publish`` of a payload of the same size on the same path, from the
   same sending process. Rates are end to end: from the first send until the receiver has
   counted them all. After a warm-up round of each, ``--inline-rounds`` rounds run both senders
   back to back, alternating which goes first; the figure is the median of the rounds' ratios.
   The rounds run twice: with the receivers in this process, then in a process of their own
   (this script with ``--receive URL``, driven over NATS). The CPU per message adds the sender's
   and the receiver's processes; the NATS servers' CPU per message is printed too.
2. **Events**: ``Comms.send(event(...))``: each one is stored in node-a's outbox and acknowledged
   before the next (the durability a sender gets), beside raw ``js.publish`` to the same stream.
3. **Offload latency**: ``Comms.send`` of a command carrying ``--offload-size`` bytes (upload
   through node-a's agent, pin, announce, publish), p50 over ``--rounds`` distinct payloads, and
   the receiver's ``read`` of it (who-has, fetch from node-a across the hub, verify).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from cim_place.cluster.agent.config import AgentConfig, VolumeConfig
from cim_place.cluster.agent.service import Agent
from cim_place.cluster.events.store import ensure_event_store
from cim_place.cluster.exchange.fetch import wait_for_holder
from cim_place.cluster.nats.connection import connect, connected, jetstream
from cim_place.cluster.nats.subjects import outbox_stream
from cim_place.cluster.tasks.queue import ensure_task_stream
from cim_place.comms import AppSubscription, Comms, Message, command, event, query
from cim_place.local.topologies import add_leaf, start_hub
from cim_place.objectstore.testdata import chacha_stream

BODY = {"n": 0, "sku": "A-1042", "qty": 3, "note": "small inline message"}


class Counter:
    """Counts one round's messages at the receiver; ``done`` resolves at the last one."""

    def __init__(self) -> None:
        self.want = 0
        self.seen = 0
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def reset(self, want: int) -> None:
        self.want, self.seen = want, 0
        self.done = asyncio.get_running_loop().create_future()

    def hit(self) -> None:
        self.seen += 1
        if self.seen >= self.want and not self.done.done():
            self.done.set_result(None)


@dataclass
class Round:
    """One round of each sender: rates end to end, CPU per message (sender and receiver)."""

    comms_rate: float
    raw_rate: float
    comms_cpu: float
    raw_cpu: float
    comms_receiver_cpu: float
    raw_receiver_cpu: float
    """Of ``comms_cpu`` and ``raw_cpu``: the receiver's process (0 when it is the sender's)."""

    @property
    def rate_ratio(self) -> float:
        return self.comms_rate / self.raw_rate

    @property
    def cpu_ratio(self) -> float:
        return self.raw_cpu / self.comms_cpu


@dataclass
class Inline:
    """Inline command rounds, and the CPU the NATS servers used per message over all of them."""

    receiver: str
    rounds: list[Round]
    size: int
    comms_server_cpu: float
    raw_server_cpu: float


def cpu_of(pids: list[int]) -> float:
    """CPU seconds (user + system) these processes have used so far (clock-tick resolution)."""
    total = 0
    for pid in pids:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


RAW_SUBJECT = "bench.raw.tick"
CONTROL = "bench.comms.ctl"


class Receivers:
    """The receivers of both senders, counting: subscribed with Comms and with raw nats-py."""

    def __init__(self) -> None:
        self.counters = {"comms": Counter(), "raw": Counter()}
        self.subscriptions: list[AppSubscription] = []
        self.sub: Subscription | None = None

    async def start(self, comms: Comms) -> None:
        comms_counter, raw_counter = self.counters["comms"], self.counters["raw"]

        async def on_tick(message: Message) -> None:
            comms_counter.hit()

        async def on_raw(msg: Msg) -> None:
            raw_counter.hit()

        async def pong(message: Message) -> None:
            return None

        self.subscriptions.append(await comms.subscribe("Tick", on_tick, kinds=("command",)))
        # nats-py's pending limits, as Comms.subscribe has them.
        self.sub = await comms.nc.subscribe(RAW_SUBJECT, cb=on_raw)
        # Last: once a sender's Ping is answered, its leaf knows of the other subscriptions.
        self.subscriptions.append(await comms.subscribe("Ping", pong, kinds=("query",)))
        await comms.nc.flush()

    async def expect(self, name: str, count: int) -> None:
        self.counters[name].reset(count)

    async def wait(self, name: str) -> float:
        """Until ``count`` messages arrived; the CPU seconds the receiver used apart from this
        process since :meth:`expect` (none: it runs here, and this process's CPU counts it)."""
        await asyncio.wait_for(self.counters[name].done, 120)
        return 0.0

    async def stop(self) -> None:
        for subscription in self.subscriptions:
            await subscription.stop()
        if self.sub is not None:
            await self.sub.unsubscribe()


class ChildReceivers:
    """:class:`Receivers` in a process of their own, connected to node-b's leaf, driven over NATS.

    As an application's sender and receiver would run, on two nodes: each process has its own
    interpreter, and the CPU per message adds both.
    """

    def __init__(self, control: Client, leaf_url: str) -> None:
        self.control = control
        self.leaf_url = leaf_url
        self.process: asyncio.subprocess.Process | None = None
        self.started_cpu = 0.0

    async def start(self) -> None:
        self.process = await asyncio.create_subprocess_exec(
            sys.executable, __file__, "--receive", self.leaf_url, stdout=asyncio.subprocess.PIPE
        )
        assert self.process.stdout is not None
        line = await asyncio.wait_for(self.process.stdout.readline(), 60)
        if line.strip() != b"ready":
            raise RuntimeError(f"the receiver process said {line!r}")

    async def _ask(self, what: str, timeout: float = 10) -> float:
        reply = await self.control.request(CONTROL, what.encode(), timeout=timeout)
        return float(reply.data)

    async def expect(self, name: str, count: int) -> None:
        self.started_cpu = await self._ask(f"expect {name} {count}")

    async def wait(self, name: str) -> float:
        return await self._ask(f"wait {name}", timeout=120) - self.started_cpu

    async def stop(self) -> None:
        if self.process is not None:
            with contextlib.suppress(Exception):
                await self._ask("stop")
            await asyncio.wait_for(self.process.wait(), 30)


async def receive(leaf_url: str) -> None:
    """The child process of :class:`ChildReceivers`."""
    nc = await connect(leaf_url)
    bob = Comms(nc, "node-b", owner="bob")
    receivers = Receivers()
    await receivers.start(bob)
    stopped = asyncio.Event()

    async def control(msg: Msg) -> None:
        command_word, *words = msg.data.decode().split()
        if command_word == "expect":
            await receivers.expect(words[0], int(words[1]))
        elif command_word == "wait":
            await receivers.wait(words[0])
        else:
            stopped.set()
        await msg.respond(repr(time.process_time()).encode())

    await nc.subscribe(CONTROL, cb=control)
    await nc.flush()
    print("ready", flush=True)
    await stopped.wait()
    await nc.flush()
    await receivers.stop()
    await bob.close()
    await nc.close()


async def inline_commands(
    alice: Comms,
    receivers: Receivers | ChildReceivers,
    count: int,
    rounds: int,
    servers: list[int],
) -> Inline:
    """Comms.send against raw nc.publish, same payload size, same path, same sending process.

    Both receivers stay subscribed throughout. After a warm-up round of each, every round runs
    both senders back to back, alternating which goes first, so that a change in the machine's
    load weighs on both alike; the figure is the median of the rounds' ratios.
    """
    await _probe(alice)
    size = len((await alice.envelope(command("Tick", BODY))).encode())
    payload = b"x" * size

    async def comms_round(want: int) -> tuple[float, float, float]:
        await receivers.expect("comms", want)
        started, cpu = time.perf_counter(), time.process_time()
        for n in range(want):
            await alice.send(command("Tick", {**BODY, "n": n}))
        elsewhere = await receivers.wait("comms")
        wall, cpu = time.perf_counter() - started, time.process_time() - cpu + elsewhere
        return want / wall, cpu / want, elsewhere / want

    async def raw_round(want: int) -> tuple[float, float, float]:
        await receivers.expect("raw", want)
        started, cpu = time.perf_counter(), time.process_time()
        for _ in range(want):
            await alice.nc.publish(RAW_SUBJECT, payload)
        elsewhere = await receivers.wait("raw")
        wall, cpu = time.perf_counter() - started, time.process_time() - cpu + elsewhere
        return want / wall, cpu / want, elsewhere / want

    warm = min(count, 2_000)
    await comms_round(warm)
    await raw_round(warm)
    results: list[Round] = []
    server_cpu = {"comms": 0.0, "raw": 0.0}
    for index in range(rounds):
        measured: dict[str, tuple[float, float, float]] = {}
        order = (("comms", comms_round), ("raw", raw_round))
        for name, run in order if index % 2 == 0 else order[::-1]:
            before = cpu_of(servers)
            measured[name] = await run(count)
            server_cpu[name] += cpu_of(servers) - before
        (comms_rate, comms_cpu, comms_there), (raw_rate, raw_cpu, raw_there) = (
            measured["comms"],
            measured["raw"],
        )
        results.append(Round(comms_rate, raw_rate, comms_cpu, raw_cpu, comms_there, raw_there))
    messages = count * rounds
    where = "in this process" if isinstance(receivers, Receivers) else "in a process of their own"
    return Inline(
        where, results, size, server_cpu["comms"] / messages, server_cpu["raw"] / messages
    )


def report_inline(inline: Inline, count: int) -> None:
    print(
        f"inline commands, {len(inline.rounds)} rounds x {count} x {inline.size} B envelopes,"
        f" node-a -> node-b, receivers {inline.receiver} (rate end to end; CPU per message of"
        " the sender's and receiver's processes; Comms and raw alternate within each round):"
    )
    print(
        "  round   Comms.send msg/s  us CPU   raw nc.publish msg/s  us CPU   rate ratio  CPU ratio"
    )
    for index, r in enumerate(inline.rounds, 1):
        print(
            f"  {index:5}   {r.comms_rate:16,.0f}  {r.comms_cpu * 1e6:6.1f}"
            f"   {r.raw_rate:20,.0f}  {r.raw_cpu * 1e6:6.1f}"
            f"   {r.rate_ratio:10.2f}  {r.cpu_ratio:9.2f}"
        )
    rates = [r.rate_ratio for r in inline.rounds]
    cpus = [r.cpu_ratio for r in inline.rounds]
    print(
        f"  Comms / raw, median of the rounds: {statistics.median(rates):.2f} (rate;"
        f" min {min(rates):.2f}, max {max(rates):.2f}), {statistics.median(cpus):.2f}"
        f" (CPU per message, raw / Comms; min {min(cpus):.2f}, max {max(cpus):.2f})"
    )
    if any(r.comms_receiver_cpu for r in inline.rounds):
        comms = statistics.median(r.comms_receiver_cpu for r in inline.rounds)
        raw = statistics.median(r.raw_receiver_cpu for r in inline.rounds)
        print(
            f"  of the CPU per message, the receiver's process (median): Comms {comms * 1e6:.1f}"
            f" us, raw {raw * 1e6:.1f} us"
        )
    print(
        f"  NATS servers' CPU per message (hub and both leaves): Comms"
        f" {inline.comms_server_cpu * 1e6:.1f} us, raw {inline.raw_server_cpu * 1e6:.1f} us"
    )


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
    await _probe(alice)
    await probe.stop()


async def _probe(alice: Comms) -> None:
    """Until a Ping query from ``alice`` is answered (the receiver's interest reached node-a)."""
    for _ in range(200):
        try:
            await alice.request(query("Ping"), timeout=0.5)
            return
        except Exception:
            await asyncio.sleep(0.05)


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--inline-rounds", type=int, default=7)
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

            servers = [s.pid for s in (*hub.servers, *leaves.values()) if s.pid is not None]
            here = Receivers()
            await here.start(bob)
            try:
                inline = await inline_commands(
                    alice, here, args.messages, args.inline_rounds, servers
                )
            finally:
                await here.stop()
            report_inline(inline, args.messages)
            child = ChildReceivers(bob.nc, leaves["node-b"].url)
            await child.start()
            try:
                inline = await inline_commands(
                    alice, child, args.messages, args.inline_rounds, servers
                )
            finally:
                await child.stop()
            report_inline(inline, args.messages)
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
    if sys.argv[1:2] == ["--receive"]:
        asyncio.run(receive(sys.argv[2]))
    else:
        asyncio.run(main())

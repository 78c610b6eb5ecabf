"""Announce throughput: durable ObjectStored events per second from one publisher.

Starts a 1-server hub and one leaf (real nats-server processes in a temporary directory), sets up
the event store as an agent does (outbox on the leaf, sourced by CIM_PLACE_EVENTS on the hub),
and measures in the same run, each a few rounds (median reported, rounds interleaved):

- ``envelope build + encode``: the CPU part alone, no I/O;
- ``EventPublisher.publish_many``: build each ObjectStored envelope, encode it and publish it
  pipelined to an outbox, until every ack is in (what an agent pays), into an outbox the hub
  does not source, so that it is compared on equal terms with
- ``raw js.publish_async``: nats-py's pipelined publish of the same, pre-encoded payloads and
  headers into another outbox of identical configuration (the client's usual ceiling);
- ``end to end``: publish_many into the sourced outbox until the hub stream holds every event;
- ``EventPublisher.publish``: one acknowledged publish at a time.

Usage: ``.venv/bin/python bench/announce.py [--events 20000] [--single 2000] [--rounds 3]``
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from collections.abc import Awaitable
from pathlib import Path

from nats.js import JetStreamContext

from cim_place.cluster.events.publisher import EventPublisher
from cim_place.cluster.events.sources import attach_leaf
from cim_place.cluster.events.store import ensure_event_store, ensure_outbox
from cim_place.cluster.events.types import ObjectStored, event_envelope
from cim_place.cluster.nats.connection import connected, jetstream
from cim_place.cluster.nats.envelope import Envelope
from cim_place.cluster.nats.subjects import EVENTS_STREAM, Subjects, outbox_stream
from cim_place.local.topologies import add_leaf, start_hub
from cim_place.objectstore.cid import RAW, make_cid

NODE = "bench-leaf"  # sourced by the hub
LOCAL = "bench-local"  # not sourced: EventPublisher alone
RAW_NODE = "bench-raw"  # not sourced: raw nats-py


def stored(i: int) -> ObjectStored:
    return ObjectStored(
        root=make_cid(RAW, i.to_bytes(8, "big", signed=True)),
        size=1 << 20,
        blocks=1,
        volume="vol-1",
        owner="bench",
        name=f"object-{i}",
        metadata={"source": "bench"},
    )


def envelopes_of(batch: list[ObjectStored]) -> list[Envelope]:
    return [event_envelope(event, owner=NODE) for event in batch]


async def raw_publish_async(
    js: JetStreamContext, payloads: list[tuple[bytes, dict[str, str]]]
) -> None:
    subject = Subjects().event(RAW_NODE, "ObjectStored")
    stream = outbox_stream(RAW_NODE)
    futures = [
        await js.publish_async(subject, data, stream=stream, headers=dict(headers))
        for data, headers in payloads
    ]
    acks = await asyncio.gather(*futures)
    assert not any(a.duplicate for a in acks)


async def timed(action: Awaitable[object]) -> float:
    start = time.perf_counter()
    await action
    return time.perf_counter() - start


async def encode_only(batch: list[ObjectStored]) -> None:
    for envelope in envelopes_of(batch):
        envelope.encode()


async def publish_batch(publisher: EventPublisher, batch: list[ObjectStored]) -> None:
    await publisher.publish_many(envelopes_of(batch))


async def one_by_one(publisher: EventPublisher, batch: list[ObjectStored]) -> None:
    for envelope in envelopes_of(batch):
        await publisher.publish(envelope)


async def end_to_end(
    publisher: EventPublisher, js_hub: JetStreamContext, batch: list[ObjectStored], expected: int
) -> None:
    await publish_batch(publisher, batch)
    while (await js_hub.stream_info(EVENTS_STREAM)).state.messages < expected:
        await asyncio.sleep(0.005)


async def run(events: int, single: int, rounds: int) -> None:
    with tempfile.TemporaryDirectory(prefix="cim-bench-announce-") as tmp:
        hub = start_hub(Path(tmp) / "hub", size=1)
        leaf = add_leaf(hub, Path(tmp) / "leaf", NODE)
        try:
            async with connected(hub.urls) as hub_nc, connected(leaf.url) as leaf_nc:
                js_hub = jetstream(hub_nc, "hub")
                js_leaf = jetstream(leaf_nc)
                await ensure_event_store(js_hub, replicas=1)
                for node in (NODE, LOCAL, RAW_NODE):
                    await ensure_outbox(js_leaf, node)
                await attach_leaf(js_hub, NODE)
                sourced = EventPublisher(js_leaf, NODE)
                local = EventPublisher(js_leaf, LOCAL)
                # Warm-up: inboxes, reply subscriptions, the hub's source consumer.
                await sourced.publish_many(envelopes_of([stored(-1)]))
                await local.publish_many(envelopes_of([stored(-1)]))
                await raw_publish_async(
                    js_leaf, [(e.encode(), e.headers()) for e in envelopes_of([stored(-1)])]
                )
                on_hub = 1
                times: dict[str, list[float]] = {}
                counts: dict[str, int] = {}

                def record(label: str, count: int, seconds: float) -> None:
                    times.setdefault(label, []).append(seconds)
                    counts[label] = count

                for r in range(rounds):
                    # The agent has its events' fields at hand; hashing CIDs is not announcing.
                    batch = [stored(r * 10 * events + i) for i in range(events)]
                    ones = [stored(r * 10 * events + events + i) for i in range(single)]
                    payloads = [(e.encode(), e.headers()) for e in envelopes_of(batch)]
                    record(
                        "envelope build + encode (no I/O)", events, await timed(encode_only(batch))
                    )
                    record(
                        "EventPublisher.publish_many",
                        events,
                        await timed(publish_batch(local, batch)),
                    )
                    record(
                        "raw js.publish_async (pre-encoded)",
                        events,
                        await timed(raw_publish_async(js_leaf, payloads)),
                    )
                    on_hub += events
                    record(
                        "end to end: publish_many + hub arrival",
                        events,
                        await timed(end_to_end(sourced, js_hub, batch, on_hub)),
                    )
                    record(
                        "EventPublisher.publish (one by one)",
                        single,
                        await timed(one_by_one(local, ones)),
                    )

                size = len(envelopes_of([stored(0)])[0].encode())
                print(
                    f"ObjectStored envelope {size} bytes + headers; 1-server hub, one leaf; "
                    f"median of {rounds} rounds"
                )
                for label, samples in times.items():
                    seconds = statistics.median(samples)
                    count = counts[label]
                    print(
                        f"{label:40s} {count:7d} events {seconds:7.3f} s {count / seconds:9.0f}/s"
                    )
        finally:
            leaf.stop()
            hub.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=20000, help="events for pipelined runs")
    parser.add_argument("--single", type=int, default=2000, help="events for one-by-one publish")
    parser.add_argument("--rounds", type=int, default=3, help="rounds (median reported)")
    args = parser.parse_args()
    asyncio.run(run(args.events, args.single, args.rounds))


if __name__ == "__main__":
    main()

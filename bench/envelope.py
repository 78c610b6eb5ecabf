"""Envelope codec: encode and decode of one envelope, in microseconds of CPU time.

    .venv/bin/python bench/envelope.py [--count N] [--repeat R]

Three envelopes: an ObjectStored event (what the controller ingests), the small command of
``bench/comms.py`` and a fetch task. For each: ``Envelope.encode()``, ``decode()`` (the strict
DAG-CBOR decode plus the envelope checks), and, for the event, ``parse_event`` of the decoded
envelope. Beside them, as a baseline in the same run, the reference ``dag_cbor`` package encoding
and decoding the same document. Best of ``--repeat`` runs of ``--count`` iterations each
(``time.process_time``), which a machine shared with other work disturbs least.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from functools import partial

import dag_cbor
from multiformats import CID

from cim_place.cluster.events.types import ObjectStored, event_envelope, parse_event
from cim_place.cluster.nats.envelope import Content, Envelope, decode
from cim_place.cluster.tasks.model import Task, task_envelope
from cim_place.objectstore import cid as cids
from cim_place.objectstore.dagcbor import Link, Value

ROOT = cids.make_cid(cids.RAW, b"object 1")


def per_call(function: Callable[[], object], count: int, repeat: int) -> float:
    """Best microseconds per call over ``repeat`` runs of ``count`` calls."""
    best = float("inf")
    for _ in range(repeat):
        started = time.process_time()
        for _ in range(count):
            function()
        best = min(best, time.process_time() - started)
    return best / count * 1e6


def to_reference(value: Value) -> object:
    if isinstance(value, Link):
        return CID.decode(value.cid)
    if isinstance(value, list):
        return [to_reference(item) for item in value]
    if isinstance(value, dict):
        return {key: to_reference(item) for key, item in value.items()}
    return value


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--count", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    stored = ObjectStored(
        root=ROOT, size=1024, blocks=1, volume="v0", owner="alice", metadata={"k": "v"}
    )
    envelopes = {
        "ObjectStored event": event_envelope(stored, owner="node-a"),
        "comms command": Envelope.new(
            Content(
                "command", "Tick", {"n": 7, "sku": "A-1042", "qty": 3, "note": "small message"}
            ),
            owner="alice",
        ),
        "fetch task": task_envelope(
            Task.create("fetch", "node-b", ROOT, generation=3, holders=("node-a",))
        ),
    }
    print(f"per envelope, best of {args.repeat} x {args.count} (CPU time):")
    for name, envelope in envelopes.items():
        data = envelope.encode()
        reference = to_reference(dag_cbor.decode(data))  # type: ignore[arg-type]
        assert dag_cbor.encode(reference) == data  # type: ignore[arg-type]
        encode = per_call(envelope.encode, args.count, args.repeat)
        decoded = per_call(partial(decode, data), args.count, args.repeat)
        ref_encode = per_call(partial(dag_cbor.encode, reference), args.count // 10, args.repeat)
        ref_decode = per_call(partial(dag_cbor.decode, data), args.count // 10, args.repeat)
        print(
            f"  {name:20s} {len(data):4d} B  encode {encode:5.2f} us  decode {decoded:5.2f} us"
            f"   (dag_cbor: encode {ref_encode:5.1f} us, decode {ref_decode:5.1f} us)"
        )
    data = envelopes["ObjectStored event"].encode()
    parse = per_call(lambda: parse_event(decode(data)), args.count, args.repeat)
    print(f"  ObjectStored: decode + parse_event {parse:5.2f} us")


if __name__ == "__main__":
    main()

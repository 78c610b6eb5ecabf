"""The cost of a sharded leader's summary, and how often it is written because of it.

    .venv/bin/python bench/shard_summary.py                      # 1,000,000 objects
    .venv/bin/python bench/shard_summary.py --objects 10000000   # about 0.3 GiB of columns

A sharded leader writes one summary per shard it leads, computed from a column of every object
(its state, its shard, its size). That computation holds the event loop; the summary loop spaces
the summaries so it takes at most ``SUMMARY_SHARE`` of it (``summary_wait``).

Printed beside it, measured in the same run on the same columns:

* the floor: one ``bincount`` of the state column (the unsharded summary's count);
* the earlier computation: a pass over every slot per led shard for its counts.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import numpy as np
import numpy.typing as npt

from cim_place.cluster.controller.object_states import ObjectStates
from cim_place.cluster.controller.periodic import SUMMARY_SHARE, summary_wait
from cim_place.cluster.controller.shards import shard_summaries
from cim_place.placement.status import OBJECT_STATES, Summary

SHARDS = 2
STATES = 3  # placed, degraded, progressing: the usual mix


def best_of(action: Callable[[], object], rounds: int = 5) -> float:
    best = float("inf")
    for _ in range(rounds):
        started = time.perf_counter()
        action()
        best = min(best, time.perf_counter() - started)
    return best


def columns(objects: int, seed: int = 1) -> tuple[ObjectStates, npt.NDArray[np.uint64]]:
    rng = np.random.default_rng(seed)
    states = ObjectStates()
    states.note(objects - 1, OBJECT_STATES[0])  # room for every slot
    # ObjectStates has no bulk setter: the bench fills its columns directly.
    states._state[:objects] = rng.integers(0, STATES, objects, dtype=np.uint8)
    states._shard[:objects] = rng.integers(0, SHARDS, objects, dtype=np.uint16)
    sizes = rng.integers(1, 2**20, objects, dtype=np.uint64)
    return states, sizes


def earlier(states: ObjectStates, sizes: npt.NDArray[np.uint64]) -> None:
    """The computation before: every slot looked at once per led shard."""
    noted = states.noted_slots()
    of_shard = states.shards_of(noted)
    in_noted = sizes[noted]
    for shard in range(SHARDS):
        states.counts(shard)
        int(in_noted[of_shard == shard].sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--objects", type=int, default=1_000_000)
    args = parser.parse_args()
    states, sizes = columns(args.objects)

    def sizes_at(slots: npt.NDArray[np.intp]) -> npt.NDArray[np.uint64]:
        return sizes[slots]

    base = Summary(objects=args.objects)
    now = best_of(lambda: shard_summaries(base, states, set(), sizes_at, SHARDS, range(SHARDS)))
    floor = best_of(states.counts)
    before = best_of(lambda: earlier(states, sizes))
    print(f"{args.objects:,} objects, {SHARDS} shards led, best of 5")
    print(f"  floor: one bincount of the state column   {floor * 1e3:8.1f} ms")
    print(f"  earlier per-shard summaries               {before * 1e3:8.1f} ms")
    print(f"  per-shard summaries now                   {now * 1e3:8.1f} ms")
    wait = summary_wait(1.0, now)
    print(
        f"  with summary_every 1 s: written every {wait:.1f} s, the loop held {now / wait:.1%} "
        f"of the time (at most {SUMMARY_SHARE:.0%}; {min(1.0, now):.1%} if every second)"
    )


if __name__ == "__main__":
    main()

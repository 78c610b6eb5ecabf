"""Controller shards without a server: which shard owns a CID, summaries per shard, the flag."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
from typer.testing import CliRunner

from cim_place.cli.app import app
from cim_place.cluster.controller.config import load_controller_config
from cim_place.cluster.controller.object_states import ObjectStates
from cim_place.cluster.controller.periodic import SUMMARY_SHARE, summary_wait
from cim_place.cluster.controller.shards import shard_summaries
from cim_place.cluster.state.cid_shards import (
    MemberRecord,
    merge_summaries,
    shard_key,
    shard_of,
    shard_range,
    summary_key,
)
from cim_place.errors import CimPlaceError
from cim_place.objectstore.cid import DAG_PB, RAW, cid_of_digest
from cim_place.placement.status import Summary


def cid_with_digest(digest: bytes, codec: int = RAW, version: int = 1) -> bytes:
    return cid_of_digest(codec, digest, version=version)


def test_one_shard_owns_everything() -> None:
    cid = cid_with_digest(hashlib.sha256(b"x").digest())
    assert shard_of(cid, 1) == 0


@pytest.mark.parametrize("shards", [2, 3, 4, 7, 16])
def test_ranges_are_contiguous_by_digest_prefix(shards: int) -> None:
    # Digests sorted by their first bytes fall in non-decreasing shards, covering 0 .. N-1.
    prefixes = [i * (1 << 56) for i in range(256)] + [(1 << 64) - 1]
    owners = [shard_of(cid_with_digest(p.to_bytes(8, "big") + bytes(24)), shards) for p in prefixes]
    assert owners == sorted(owners)
    assert set(owners) == set(range(shards))
    for index in range(shards):
        low, high = shard_range(index, shards)
        for value in (int(low, 16), int(high, 16)):
            assert shard_of(cid_with_digest(value.to_bytes(8, "big") + bytes(24)), shards) == index
    assert shard_range(0, shards)[0] == "0" * 16
    assert shard_range(shards - 1, shards)[1] == "f" * 16


def test_the_shard_depends_on_the_digest_only() -> None:
    digest = hashlib.sha256(b"same content").digest()
    v1_raw = cid_with_digest(digest, RAW)
    v1_pb = cid_with_digest(digest, DAG_PB)
    v0 = cid_with_digest(digest, DAG_PB, version=0)
    assert len({shard_of(cid, 5) for cid in (v1_raw, v1_pb, v0)}) == 1


def test_shards_are_roughly_even() -> None:
    counts = [0, 0, 0, 0]
    for i in range(4000):
        counts[shard_of(cid_with_digest(hashlib.sha256(str(i).encode()).digest()), 4)] += 1
    assert min(counts) > 800


def test_keys_and_member_records() -> None:
    assert shard_key(1, 4) == "shard.1-of-4"
    assert summary_key(3, 4) == "_summary.3-of-4"
    record = MemberRecord("ctl-a", 4, (0, 2), 12.5)
    assert MemberRecord.decode(record.encode()) == record
    with pytest.raises(ValueError, match="malformed member record"):
        MemberRecord.decode(b"{}")


def test_shard_summaries_split_and_merge_back() -> None:
    cids = [cid_with_digest(hashlib.sha256(str(i).encode()).digest()) for i in range(50)]
    states = {cid: ("placed" if i % 3 else "degraded") for i, cid in enumerate(cids)}
    under = {cid for cid, state in states.items() if state == "degraded"}
    noted = ObjectStates()
    for slot, (cid, state) in enumerate(states.items()):  # slot i holds cids[i]
        noted.note(slot, state, shard_of(cid, 2))

    def sizes_at(slots: npt.NDArray[np.intp]) -> npt.NDArray[np.uint64]:
        return np.full(len(slots), 10, dtype=np.uint64)

    base = Summary(objects=50, nodes_up=3, damaged_replicas=1, warnings=("w",), updated_at=5.0)
    parts = shard_summaries(base, noted, under, sizes_at, 2, [0, 1])
    assert set(parts) == {0, 1}
    assert all(p.nodes_up == 3 and p.warnings == ("w",) for p in parts.values())
    merged = merge_summaries(list(parts.values()))
    assert merged.objects == 50
    assert merged.by_state["placed"] == sum(1 for s in states.values() if s == "placed")
    assert merged.under_replicated == len(under)
    assert merged.total_bytes == 500
    assert merged.damaged_replicas == 1  # domain-wide: not summed
    only_one = shard_summaries(base, noted, under, sizes_at, 2, [1])
    assert set(only_one) == {1}
    assert only_one[1].objects == sum(1 for cid in cids if shard_of(cid, 2) == 1)


def test_shards_in_the_configuration_file(tmp_path: Path) -> None:
    path = tmp_path / "controller.yaml"
    path.write_text("shards: 4\n")
    assert load_controller_config(path).shards == 4
    path.write_text("shards: 0\n")
    with pytest.raises(CimPlaceError, match="shards"):
        load_controller_config(path)


def test_shards_below_one_is_a_usage_error() -> None:
    result = CliRunner().invoke(app, ["controller", "--shards", "0"])
    assert result.exit_code == 2
    assert "--shards" in result.stdout + result.stderr


def test_pages_of_several_shards_merge_in_cid_order() -> None:
    from cim_place.cli._listing import merge_pages

    def page(cids: list[str], more: bool, indexed: int) -> dict[str, object]:
        rows = [{"cid": c} for c in cids]
        return {
            "objects": rows,
            "next": cids[-1] if more else None,
            "indexed": indexed,
            "tracked": 10,
        }

    merged = merge_pages([page(["a", "c"], True, 4), page(["b", "d"], True, 6)], 2)
    assert [row["cid"] for row in merged["objects"]] == ["a", "b"]
    assert merged["next"] == "b"
    assert (merged["indexed"], merged["tracked"]) == (10, 10)
    last = merge_pages([page(["e"], False, 4), page([], False, 6)], 2)
    assert [row["cid"] for row in last["objects"]] == ["e"] and last["next"] is None
    one = merge_pages([{"object": None}, {"object": {"cid": "x"}}], 100)
    assert one["object"] == {"cid": "x"}


def test_the_summary_is_spaced_when_computing_it_holds_the_loop_long() -> None:
    assert summary_wait(1.0, 0.001) == 1.0  # a small domain: every second, as configured
    assert summary_wait(1.0, 0.05) == 1.0
    assert summary_wait(1.0, 0.2) == pytest.approx(0.2 / SUMMARY_SHARE)  # 10M objects: 4 s
    assert summary_wait(5.0, 0.2) == 5.0

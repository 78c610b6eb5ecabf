"""The policy store against a real nats-server: atomic apply, ls/show/history/rm/diff, watch."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from cim_place.cluster.nats.connection import connected, jetstream
from cim_place.cluster.nats.kv import ALL_BUCKETS, POLICIES, ensure_bucket
from cim_place.cluster.state.policies import (
    CONSUMERS_KEY,
    SET_KEY,
    PolicyStore,
    load_policies,
    watch_policies,
)
from cim_place.errors import PolicyError
from cim_place.local.servers import NatsServer
from cim_place.local.topologies import Hub
from cim_place.policies.problems import PolicyValidationError
from cim_place.policies.validate import load_paths, load_text

EXAMPLES = Path(__file__).resolve().parents[3] / "deploy" / "policies"

V1 = """
- {name: default, replicas: 3}
- {name: docs, priority: 5, match: {name: "*.pdf"}, replicas: 2}
"""
V2 = """
- {name: default, replicas: 4}
- {name: media, priority: 1, match: {content_type: "image/*"}, replicas: 2}
"""


async def test_ensure_bucket_is_idempotent(nats_server: NatsServer) -> None:
    async with connected(nats_server.url) as nc:
        js = jetstream(nc)
        for name in ALL_BUCKETS:
            first = await ensure_bucket(js, name, history=5)
            second = await ensure_bucket(js, name, history=5)
            assert first._name == second._name == name
        status = await (await ensure_bucket(js, POLICIES)).status()
        assert status.history == 5  # an existing bucket is opened as it is


async def test_apply_show_history_rm(nats_server: NatsServer) -> None:
    async with connected(nats_server.url) as nc:
        js = jetstream(nc)
        assert (await load_policies(js)).revision == 0  # nothing applied, no bucket needed

        store = await PolicyStore.open(js)
        first = await store.apply(load_text(V1, "v1.yaml"), actor="tester")
        assert first.written and first.diff.added == ("default", "docs")
        r1 = first.revision

        again = await store.apply(load_text(V1, "v1.yaml"), actor="tester")
        assert not again.written and again.revision == r1 and again.diff.empty

        dry = await store.apply(load_text(V2, "v2.yaml"), dry_run=True)
        assert not dry.written and dry.revision == r1
        assert dry.diff.added == ("media",) and dry.diff.removed == ("docs",)
        changes = dry.diff.changed["default"]
        assert [(c.path, c.old, c.new) for c in changes] == [
            ("replicas.max", 3, 4),
            ("replicas.min", 3, 4),
        ]
        assert (await store.load()).revision == r1  # dry run wrote nothing

        second = await store.apply(load_text(V2, "v2.yaml"), actor="tester")
        assert second.written and second.revision > r1
        now = await store.load()
        assert [p.name for p in now.policy_set.policies] == ["default", "media"]
        assert now.applied_by == "tester" and now.files == ("v2.yaml",)

        # Old revisions stay readable.
        old = await store.load(revision=r1)
        docs = old.policy_set.policy("docs")
        assert docs is not None and docs.replicas.min == 2
        assert "name: docs" in old.sources["docs"].text

        # Per-policy history is derived from the set's history.
        history = await store.history("docs")
        assert [(h.change, h.revision) for h in history] == [
            ("added", r1),
            ("removed", second.revision),
        ]
        default_history = await store.history("default")
        assert [h.change for h in default_history] == ["added", "changed"]
        assert default_history[-1].policy is not None
        assert default_history[-1].policy["replicas"] == {"min": 4, "max": 4}

        removed = await store.remove("media", actor="tester")
        assert removed.diff.removed == ("media",)
        assert [p.name for p in (await store.load()).policy_set.policies] == ["default"]
        with pytest.raises(PolicyError, match="no applied policy named 'media'"):
            await store.remove("media")

        # The per-policy view follows the set.
        kv = await js.key_value(POLICIES)
        view = json.loads((await kv.get("default")).value or b"")
        assert view["policy"]["replicas"] == {"min": 4, "max": 4}
        assert sorted(await kv.keys()) == sorted([SET_KEY, CONSUMERS_KEY, "default"])

        # A revision that is not one of the set's is refused clearly.
        with pytest.raises(PolicyError, match="not a revision of the policy set"):
            await store.load(revision=r1 + 1)


async def test_invalid_file_applies_nothing(nats_server: NatsServer, tmp_path: Path) -> None:
    async with connected(nats_server.url) as nc:
        js = jetstream(nc)
        store = await PolicyStore.open(js)
        applied = await store.apply(load_paths([str(EXAMPLES)]))
        kv = await js.key_value(POLICIES)
        before = (await kv.status()).values
        bad = tmp_path / "bad.yaml"
        bad.write_text((EXAMPLES / "default.yaml").read_text() + "---\nname: x\nreplicas: -1\n")
        with pytest.raises(PolicyValidationError):
            await store.apply(load_paths([str(bad)]))
        assert (await kv.status()).values == before
        assert (await store.load()).revision == applied.revision


async def test_concurrent_apply_is_refused_not_lost(nats_server: NatsServer) -> None:
    async with connected(nats_server.url) as nc:
        js = jetstream(nc)
        one = await PolicyStore.open(js)
        await one.apply(load_text(V1))
        stale = await one.load()
        await one.apply(load_text(V2))
        # A writer that read before the second apply must not overwrite it.
        with pytest.raises(PolicyError, match="changed by someone else"):
            await one._replace(
                stale, load_text("{name: other, replicas: 1}").policy_set, {}, (), False, "x", None
            )


async def test_watch_policies_sees_every_apply(hub1: Hub) -> None:
    async with connected(hub1.url) as nc:
        js = jetstream(nc)
        store = await PolicyStore.open(js)
        await store.apply(load_text(V1))
        seen: list[list[str]] = []

        async def watch() -> None:
            async for stored in watch_policies(js):
                seen.append([p.name for p in stored.policy_set.policies])
                if len(seen) == 2:
                    return

        task = asyncio.create_task(watch())
        while not seen:
            await asyncio.sleep(0.01)
        await store.apply(load_text(V2))
        await asyncio.wait_for(task, 10)
        assert seen == [["default", "docs"], ["default", "media"]]
        # The bucket lives in the hub's JetStream domain.
        info = await js.stream_info(f"KV_{POLICIES}")
        assert info.config.name == f"KV_{POLICIES}"


async def test_buckets_get_three_replicas_on_a_three_server_hub(hub_cluster: Hub) -> None:
    """The policies, names and nodes survive the loss of one hub server; a standalone server
    (the other tests here) gets one replica without being asked."""
    async with connected(hub_cluster.urls) as nc:
        js = jetstream(nc, "hub")
        bucket = await ensure_bucket(js, "cim-place-test-replicas")
        info = await js.stream_info("KV_cim-place-test-replicas")
        assert info.config.num_replicas == 3
        assert (await ensure_bucket(js, "cim-place-test-replicas"))._name == bucket._name
        await js.delete_stream("KV_cim-place-test-replicas")

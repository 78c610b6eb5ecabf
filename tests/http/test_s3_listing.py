"""Listing from the ordered index: one page out of many keys reads a page, not the bucket, and
a listing sees the writes acknowledged before it (read-after-write), deletes included."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from cim_place.http.s3.app import S3_CONTEXT
from cim_place.http.s3.index import ObjectRecord
from tests.http.s3_support import S3Domain, s3node

__all__ = ["s3node"]

KEYS = 3000


def index_keys() -> list[str]:
    """Keys spread over 30 days x 100 objects, and a few at the top level."""
    keys = [f"logs/2026/{day:02d}/{n:04d}.json" for day in range(1, 31) for n in range(100)]
    return [*keys[: KEYS - 3], "readme", "zeta", "é-accent"]


async def test_one_page_of_many_keys(s3node: S3Domain) -> None:
    s3 = s3node.client()
    run = asyncio.to_thread
    await run(s3.create_bucket, Bucket="logs")
    ctx = s3node.app[S3_CONTEXT]
    keys = index_keys()
    # The index entries as a put writes them (bodies are not what a listing reads).
    now = time.time()
    for start in range(0, len(keys), 250):
        await asyncio.gather(
            *(
                ctx.index.put("logs", ObjectRecord(key, "bafy-none", "e" * 32, 10, now))
                for key in keys[start : start + 250]
            )
        )
    await run(s3.put_object, Bucket="logs", Key="logs/2026/07/0050.json", Body=b"real")

    page = await run(
        s3.list_objects_v2, Bucket="logs", Prefix="logs/2026/", Delimiter="/", MaxKeys=7
    )
    assert [p["Prefix"] for p in page["CommonPrefixes"]] == [
        f"logs/2026/{day:02d}/" for day in range(1, 8)
    ]
    assert page["IsTruncated"] and page["KeyCount"] == 7
    following = await run(
        s3.list_objects_v2,
        Bucket="logs",
        Prefix="logs/2026/",
        Delimiter="/",
        MaxKeys=2,
        ContinuationToken=page["NextContinuationToken"],
    )
    assert [p["Prefix"] for p in following["CommonPrefixes"]] == ["logs/2026/08/", "logs/2026/09/"]

    day = await run(
        s3.list_objects_v2, Bucket="logs", Prefix="logs/2026/07/", StartAfter="logs/2026/07/0048"
    )
    listed = [entry["Key"] for entry in day["Contents"]]
    assert listed[:3] == [
        "logs/2026/07/0048.json",
        "logs/2026/07/0049.json",
        "logs/2026/07/0050.json",
    ]
    assert len(listed) == 52 and not day["IsTruncated"]
    assert day["Contents"][2]["Size"] == 4  # the real object's record, not the synthetic one

    ordered = ctx.index._ordered
    assert ordered is not None
    read = ordered.applied
    assert read >= KEYS  # built once, from the KV
    # Later listings read only what changed since: one put, one delete.
    await run(s3.put_object, Bucket="logs", Key="logs/2026/07/0050b.json", Body=b"new")
    await run(s3.delete_object, Bucket="logs", Key="logs/2026/07/0049.json")
    day = await run(s3.list_objects_v2, Bucket="logs", Prefix="logs/2026/07/004", MaxKeys=1000)
    assert [e["Key"] for e in day["Contents"]][-2:] == [
        "logs/2026/07/0047.json",
        "logs/2026/07/0048.json",
    ]
    top = await run(s3.list_objects_v2, Bucket="logs", Delimiter="/")
    assert [e["Key"] for e in top["Contents"]] == ["readme", "zeta", "é-accent"]
    assert [p["Prefix"] for p in top["CommonPrefixes"]] == ["logs/"]
    tail: Any = await run(
        s3.list_objects_v2, Bucket="logs", Prefix="logs/2026/07/005", MaxKeys=1000
    )
    assert [e["Key"] for e in tail["Contents"]][:2] == [
        "logs/2026/07/0050.json",
        "logs/2026/07/0050b.json",
    ]
    assert ordered.applied - read == 2

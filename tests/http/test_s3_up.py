"""The S3 API of a domain from `cim-place up`, which runs with NATS users: every agent reaches
the S3 buckets, the index, the names and the locations with its own permissions, and no
server logs a permissions violation."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from cim_place.objectstore.testdata import chacha_stream

pytestmark = pytest.mark.nats

CLI = [sys.executable, "-m", "cim_place.cli"]


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in ("CIM_PLACE_SERVER", "CIM_PLACE_DIR")}


def client(url: str, key: dict[str, str]) -> Any:
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3",
        endpoint_url=url,
        aws_access_key_id=key["access_key"],
        aws_secret_access_key=key["secret_key"],
        region_name=key.get("region", "us-east-1"),
        config=Config(signature_version="s3v4", s3={"addressing_style": "path"}),
    )


async def test_s3_on_every_node_of_an_authenticated_domain(tmp_path: Path) -> None:
    subprocess.run(
        [*CLI, "up", "--leaves", "2", "--detach", "-q"], cwd=tmp_path, env=_env(), check=True
    )
    try:
        context = json.loads((tmp_path / ".cim-place" / "context.json").read_text())
        first, second = (client(node["s3"], context["s3"]) for node in context["nodes"][:2])
        run = asyncio.to_thread
        data = chacha_stream("s3-up", 3 * 1024 * 1024 + 5).read()
        await run(first.create_bucket, Bucket="site")
        await run(first.put_object, Bucket="site", Key="a/index.html", Body=data)
        await run(first.put_object, Bucket="site", Key="b.txt", Body=b"b")
        # The other node lists the write at once and serves the bytes it fetches from the first.
        listed = await run(second.list_objects_v2, Bucket="site", Delimiter="/")
        assert [e["Key"] for e in listed["Contents"]] == ["b.txt"]
        assert [p["Prefix"] for p in listed["CommonPrefixes"]] == ["a/"]
        got = await run(second.get_object, Bucket="site", Key="a/index.html")
        assert await run(got["Body"].read) == data
        await run(second.delete_object, Bucket="site", Key="b.txt")
        listed = await run(first.list_objects_v2, Bucket="site")
        assert [e["Key"] for e in listed["Contents"]] == ["a/index.html"]
    finally:
        subprocess.run([*CLI, "down", "-q"], cwd=tmp_path, env=_env(), check=False)
    logs = [p for p in (tmp_path / ".cim-place").rglob("nats-server.log")]
    assert logs
    violations = [
        line for log in logs for line in log.read_text().splitlines() if "Violation" in line
    ]
    assert not violations, violations[:5]

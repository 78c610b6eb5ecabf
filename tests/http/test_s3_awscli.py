"""The S3 API with the aws CLI (and `cim-place s3 key` to make the key): mb, cp up and down
(40 MiB: multipart), ls with pagination, s3api calls, presign, rm, rb."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import sys
import urllib.request
from pathlib import Path

import pytest

from cim_place.objectstore.testdata import chacha_stream
from tests.http.s3_support import S3Domain, s3node

__all__ = ["s3node"]

BIN = Path(sys.executable).parent


async def run(*argv: str, env: dict[str, str] | None = None) -> str:
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    out, err = await proc.communicate()
    if proc.returncode != 0:
        raise AssertionError(f"{argv[:4]} exited {proc.returncode}: {err.decode()[-2000:]}")
    return out.decode()


@pytest.fixture
def aws_env(tmp_path: Path) -> dict[str, str]:
    config = tmp_path / "aws-config"
    config.write_text(
        "[default]\nregion = us-east-1\ns3 =\n    signature_version = s3v4\n"
        "    addressing_style = path\n"
    )
    return {
        "PATH": os.environ.get("PATH", ""),
        "HOME": str(tmp_path),
        "AWS_CONFIG_FILE": str(config),
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"),
    }


async def test_aws_cli(s3node: S3Domain, aws_env: dict[str, str], tmp_path: Path) -> None:
    created = json.loads(
        await run(
            str(BIN / "cim-place"),
            "s3",
            "key",
            "create",
            "--server",
            s3node.hub.url,
            "--json",
            "-m",
            "aws cli",
        )
    )
    listed = await run(str(BIN / "cim-place"), "s3", "key", "ls", "--server", s3node.hub.url)
    assert created["access_key"] in listed and created["secret_key"] not in listed
    env = {
        **aws_env,
        "AWS_ACCESS_KEY_ID": created["access_key"],
        "AWS_SECRET_ACCESS_KEY": created["secret_key"],
    }
    aws = [str(BIN / "aws"), "--endpoint-url", s3node.url]
    await run(*aws, "s3", "mb", "s3://cli-bucket", env=env)
    data = chacha_stream("aws-cli", 40 * 1024 * 1024 + 5).read()
    source = tmp_path / "big.bin"
    source.write_bytes(data)
    await run(*aws, "s3", "cp", str(source), "s3://cli-bucket/dir/big.bin", env=env)
    for i in range(5):
        (tmp_path / f"small{i}.txt").write_text(f"small {i}\n")
        await run(
            *aws, "s3", "cp", str(tmp_path / f"small{i}.txt"), f"s3://cli-bucket/s/{i}.txt", env=env
        )
    out = await run(*aws, "s3", "ls", "--recursive", "--page-size", "2", "s3://cli-bucket", env=env)
    keys = [line.split()[-1] for line in out.splitlines()]
    assert keys == ["dir/big.bin", *[f"s/{i}.txt" for i in range(5)]]
    head = json.loads(
        await run(
            *aws, "s3api", "head-object", "--bucket", "cli-bucket", "--key", "dir/big.bin", env=env
        )
    )
    assert head["ContentLength"] == len(data) and head["ETag"].endswith('-6"')
    back = tmp_path / "back.bin"
    await run(*aws, "s3", "cp", "s3://cli-bucket/dir/big.bin", str(back), env=env)
    assert hashlib.sha256(back.read_bytes()).digest() == hashlib.sha256(data).digest()
    await run(*aws, "s3", "cp", "s3://cli-bucket/s/1.txt", "s3://cli-bucket/copy.txt", env=env)
    url = (await run(*aws, "s3", "presign", "s3://cli-bucket/copy.txt", env=env)).strip()
    body = await asyncio.to_thread(lambda: urllib.request.urlopen(url).read())
    assert body == b"small 1\n"
    await run(*aws, "s3", "rm", "--recursive", "s3://cli-bucket", env=env)
    await run(*aws, "s3", "rb", "s3://cli-bucket", env=env)
    assert "cli-bucket" not in await run(*aws, "s3", "ls", env=env)
    # A removed key is refused (the S3 app trusts a looked-up key for at most 2 s).
    await run(
        str(BIN / "cim-place"), "s3", "key", "rm", created["access_key"], "--server", s3node.hub.url
    )
    await asyncio.sleep(2.5)
    with pytest.raises(AssertionError, match="InvalidAccessKeyId"):
        await run(*aws, "s3", "ls", env=env)

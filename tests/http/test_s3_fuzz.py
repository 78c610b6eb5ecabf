"""Malformed and garbled requests against the S3 API: every answer is a 4xx (or the
connection is refused as bad HTTP), the server keeps serving, and nothing is stored.

The count is ``S3_FUZZ_REQUESTS`` (2,000 by default; the issue's 10,000 with
``S3_FUZZ_REQUESTS=10000``); the seed is ``S3_FUZZ_SEED`` (17)."""

from __future__ import annotations

import asyncio
import os
import random

from cim_place.http.s3.sigv4 import presign_url
from tests.http.s3_support import S3Domain, s3node

__all__ = ["s3node"]

COUNT = int(os.environ.get("S3_FUZZ_REQUESTS", "2000"))
METHODS = [b"GET", b"PUT", b"POST", b"DELETE", b"HEAD", b"PATCH", b"G\x00T"]
PATHS = [
    b"/",
    b"/fuzz",
    b"/fuzz/k",
    b"/fuzz/k?uploads",
    b"/fuzz?delete",
    b"/fuzz/k?uploadId=zz",
    b"/fuzz/k?partNumber=1&uploadId=1",
    b"/%zz/%%",
    b"/fuzz?list-type=2&max-keys=-1",
]
HEADERS = [
    b"Authorization: AWS4-HMAC-SHA256 Credential=CPX/20260101/us-east-1/s3/aws4_request, "
    b"SignedHeaders=host;x-amz-date, Signature=00",
    b"Authorization: AWS AKID:abc",
    b"Authorization: AWS4-HMAC-SHA256 garbage",
    b"x-amz-content-sha256: STREAMING-AWS4-HMAC-SHA256-PAYLOAD",
    b"x-amz-date: 20260101T000000Z",
    b"Range: bytes=9-1",
    b"Content-MD5: !!!",
    b"x-amz-copy-source: /../..",
]


def garbled(rng: random.Random, host: bytes, valid_presigned: bytes) -> bytes:
    path = rng.choice([*PATHS, valid_presigned])
    headers = rng.sample(HEADERS, rng.randint(0, 4))
    body = rng.randbytes(rng.randint(0, 300))
    lines = [
        rng.choice(METHODS) + b" " + path + b" HTTP/1.1",
        b"Host: " + host,
        *headers,
        b"Content-Length: " + str(len(body)).encode(),
        b"Connection: close",
    ]
    raw = b"\r\n".join(lines) + b"\r\n\r\n" + body
    if rng.random() < 0.3:  # flip bytes anywhere, the request line included
        data = bytearray(raw)
        for _ in range(rng.randint(1, 5)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        raw = bytes(data)
    return raw


async def send(port: int, raw: bytes) -> int | None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(raw)
        await writer.drain()
        line = await asyncio.wait_for(reader.readline(), 10)
    finally:
        writer.close()
    parts = line.split()
    return int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else None


async def test_fuzzed_requests_are_refused(s3node: S3Domain) -> None:
    s3 = s3node.client()
    await asyncio.to_thread(s3.create_bucket, Bucket="fuzz")
    port = int(s3node.url.rsplit(":", 1)[1])
    host = s3node.url.split("//")[1].encode()
    from datetime import UTC, datetime

    # A correctly presigned GET of a missing key, used with garbled methods and headers.
    presigned = presign_url(
        method="GET",
        host=host.decode(),
        path="/fuzz/none",
        access_key=s3node.key.access_key,
        secret=s3node.key.secret_key,
        region="us-east-1",
        now=datetime.now(UTC),
    ).encode()
    rng = random.Random(int(os.environ.get("S3_FUZZ_SEED", "17")))
    statuses: dict[int | None, int] = {}
    for _ in range(COUNT):
        status = await send(port, garbled(rng, host, presigned))
        statuses[status] = statuses.get(status, 0) + 1
    assert all(s is None or 400 <= s < 500 for s in statuses), statuses
    listed = await asyncio.to_thread(s3.list_objects_v2, Bucket="fuzz")
    assert listed["KeyCount"] == 0
    assert [b["Name"] for b in (await asyncio.to_thread(s3.list_buckets))["Buckets"]] == ["fuzz"]
    assert not s3node.agent.volumes["v0"].pins.list()

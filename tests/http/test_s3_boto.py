"""The S3 API with boto3, against a real agent and nats-server: buckets, put/get/list with
pagination, ranges, conditionals, copy, delete, multipart (40 MiB), presigned GET, refusals."""

from __future__ import annotations

import asyncio
import hashlib
import io
import urllib.request
from typing import Any

import pytest
from botocore.exceptions import ClientError

from cim_place.cluster.nats.connection import connected, jetstream
from cim_place.cluster.nats.envelope import decode
from cim_place.cluster.state.names import NameRegistry
from cim_place.objectstore import unixfs
from cim_place.objectstore.blockstore import FsBlockStore
from cim_place.objectstore.cid import to_str
from cim_place.objectstore.testdata import chacha_stream
from tests.http.s3_support import S3Domain, s3node

__all__ = ["s3node"]


def code_of(exc: ClientError) -> str:
    return str(exc.response["Error"]["Code"])


def get_bytes(s3: Any, **params: Any) -> bytes:
    """GetObject and read the body, in the calling thread (run it with asyncio.to_thread)."""
    return bytes(s3.get_object(**params)["Body"].read())


def cid_of(data: bytes, tmp: Any) -> str:
    """The root CID `cim-place add` gives for ``data`` (default profile)."""
    with FsBlockStore(tmp) as blocks:
        result = unixfs.import_file(io.BytesIO(data), blocks, unixfs.get_profile("unixfs-v1-2025"))
    return to_str(result.root)


async def test_buckets_put_get_list_copy_delete(s3node: S3Domain, tmp_path: Any) -> None:
    s3 = s3node.client()
    run = asyncio.to_thread
    await run(s3.create_bucket, Bucket="shop")
    with pytest.raises(ClientError) as exc:
        await run(s3.create_bucket, Bucket="shop")
    assert code_of(exc.value) == "BucketAlreadyOwnedByYou"
    names = [b["Name"] for b in (await run(s3.list_buckets))["Buckets"]]
    assert names == ["shop"]
    await run(s3.head_bucket, Bucket="shop")
    location = await run(s3.get_bucket_location, Bucket="shop")
    assert location["LocationConstraint"] is None

    data = chacha_stream("s3-put", 3 * 1024 * 1024 + 17).read()
    put = await run(
        s3.put_object, Bucket="shop", Key="img/a b+c.bin", Body=data, Metadata={"colour": "red"}
    )
    assert put["ETag"] == f'"{hashlib.md5(data).hexdigest()}"'
    cid = cid_of(data, tmp_path / "ref")
    got = await run(s3.get_object, Bucket="shop", Key="img/a b+c.bin")
    assert await run(got["Body"].read) == data
    assert got["Metadata"] == {"colour": "red", "cid": cid}
    head = await run(s3.head_object, Bucket="shop", Key="img/a b+c.bin")
    assert head["ContentLength"] == len(data)

    part = await run(s3.get_object, Bucket="shop", Key="img/a b+c.bin", Range="bytes=100-199")
    assert await run(part["Body"].read) == data[100:200]
    assert part["ContentRange"] == f"bytes 100-199/{len(data)}"
    tail = await run(get_bytes, s3, Bucket="shop", Key="img/a b+c.bin", Range="bytes=-10")
    assert tail == data[-10:]
    with pytest.raises(ClientError) as exc:
        await run(s3.get_object, Bucket="shop", Key="img/a b+c.bin", Range=f"bytes={len(data)}-")
    assert code_of(exc.value) == "InvalidRange"
    with pytest.raises(ClientError) as exc:
        await run(s3.get_object, Bucket="shop", Key="img/a b+c.bin", IfNoneMatch=put["ETag"])
    assert exc.value.response["Error"]["Code"] == "304"
    with pytest.raises(ClientError) as exc:
        await run(s3.get_object, Bucket="shop", Key="img/a b+c.bin", IfMatch='"nope"')
    assert code_of(exc.value) == "PreconditionFailed"

    # The object is an object of the domain: its name points at the CID, the node pins it.
    async with connected(s3node.hub.url) as nc:
        record = await NameRegistry(jetstream(nc, "hub")).get("shop/img/a=20b=2Bc.bin")
    assert record is not None and to_str(record.cid) == cid
    pin = s3node.agent.pinned_on(record.cid)
    assert pin is not None and pin[1].metadata["s3-bucket"] == "shop"

    # Listing with pagination, v2 and v1.
    for i in range(7):
        await run(s3.put_object, Bucket="shop", Key=f"list/k{i:02d}", Body=b"x" * i)
    pages = s3.get_paginator("list_objects_v2").paginate(
        Bucket="shop", Prefix="list/", PaginationConfig={"PageSize": 3}
    )
    listed = await run(lambda: [o["Key"] for p in pages for o in p.get("Contents", [])])
    assert listed == [f"list/k{i:02d}" for i in range(7)]
    top = await run(s3.list_objects_v2, Bucket="shop", Delimiter="/")
    assert [p["Prefix"] for p in top["CommonPrefixes"]] == ["img/", "list/"]
    after = await run(s3.list_objects_v2, Bucket="shop", Prefix="list/", StartAfter="list/k04")
    assert [o["Key"] for o in after["Contents"]] == ["list/k05", "list/k06"]
    v1 = s3.get_paginator("list_objects").paginate(
        Bucket="shop", Prefix="list/", PaginationConfig={"PageSize": 2}
    )
    listed1 = await run(lambda: [o["Key"] for p in v1 for o in p.get("Contents", [])])
    assert listed1 == listed

    copied = await run(
        s3.copy_object, Bucket="shop", Key="copy.bin", CopySource="shop/img/a b+c.bin"
    )
    assert copied["CopyObjectResult"]["ETag"] == put["ETag"]
    assert await run(get_bytes, s3, Bucket="shop", Key="copy.bin") == data

    with pytest.raises(ClientError) as exc:
        await run(s3.delete_bucket, Bucket="shop")
    assert code_of(exc.value) == "BucketNotEmpty"
    await run(s3.delete_object, Bucket="shop", Key="img/a b+c.bin")
    with pytest.raises(ClientError) as exc:
        await run(s3.get_object, Bucket="shop", Key="img/a b+c.bin")
    assert code_of(exc.value) == "NoSuchKey"
    # copy.bin still names the content, so the node keeps it.
    assert s3node.agent.pinned_on(record.cid) is not None
    await run(s3.delete_object, Bucket="shop", Key="copy.bin")
    assert s3node.agent.pinned_on(record.cid) is None
    # Every put and delete is an event on the node's outbox.
    assert s3node.agent.nc is not None
    outbox = s3node.agent.nc.jetstream()
    for kind, key in (("ObjectCreated", "copy.bin"), ("ObjectRemoved", "copy.bin")):
        msg = await outbox.get_msg("OUTBOX_node-a", subject=f"cim.place.evt.node-a.s3.{kind}")
        event = decode(msg.data)
        assert event.content.type == f"s3.{kind}" and event.content.body["key"] == key
    result = await run(
        s3.delete_objects,
        Bucket="shop",
        Delete={"Objects": [{"Key": f"list/k{i:02d}"} for i in range(7)]},
    )
    assert len(result["Deleted"]) == 7
    await run(s3.delete_bucket, Bucket="shop")
    with pytest.raises(ClientError) as exc:
        await run(s3.head_object, Bucket="shop", Key="x")
    assert exc.value.response["Error"]["Code"] in ("404", "NoSuchBucket")


async def test_multipart_40_mib_same_cid_as_add(s3node: S3Domain, tmp_path: Any) -> None:
    from boto3.s3.transfer import TransferConfig

    s3 = s3node.client()
    await asyncio.to_thread(s3.create_bucket, Bucket="big")
    data = chacha_stream("s3-multipart", 40 * 1024 * 1024 + 123).read()
    source = tmp_path / "big.bin"
    source.write_bytes(data)
    config = TransferConfig(multipart_threshold=8 << 20, multipart_chunksize=8 << 20)
    await asyncio.to_thread(s3.upload_file, str(source), "big", "dir/big.bin", Config=config)
    head = await asyncio.to_thread(s3.head_object, Bucket="big", Key="dir/big.bin")
    assert head["ETag"].endswith('-6"')
    assert head["Metadata"]["cid"] == cid_of(data, tmp_path / "ref")
    out = tmp_path / "out.bin"
    await asyncio.to_thread(s3.download_file, "big", "dir/big.bin", str(out))
    assert out.read_bytes() == data


async def test_multipart_rules(s3node: S3Domain) -> None:
    s3 = s3node.client()
    run = asyncio.to_thread
    await run(s3.create_bucket, Bucket="mpu")
    upload = await run(s3.create_multipart_upload, Bucket="mpu", Key="k")
    uid = upload["UploadId"]
    p1 = await run(
        s3.upload_part, Bucket="mpu", Key="k", UploadId=uid, PartNumber=1, Body=b"a" * 10
    )
    p2 = await run(
        s3.upload_part, Bucket="mpu", Key="k", UploadId=uid, PartNumber=2, Body=b"b" * 10
    )
    parts = await run(s3.list_parts, Bucket="mpu", Key="k", UploadId=uid)
    assert [p["PartNumber"] for p in parts["Parts"]] == [1, 2]
    uploads = await run(s3.list_multipart_uploads, Bucket="mpu")
    assert [u["UploadId"] for u in uploads["Uploads"]] == [uid]
    listed = [{"PartNumber": 1, "ETag": p1["ETag"]}, {"PartNumber": 2, "ETag": p2["ETag"]}]
    for parts_given, code in (
        (listed, "EntityTooSmall"),
        (list(reversed(listed)), "InvalidPartOrder"),
        ([{"PartNumber": 1, "ETag": p2["ETag"]}], "InvalidPart"),
    ):
        with pytest.raises(ClientError) as exc:
            await run(
                s3.complete_multipart_upload,
                Bucket="mpu",
                Key="k",
                UploadId=uid,
                MultipartUpload={"Parts": parts_given},
            )
        assert code_of(exc.value) == code
    done = await run(
        s3.complete_multipart_upload,
        Bucket="mpu",
        Key="k",
        UploadId=uid,
        MultipartUpload={"Parts": listed[-1:]},
    )
    assert done["ETag"].endswith('-1"')
    assert await run(get_bytes, s3, Bucket="mpu", Key="k") == b"b" * 10
    other = await run(s3.create_multipart_upload, Bucket="mpu", Key="k2")
    await run(s3.abort_multipart_upload, Bucket="mpu", Key="k2", UploadId=other["UploadId"])
    with pytest.raises(ClientError) as exc:
        await run(s3.list_parts, Bucket="mpu", Key="k2", UploadId=other["UploadId"])
    assert code_of(exc.value) == "NoSuchUpload"


async def test_presigned_get_and_refusals(s3node: S3Domain) -> None:
    s3 = s3node.client()
    run = asyncio.to_thread
    await run(s3.create_bucket, Bucket="pre")
    await run(s3.put_object, Bucket="pre", Key="doc.txt", Body=b"hello presigned")
    url = await run(
        s3.generate_presigned_url, "get_object", Params={"Bucket": "pre", "Key": "doc.txt"}
    )
    body = await run(lambda: urllib.request.urlopen(url).read())
    assert body == b"hello presigned"
    tampered = url.replace("doc.txt", "doc.txx")
    with pytest.raises(urllib.error.HTTPError) as http_exc:
        await run(lambda: urllib.request.urlopen(tampered).read())
    assert http_exc.value.code == 403

    wrong = s3node.client(secret="not-the-secret")
    with pytest.raises(ClientError) as exc:
        await run(wrong.put_object, Bucket="pre", Key="evil", Body=b"x" * 1000)
    assert code_of(exc.value) == "SignatureDoesNotMatch"
    listed = await run(s3.list_objects_v2, Bucket="pre")
    assert [o["Key"] for o in listed["Contents"]] == ["doc.txt"]
    with pytest.raises(ClientError) as exc:
        await run(s3.get_object, Bucket="nope", Key="x")
    assert code_of(exc.value) == "NoSuchBucket"


async def test_get_from_a_node_that_does_not_hold_it(
    s3node: S3Domain, leaf_factory: Any, tmp_path: Any
) -> None:
    """Node B's S3 answers a GET of an object stored on node A: fetched, verified, streamed."""
    from aiohttp import web

    from cim_place.cluster.agent.config import AgentConfig, VolumeConfig
    from cim_place.cluster.agent.service import Agent
    from cim_place.cluster.exchange.fetch import wait_for_holder
    from cim_place.http.s3 import build_s3_app
    from tests.http.s3_support import s3_node_of

    s3 = s3node.client()
    await asyncio.to_thread(s3.create_bucket, Bucket="far")
    data = chacha_stream("s3-far", 2 * 1024 * 1024 + 3).read()
    put = await asyncio.to_thread(s3.put_object, Bucket="far", Key="k", Body=data)
    leaf = leaf_factory("node-b")
    agent = Agent(
        AgentConfig(
            node="node-b",
            volumes=(VolumeConfig("v0", tmp_path / "node-b"),),
            servers=(leaf.url,),
            heartbeat=0.5,
            inventory=3600,
        ),
        fsync="none",
    )
    await agent.start()
    runner = web.AppRunner(build_s3_app(s3_node_of(agent)), access_log=None)
    try:
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        assert agent.nc is not None
        cid = s3node.agent.volumes["v0"].pins.list()[0].root
        assert await wait_for_holder(agent.nc, "node-a")
        other = S3Domain(
            s3node.hub, agent, f"http://127.0.0.1:{runner.addresses[0][1]}", s3node.key, s3node.app
        ).client()
        got = await asyncio.to_thread(get_bytes, other, Bucket="far", Key="k")
        assert got == data
        assert put["ETag"] == f'"{hashlib.md5(data).hexdigest()}"'
        assert agent.pinned_on(cid) is None  # a cached read, not a replica
        # One read for demand at node-b, of bytes it had to fetch (docs/DEMAND.md).
        assert agent.demand is not None and agent.demand.reads_recorded == 1
        assert (agent.demand.bytes_remote, agent.demand.bytes_local) == (len(data), 0)
    finally:
        await runner.cleanup()
        await agent.stop(grace=1)


def streaming_put(domain: S3Domain, path: str, data: bytes, *, tamper: bool = False) -> int:
    """PUT with STREAMING-AWS4-HMAC-SHA256-PAYLOAD (aws-chunked, every chunk signed), as SDKs
    send over TLS; ``tamper`` changes a byte of the second chunk after signing."""
    import http.client
    from datetime import UTC, datetime

    from cim_place.http.s3 import sigv4

    now = datetime.now(UTC)
    amz_date = now.strftime("%Y%m%dT%H%M%SZ")
    credential = sigv4.Credential(domain.key.access_key, amz_date[:8], "us-east-1", "s3")
    host = domain.url.split("//")[1]
    headers = {
        "content-encoding": "aws-chunked",
        "host": host,
        "x-amz-content-sha256": sigv4.STREAMING,
        "x-amz-date": amz_date,
        "x-amz-decoded-content-length": str(len(data)),
    }
    names = sorted(headers)
    canonical = sigv4.canonical_request("PUT", path, [], headers, names, sigv4.STREAMING)
    key = sigv4.signing_key(domain.key.secret_key, credential)
    previous = sigv4.sign(key, sigv4.string_to_sign(amz_date, credential.scope, canonical))
    authorization = (
        f"AWS4-HMAC-SHA256 Credential={domain.key.access_key}/{credential.scope}, "
        f"SignedHeaders={';'.join(names)}, Signature={previous}"
    )
    pieces = [data[i : i + 65536] for i in range(0, len(data), 65536)] + [b""]
    body = bytearray()
    for n, piece in enumerate(pieces):
        text = (
            f"AWS4-HMAC-SHA256-PAYLOAD\n{amz_date}\n{credential.scope}\n{previous}\n"
            f"{sigv4.EMPTY_SHA256}\n{hashlib.sha256(piece).hexdigest()}"
        )
        previous = sigv4.sign(key, text)
        if tamper and n == 1:
            piece = b"X" + piece[1:]
        body += f"{len(piece):x};chunk-signature={previous}\r\n".encode() + piece + b"\r\n"
    connection = http.client.HTTPConnection(host)
    connection.request(
        "PUT", path, body=bytes(body), headers={**headers, "Authorization": authorization}
    )
    status = connection.getresponse().status
    connection.close()
    return status


async def test_streaming_signed_chunks(s3node: S3Domain) -> None:
    s3 = s3node.client()
    await asyncio.to_thread(s3.create_bucket, Bucket="chunks")
    data = chacha_stream("s3-chunked", 200_000).read()
    assert await asyncio.to_thread(streaming_put, s3node, "/chunks/ok", data) == 200
    assert await asyncio.to_thread(get_bytes, s3, Bucket="chunks", Key="ok") == data
    bad = await asyncio.to_thread(streaming_put, s3node, "/chunks/bad", data, tamper=True)
    assert bad == 403
    listed = await asyncio.to_thread(s3.list_objects_v2, Bucket="chunks")
    assert [o["Key"] for o in listed["Contents"]] == ["ok"]


async def test_unsupported_object_attributes_are_a_clear_501(s3node: S3Domain) -> None:
    s3 = s3node.client()
    run = asyncio.to_thread
    await run(s3.create_bucket, Bucket="attrs")
    await run(s3.put_object, Bucket="attrs", Key="k", Body=b"v")
    with pytest.raises(ClientError) as exc:
        await run(s3.get_object_attributes, Bucket="attrs", Key="k", ObjectAttributes=["ETag"])
    assert code_of(exc.value) == "NotImplemented"

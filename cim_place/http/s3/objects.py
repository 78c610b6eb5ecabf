"""Object operations: PutObject, GetObject/HeadObject, DeleteObject(s), CopyObject.

A PUT streams the body through the UnixFS importer into the volume with the most room (the
same import as ``cim-place add``, so the root CID is the same), the digests are checked before
the importer sees the end (a bad body pins nothing), then the context commits it to the domain.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from urllib.parse import unquote

from aiohttp import web

from cim_place.http.s3.body import Digests, aws_chunks, consume, plain_chunks
from cim_place.http.s3.context import BUCKET_LABEL, S3Context, check_key, domain_name
from cim_place.http.s3.errors import S3Error, no_such_key
from cim_place.http.s3.index import ObjectRecord
from cim_place.http.s3.ranges import check_conditions, parse_range
from cim_place.http.s3.request import S3Request
from cim_place.http.s3.sigv4 import STREAMING, STREAMING_UNSIGNED_TRAILER, ChunkSigner
from cim_place.http.s3.xml import document, element, error_entries, iso, parse_delete
from cim_place.interfaces import Pin
from cim_place.objectstore.cid import parse, to_str
from cim_place.objectstore.store import ObjectStore

MAX_PUT = 5 << 30
MAX_METADATA = 2048
STORED_HEADERS = (
    "content-type",
    "content-encoding",
    "content-disposition",
    "content-language",
    "cache-control",
    "expires",
)


def body_chunks(req: S3Request, digests: Digests) -> AsyncIterator[bytes]:
    mode = req.claim.payload_hash
    if mode == STREAMING:
        return aws_chunks(req.http.content, ChunkSigner(req.signing_key, req.claim), digests)
    if mode == STREAMING_UNSIGNED_TRAILER:
        return aws_chunks(req.http.content, None, digests)
    return plain_chunks(req.http.content)


def user_metadata(headers: Mapping[str, str]) -> dict[str, str]:
    meta = {k[len("x-amz-meta-") :]: v for k, v in headers.items() if k.startswith("x-amz-meta-")}
    meta.pop("cid", None)  # ours, never the client's
    if sum(len(k) + len(v) for k, v in meta.items()) > MAX_METADATA:
        raise S3Error("MetadataTooLarge", f"user metadata is larger than {MAX_METADATA} bytes")
    return meta


def stored_headers(headers: Mapping[str, str]) -> dict[str, str]:
    kept = {name: headers[name] for name in STORED_HEADERS if name in headers}
    encoding = kept.get("content-encoding", "")
    parts = [p.strip() for p in encoding.split(",") if p.strip() and p.strip() != "aws-chunked"]
    if parts:
        kept["content-encoding"] = ",".join(parts)
    else:
        kept.pop("content-encoding", None)
    return kept


def pin_metadata(bucket: str, meta: Mapping[str, str]) -> dict[str, str]:
    return {**meta, BUCKET_LABEL: bucket}


def object_headers(record: ObjectRecord) -> dict[str, str]:
    from cim_place.http.s3.xml import http_date

    headers = {
        "ETag": f'"{record.etag}"',
        "Last-Modified": http_date(record.mtime),
        "Accept-Ranges": "bytes",
        "Content-Type": record.headers.get("content-type", "binary/octet-stream"),
        "x-amz-meta-cid": record.cid,
    }
    for name, value in record.headers.items():
        if name != "content-type" and not name.startswith("x-amz-checksum"):
            headers[name] = value
    for name, value in record.metadata.items():
        headers[f"x-amz-meta-{name}"] = value
    return headers


async def put_object(ctx: S3Context, req: S3Request) -> web.StreamResponse:
    await ctx.need_bucket(req.bucket)
    key = check_key(req.key)
    meta = user_metadata(req.headers)
    kept = stored_headers(req.headers)
    size_hint = req.headers.get("x-amz-decoded-content-length") or req.headers.get("content-length")
    store = ctx.volume_for(int(size_hint) if size_hint and size_hint.isdigit() else None)
    digests = Digests(req.headers, req.claim.payload_hash)
    name = domain_name(req.bucket, key)
    labels = pin_metadata(req.bucket, meta)

    def add(pipe: object) -> Pin:
        return store.add(pipe, name=name, owner=req.access_key, metadata=labels)  # type: ignore[arg-type]

    pin = await consume(body_chunks(req, digests), digests, add, ctx.executor, max_size=MAX_PUT)
    crc = req.headers.get("x-amz-checksum-crc32") or digests.trailers.get("x-amz-checksum-crc32")
    if crc:
        kept["x-amz-checksum-crc32"] = crc
    record = ObjectRecord(
        key, to_str(pin.root), digests.md5.hexdigest(), pin.size, time.time(), meta, kept, ctx.node
    )
    await ctx.commit(req.bucket, record, pin, req.access_key)
    headers = {"ETag": f'"{record.etag}"', "x-amz-meta-cid": record.cid}
    if crc:
        headers["x-amz-checksum-crc32"] = crc
    return web.Response(status=200, headers=headers)


async def get_object(ctx: S3Context, req: S3Request) -> web.StreamResponse:
    await ctx.need_bucket(req.bucket)
    record = await ctx.index.get(req.bucket, check_key(req.key))
    if record is None:
        raise no_such_key(req.key)
    headers = object_headers(record)
    verdict = check_conditions(req.headers, record.etag, record.mtime)
    if verdict == 304:
        return web.Response(status=304, headers={k: headers[k] for k in ("ETag", "Last-Modified")})
    if verdict == 412:
        raise S3Error("PreconditionFailed", "a precondition of the request does not hold", 412)
    span = parse_range(req.headers.get("range"), record.size)
    status = 200
    first, length = 0, record.size
    if span is not None:
        status = 206
        first, length = span[0], span[1] - span[0] + 1
        headers["Content-Range"] = f"bytes {span[0]}-{span[1]}/{record.size}"
    elif req.headers.get("x-amz-checksum-mode", "").upper() == "ENABLED":
        crc = record.headers.get("x-amz-checksum-crc32")
        if crc:
            headers["x-amz-checksum-crc32"] = crc
    headers["Content-Length"] = str(length)
    root = parse(record.cid)
    store = ctx.holder(root) or await ctx.fetched(root, record.size)
    if store is None:
        raise S3Error(
            "ServiceUnavailable",
            f"{record.cid} is not held on node {ctx.node} and no node holding it answers",
        )
    response = web.StreamResponse(status=status, headers=headers)
    await response.prepare(req.http)
    if req.http.method == "HEAD" or length == 0:
        await response.write_eof()
        return response
    if ctx.on_read is not None:  # demand counting (docs/DEMAND.md)
        ctx.on_read(root, req.access_key, length)
    with contextlib.suppress(ConnectionResetError):  # the client went away
        await _stream(ctx, store, record, first, length, response)
    return response


async def _stream(
    ctx: S3Context,
    store: ObjectStore,
    record: ObjectRecord,
    first: int,
    length: int,
    response: web.StreamResponse,
) -> None:
    loop = asyncio.get_running_loop()
    pieces: Iterator[bytes] = store.cat(parse(record.cid), first, length)
    end = object()
    while True:
        piece = await loop.run_in_executor(ctx.executor, next, pieces, end)
        if piece is end:
            break
        assert isinstance(piece, bytes)
        await response.write(piece)
    await response.write_eof()


async def delete_object(ctx: S3Context, req: S3Request) -> web.StreamResponse:
    await ctx.need_bucket(req.bucket)
    await ctx.remove(req.bucket, check_key(req.key), req.access_key)
    return web.Response(status=204)


async def delete_objects(ctx: S3Context, req: S3Request) -> web.StreamResponse:
    await ctx.need_bucket(req.bucket)
    digests = Digests(req.headers, req.claim.payload_hash)
    body = await read_small(req, digests)
    request = parse_delete(body)
    deleted: list[str] = []
    failed: list[tuple[str, S3Error]] = []
    for key in request.keys:
        try:
            await ctx.remove(req.bucket, check_key(key), req.access_key)
            deleted.append(key)
        except S3Error as exc:
            failed.append((key, exc))
    inner = [] if request.quiet else [f"<Deleted>{element('Key', k)}</Deleted>" for k in deleted]
    inner += error_entries(failed)
    return web.Response(body=document("DeleteResult", inner), content_type="application/xml")


async def read_small(req: S3Request, digests: Digests, limit: int = 1 << 20) -> bytes:
    """A small body (XML), whole, with its digests checked."""
    data = bytearray()
    async for chunk in body_chunks(req, digests):
        digests.update(chunk)
        data += chunk
        if len(data) > limit:
            raise S3Error("MalformedXML", f"the request body is larger than {limit} bytes")
    digests.check()
    return bytes(data)


def copy_source(header: str) -> tuple[str, str]:
    source = unquote(header.split("?", 1)[0]).lstrip("/")
    bucket, _, key = source.partition("/")
    if not bucket or not key:
        raise S3Error("InvalidArgument", "x-amz-copy-source must be /bucket/key")
    return bucket, key


async def copy_object(ctx: S3Context, req: S3Request) -> web.StreamResponse:
    await ctx.need_bucket(req.bucket)
    key = check_key(req.key)
    src_bucket, src_key = copy_source(req.headers["x-amz-copy-source"])
    await ctx.need_bucket(src_bucket)
    source = await ctx.index.get(src_bucket, check_key(src_key))
    if source is None:
        raise no_such_key(src_key)
    verdict = check_conditions(
        {
            k[len("x-amz-copy-source-") :]: v
            for k, v in req.headers.items()
            if k.startswith("x-amz-copy-source-if-")
        },
        source.etag,
        source.mtime,
    )
    if verdict is not None:
        raise S3Error("PreconditionFailed", "a copy-source precondition does not hold", 412)
    replace = req.headers.get("x-amz-metadata-directive", "COPY").upper() == "REPLACE"
    if (src_bucket, src_key) == (req.bucket, key) and not replace:
        raise S3Error(
            "InvalidRequest",
            "copying an object onto itself needs x-amz-metadata-directive: REPLACE",
        )
    meta = user_metadata(req.headers) if replace else dict(source.metadata)
    kept = stored_headers(req.headers) if replace else dict(source.headers)
    root = parse(source.cid)
    store = ctx.holder(root)
    if store is None:
        raise S3Error("ServiceUnavailable", f"{source.cid} is not held on node {ctx.node}")
    # Content-addressed: the copy is the same DAG; pinning it again records the new name.
    pin = await asyncio.get_running_loop().run_in_executor(
        ctx.executor,
        lambda: store.pin_complete(
            root,
            name=domain_name(req.bucket, key),
            owner=req.access_key,
            metadata=pin_metadata(req.bucket, meta),
        ),
    )
    record = ObjectRecord(
        key, source.cid, source.etag, source.size, time.time(), meta, kept, ctx.node, source.parts
    )
    await ctx.commit(req.bucket, record, pin, req.access_key)
    body = document(
        "CopyObjectResult",
        [element("LastModified", iso(record.mtime)), element("ETag", f'"{record.etag}"')],
    )
    return web.Response(
        body=body, content_type="application/xml", headers={"x-amz-meta-cid": record.cid}
    )

"""Multipart uploads: create, upload part (and part copy), complete, abort, list parts/uploads.

Parts are written to part files in the volume chosen when the upload starts
(``<volume>/s3-uploads/<upload id>/<part>``): on disk, never in memory, and outside the block
store, so garbage collection cannot take them and no half-object is ever pinned or announced.
Completion streams the listed part files, in order, through the same UnixFS importer as
``cim-place add``: the object is one UnixFS file DAG whose root CID is exactly what ``cim-place
add`` gives for the same bytes. The ETag is S3's: MD5 of the parts' binary MD5s, ``-N``.
An upload belongs to the node that created it.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import secrets
import shutil
import time
from pathlib import Path
from typing import Any

from aiohttp import web

from cim_place.http.s3.body import BodyPipe, Digests, consume
from cim_place.http.s3.context import S3Context, check_key, domain_name
from cim_place.http.s3.errors import S3Error, no_such_key
from cim_place.http.s3.index import ObjectRecord, PartRecord, UploadRecord
from cim_place.http.s3.objects import (
    body_chunks,
    copy_source,
    pin_metadata,
    stored_headers,
    user_metadata,
)
from cim_place.http.s3.ranges import parse_range
from cim_place.http.s3.request import S3Request
from cim_place.http.s3.xml import document, element, iso, parse_complete
from cim_place.interfaces import Pin
from cim_place.objectstore.cid import parse, to_str

MIN_PART = 5 << 20
"""Every part but the last must be at least this big (S3's rule)."""
MAX_PART = 5 << 30
MAX_PARTS = 10_000
_XML = "application/xml"


def _dir(ctx: S3Context, upload: UploadRecord) -> Path:
    store = ctx.volumes.get(upload.volume)
    if store is None:
        raise S3Error("NoSuchUpload", f"the volume {upload.volume} of this upload is gone")
    return store.path / "s3-uploads" / upload.upload_id


async def _upload(ctx: S3Context, req: S3Request) -> UploadRecord:
    await ctx.need_bucket(req.bucket)
    upload = await ctx.index.upload(req.query.get("uploadId", ""))
    if upload is None or (upload.bucket, upload.key) != (req.bucket, req.key):
        raise S3Error("NoSuchUpload", "no such multipart upload (completed or aborted?)")
    if upload.node != ctx.node:
        raise S3Error(
            "NoSuchUpload", f"the upload was started on node {upload.node}; send its parts there"
        )
    return upload


def _part_number(req: S3Request) -> int:
    text = req.query.get("partNumber", "")
    if not text.isdigit() or not 1 <= int(text) <= MAX_PARTS:
        raise S3Error("InvalidArgument", f"partNumber must be 1-{MAX_PARTS}")
    return int(text)


async def create(ctx: S3Context, req: S3Request) -> web.StreamResponse:
    await ctx.need_bucket(req.bucket)
    key = check_key(req.key)
    store = ctx.volume_for(None)
    upload = UploadRecord(
        secrets.token_hex(16),
        req.bucket,
        key,
        ctx.node,
        ctx.volume_name(store),
        time.time(),
        user_metadata(req.headers),
        stored_headers(req.headers),
    )
    await ctx.index.put_upload(upload)
    inner = [
        element("Bucket", req.bucket),
        element("Key", key),
        element("UploadId", upload.upload_id),
    ]
    return web.Response(body=document("InitiateMultipartUploadResult", inner), content_type=_XML)


def _write_part(path: Path, source: Any) -> None:
    tmp = path.with_suffix(".tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(tmp, "wb") as out:
        shutil.copyfileobj(source, out, 1 << 20)
    os.replace(tmp, path)


async def upload_part(ctx: S3Context, req: S3Request) -> web.StreamResponse:
    upload = await _upload(ctx, req)
    number = _part_number(req)
    path = _dir(ctx, upload) / f"{number:05d}"
    if "x-amz-copy-source" in req.headers:
        return await _copy_part(ctx, req, upload, number, path)
    digests = Digests(req.headers, req.claim.payload_hash)

    def write(pipe: BodyPipe) -> None:
        _write_part(path, pipe)

    await consume(body_chunks(req, digests), digests, write, ctx.executor, max_size=MAX_PART)
    etag = digests.md5.hexdigest()
    await ctx.index.put_part(upload.upload_id, PartRecord(number, etag, digests.size, time.time()))
    headers = {"ETag": f'"{etag}"'}
    crc = req.headers.get("x-amz-checksum-crc32")
    if crc:
        headers["x-amz-checksum-crc32"] = crc
    return web.Response(status=200, headers=headers)


async def _copy_part(
    ctx: S3Context, req: S3Request, upload: UploadRecord, number: int, path: Path
) -> web.StreamResponse:
    src_bucket, src_key = copy_source(req.headers["x-amz-copy-source"])
    await ctx.need_bucket(src_bucket)
    source = await ctx.index.get(src_bucket, check_key(src_key))
    if source is None:
        raise no_such_key(src_key)
    span = parse_range(req.headers.get("x-amz-copy-source-range"), source.size)
    if span is not None and _range_end(req.headers["x-amz-copy-source-range"]) >= source.size:
        # Unlike a GET, a part copy does not clamp its range to the object.
        raise S3Error("InvalidRange", f"the copy range ends past the source ({source.size} bytes)")
    first, length = (0, source.size) if span is None else (span[0], span[1] - span[0] + 1)
    store = ctx.holder(parse(source.cid))
    if store is None:
        raise S3Error("ServiceUnavailable", f"{source.cid} is not held on node {ctx.node}")

    def copy() -> tuple[str, int]:
        md5 = hashlib.md5()
        tmp = path.with_suffix(".tmp")
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as out:
            for piece in store.cat(parse(source.cid), first, length):
                md5.update(piece)
                out.write(piece)
        os.replace(tmp, path)
        return md5.hexdigest(), length

    etag, size = await asyncio.get_running_loop().run_in_executor(ctx.executor, copy)
    now = time.time()
    await ctx.index.put_part(upload.upload_id, PartRecord(number, etag, size, now))
    inner = [element("LastModified", iso(now)), element("ETag", f'"{etag}"')]
    return web.Response(body=document("CopyPartResult", inner), content_type=_XML)


def _range_end(header: str) -> int:
    """The last byte a ``bytes=first-last`` range names (-1 when it names none)."""
    last = header.strip().rpartition("-")[2]
    return int(last) if last.isdigit() else -1


class _Concat:
    """The part files one after the other, as one file for the importer."""

    def __init__(self, paths: list[Path]) -> None:
        self._paths = paths
        self._file: Any = None

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        filled = 0
        while filled < len(view):
            if self._file is None:
                if not self._paths:
                    break
                self._file = open(self._paths.pop(0), "rb")  # noqa: SIM115
            n = self._file.readinto(view[filled:])
            if not n:
                self._file.close()
                self._file = None
                continue
            filled += n
        return filled

    def read(self, size: int = -1, /) -> bytes:
        buffer = bytearray(size if size >= 0 else 1 << 20)
        return bytes(buffer[: self.readinto(buffer)])


async def complete(ctx: S3Context, req: S3Request) -> web.StreamResponse:
    upload = await _upload(ctx, req)
    digests = Digests(req.headers, req.claim.payload_hash)
    from cim_place.http.s3.objects import read_small

    listed = parse_complete(await read_small(req, digests))
    stored = {p.number: p for p in await ctx.index.parts(upload.upload_id)}
    numbers = [p.number for p in listed]
    if numbers != sorted(set(numbers)):
        raise S3Error("InvalidPartOrder", "parts must be listed in ascending order, once each")
    for i, part in enumerate(listed):
        have = stored.get(part.number)
        if have is None or have.etag != part.etag:
            raise S3Error("InvalidPart", f"part {part.number} was not uploaded with that ETag")
        if i < len(listed) - 1 and have.size < MIN_PART:
            raise S3Error(
                "EntityTooSmall",
                f"part {part.number} is {have.size} bytes; all but the last "
                f"part must be at least {MIN_PART} bytes",
            )
    folder = _dir(ctx, upload)
    paths = [folder / f"{p.number:05d}" for p in listed]
    store = ctx.volumes[upload.volume]
    name = domain_name(upload.bucket, upload.key)
    labels = pin_metadata(upload.bucket, upload.metadata)

    def add() -> Pin:
        return store.add(_Concat(paths), name=name, owner=req.access_key, metadata=labels)  # type: ignore[arg-type]

    pin = await asyncio.get_running_loop().run_in_executor(ctx.executor, add)
    joined = b"".join(bytes.fromhex(stored[p.number].etag) for p in listed)
    etag = f"{hashlib.md5(joined).hexdigest()}-{len(listed)}"
    record = ObjectRecord(
        upload.key,
        to_str(pin.root),
        etag,
        pin.size,
        time.time(),
        dict(upload.metadata),
        dict(upload.headers),
        ctx.node,
        len(listed),
    )
    await ctx.commit(upload.bucket, record, pin, req.access_key)
    await _forget(ctx, upload)
    inner = [
        element("Location", f"/{upload.bucket}/{upload.key}"),
        element("Bucket", upload.bucket),
        element("Key", upload.key),
        element("ETag", f'"{etag}"'),
    ]
    return web.Response(
        body=document("CompleteMultipartUploadResult", inner),
        content_type=_XML,
        headers={"x-amz-meta-cid": record.cid},
    )


async def _forget(ctx: S3Context, upload: UploadRecord) -> None:
    folder = _dir(ctx, upload)
    await ctx.index.drop_upload(upload.upload_id)
    await asyncio.get_running_loop().run_in_executor(
        ctx.executor, lambda: shutil.rmtree(folder, ignore_errors=True)
    )


async def abort(ctx: S3Context, req: S3Request) -> web.StreamResponse:
    upload = await _upload(ctx, req)
    await _forget(ctx, upload)
    return web.Response(status=204)


async def list_parts(ctx: S3Context, req: S3Request) -> web.StreamResponse:
    upload = await _upload(ctx, req)
    marker_text = req.query.get("part-number-marker", "0")
    limit_text = req.query.get("max-parts", "1000")
    if not marker_text.isdigit() or not limit_text.isdigit():
        raise S3Error("InvalidArgument", "part-number-marker and max-parts are numbers")
    marker, limit = int(marker_text), min(int(limit_text), 1000)
    parts = [p for p in await ctx.index.parts(upload.upload_id) if p.number > marker]
    shown, truncated = parts[:limit], len(parts) > limit
    inner = [
        element("Bucket", upload.bucket),
        element("Key", upload.key),
        element("UploadId", upload.upload_id),
        element("PartNumberMarker", marker),
        element("MaxParts", limit),
        element("IsTruncated", "true" if truncated else "false"),
    ]
    if shown:
        inner.append(element("NextPartNumberMarker", shown[-1].number))
    inner += [
        "<Part>"
        + element("PartNumber", p.number)
        + element("LastModified", iso(p.mtime))
        + element("ETag", f'"{p.etag}"')
        + element("Size", p.size)
        + "</Part>"
        for p in shown
    ]
    return web.Response(body=document("ListPartsResult", inner), content_type=_XML)


async def list_uploads(ctx: S3Context, req: S3Request) -> web.StreamResponse:
    await ctx.need_bucket(req.bucket)
    prefix = req.query.get("prefix", "")
    uploads = sorted(
        (
            u
            for u in await ctx.index.uploads()
            if u.bucket == req.bucket and u.key.startswith(prefix)
        ),
        key=lambda u: (u.key, u.initiated),
    )
    inner = [
        element("Bucket", req.bucket),
        element("Prefix", prefix),
        element("MaxUploads", 1000),
        element("IsTruncated", "false"),
    ]
    inner += [
        "<Upload>"
        + element("Key", u.key)
        + element("UploadId", u.upload_id)
        + element("Initiated", iso(u.initiated))
        + element("StorageClass", "STANDARD")
        + "</Upload>"
        for u in uploads
    ]
    return web.Response(body=document("ListMultipartUploadsResult", inner), content_type=_XML)

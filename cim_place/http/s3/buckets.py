"""Bucket operations: list, create, head, delete (only when empty), location, and the two
object listings (ListObjects v1 with markers, ListObjectsV2 with continuation tokens)."""

from __future__ import annotations

import time
from urllib.parse import quote

from aiohttp import web

from cim_place.http.s3.context import S3Context, check_bucket_name
from cim_place.http.s3.errors import S3Error
from cim_place.http.s3.index import BucketRecord, ObjectRecord
from cim_place.http.s3.listing import after_token, max_keys_of, page, token_of
from cim_place.http.s3.request import S3Request
from cim_place.http.s3.xml import document, element, iso, parse_location

_XML = "application/xml"


def _xml(root: str, inner: list[str]) -> web.Response:
    return web.Response(body=document(root, inner), content_type=_XML)


async def list_buckets(ctx: S3Context, req: S3Request) -> web.StreamResponse:
    entries = [
        "<Bucket>" + element("Name", b.name) + element("CreationDate", iso(b.created)) + "</Bucket>"
        for b in await ctx.index.buckets()
    ]
    owner = "<Owner>" + element("ID", req.access_key) + element("DisplayName", req.access_key)
    return _xml("ListAllMyBucketsResult", [owner + "</Owner>", "<Buckets>", *entries, "</Buckets>"])


async def create_bucket(ctx: S3Context, req: S3Request) -> web.StreamResponse:
    name = check_bucket_name(req.bucket)
    body = await req.http.content.read(1 << 20)
    region = parse_location(body) or req.claim.credential.region
    record = BucketRecord(name, time.time(), region, req.access_key)
    if not await ctx.index.create_bucket(record):
        existing = await ctx.index.bucket(name)
        if existing is not None and existing.owner != req.access_key:
            raise S3Error("BucketAlreadyExists", f"the bucket {name!r} exists", 409)
        raise S3Error("BucketAlreadyOwnedByYou", f"you own the bucket {name!r} already")
    return web.Response(status=200, headers={"Location": f"/{name}"})


async def head_bucket(ctx: S3Context, req: S3Request) -> web.StreamResponse:
    record = await ctx.need_bucket(req.bucket)
    return web.Response(status=200, headers={"x-amz-bucket-region": record.region})


async def delete_bucket(ctx: S3Context, req: S3Request) -> web.StreamResponse:
    await ctx.need_bucket(req.bucket)
    if await ctx.index.objects(req.bucket, limit=1):
        raise S3Error("BucketNotEmpty", f"the bucket {req.bucket!r} holds objects; delete them")
    await ctx.index.delete_bucket(req.bucket)
    return web.Response(status=204)


async def get_location(ctx: S3Context, req: S3Request) -> web.StreamResponse:
    record = await ctx.need_bucket(req.bucket)
    region = "" if record.region == "us-east-1" else record.region
    return web.Response(
        body=(
            '<?xml version="1.0" encoding="UTF-8"?>\n<LocationConstraint '
            f'xmlns="http://s3.amazonaws.com/doc/2006-03-01/">{region}</LocationConstraint>'
        ).encode(),
        content_type=_XML,
    )


async def get_versioning(ctx: S3Context, req: S3Request) -> web.StreamResponse:
    await ctx.need_bucket(req.bucket)
    return _xml("VersioningConfiguration", [])


def _encoder(req: S3Request) -> tuple[str, ...]:
    kind = req.query.get("encoding-type")
    if kind is not None and kind != "url":
        raise S3Error("InvalidArgument", "encoding-type must be url")
    return () if kind is None else (kind,)


def _contents(record: ObjectRecord, enc: tuple[str, ...], owner: bool) -> str:
    inner = (
        element("Key", _enc(record.key, enc))
        + element("LastModified", iso(record.mtime))
        + element("ETag", f'"{record.etag}"')
        + element("Size", record.size)
        + element("StorageClass", "STANDARD")
    )
    if owner:
        inner += "<Owner>" + element("ID", "cim-place") + "</Owner>"
    return f"<Contents>{inner}</Contents>"


def _true(value: str | None) -> bool:
    return value is not None and value.lower() == "true"


def _enc(text: str, enc: tuple[str, ...]) -> str:
    return quote(text, safe="/") if enc else text


async def _listing(
    ctx: S3Context, req: S3Request, after: str, *, encode_prefix: bool = True
) -> tuple[list[str], bool, str]:
    """The common elements of both listings, whether truncated, and the resume point.

    ListObjects v1 sends its Prefix back as given even with encoding-type=url (what clients
    decode there: Delimiter, Marker, NextMarker, keys; ``encode_prefix=False``)."""
    await ctx.need_bucket(req.bucket)
    enc = _encoder(req)
    prefix = req.query.get("prefix", "")
    delimiter = req.query.get("delimiter", "")
    max_keys = max_keys_of(req.query.get("max-keys"))
    keys, by_key = await ctx.index.ordered(req.bucket)
    result = page(keys, prefix=prefix, delimiter=delimiter, after=after, max_keys=max_keys)
    inner = [
        element("Name", req.bucket),
        element("Prefix", _enc(prefix, enc if encode_prefix else ())),
        element("MaxKeys", max_keys),
        element("IsTruncated", "true" if result.truncated else "false"),
    ]
    if delimiter:
        inner.append(element("Delimiter", _enc(delimiter, enc)))
    if enc:
        inner.append(element("EncodingType", "url"))
    inner += [_contents(by_key[k], enc, _true(req.query.get("fetch-owner"))) for k in result.keys]
    inner += [
        f"<CommonPrefixes>{element('Prefix', _enc(p, enc))}</CommonPrefixes>"
        for p in result.prefixes
    ]
    inner.append(f"<!--{len(result.keys) + len(result.prefixes)}-->")
    return inner, result.truncated, result.last


async def list_objects_v2(ctx: S3Context, req: S3Request) -> web.StreamResponse:
    token = req.query.get("continuation-token")
    start_after = req.query.get("start-after", "")
    after = after_token(token) if token is not None else start_after
    inner, truncated, last = await _listing(ctx, req, after)
    count = inner.pop()[4:-3]
    inner.append(element("KeyCount", count))
    if token is not None:
        inner.append(element("ContinuationToken", token))
    if start_after:
        inner.append(element("StartAfter", _enc(start_after, _encoder(req))))
    if truncated:
        inner.append(element("NextContinuationToken", token_of(last)))
    return _xml("ListBucketResult", inner)


async def list_objects(ctx: S3Context, req: S3Request) -> web.StreamResponse:
    marker = req.query.get("marker", "")
    inner, truncated, last = await _listing(ctx, req, marker, encode_prefix=False)
    inner.pop()
    inner.append(element("Marker", _enc(marker, _encoder(req))))
    if truncated and req.query.get("delimiter"):
        inner.append(element("NextMarker", _enc(last, _encoder(req))))
    return _xml("ListBucketResult", inner)


async def list_object_versions(ctx: S3Context, req: S3Request) -> web.StreamResponse:
    """ListObjectVersions of a bucket that never versions: each object is its one version,
    ``null`` and latest (what tools that clean a bucket version by version expect)."""
    marker = req.query.get("key-marker", "")
    inner, truncated, last = await _listing(ctx, req, marker)
    inner.pop()
    inner = [
        part.replace("<Contents>", "<Version>")
        .replace("</Contents>", "</Version>")
        .replace(
            "<LastModified>",
            "<VersionId>null</VersionId><IsLatest>true</IsLatest><LastModified>",
            1,
        )
        for part in inner
    ]
    inner.append(element("KeyMarker", _enc(marker, _encoder(req))))
    if truncated:
        inner.append(element("NextKeyMarker", _enc(last, _encoder(req))))
        inner.append(element("NextVersionIdMarker", "null"))
    return _xml("ListVersionsResult", inner)

"""The S3 aiohttp application: authentication, routing by method and query, error answers.

``build_s3_app`` takes the node's collaborators explicitly, so the agent mounts it on its own
listener and tests run it beside a real agent. Every request must be signed with SigV4 (header or
presigned URL) by a key of KV ``cim-place-s3-keys``; there is no anonymous access. Path-style
addressing (``/bucket/key``); virtual-host style when the Host is ``<bucket>.<suffix>`` for one
of ``virtual_host_suffixes``.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import unquote

from aiohttp import web
from nats.js.client import JetStreamContext

from cim_place.cluster.events.publisher import EventPublisher
from cim_place.cluster.nats.subjects import Subjects
from cim_place.cluster.state.names import NameRegistry
from cim_place.errors import CimPlaceError, StoreFullError
from cim_place.http.s3 import buckets, multipart, objects
from cim_place.http.s3.context import OnPinned, OnUnpinned, S3Context
from cim_place.http.s3.errors import S3Error
from cim_place.http.s3.index import S3Index
from cim_place.http.s3.keys import DEFAULT_REGION, KeyStore, S3Key
from cim_place.http.s3.request import S3Request
from cim_place.http.s3.sigv4 import (
    parse_authorization,
    parse_presigned,
    parse_query,
    verify,
)
from cim_place.objectstore.cid import Cid
from cim_place.objectstore.store import ObjectStore

_log = logging.getLogger(__name__)
_KEY_CACHE_SECONDS = 2.0
"""How long a looked-up key is trusted: a removed key stops working within this time."""


Handler = Callable[[S3Context, S3Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True, slots=True)
class S3Node:
    """The collaborators of the S3 API on one node."""

    node: str
    volumes: Mapping[str, ObjectStore]
    volume_for: Callable[[int | None], ObjectStore]
    js_hub: JetStreamContext
    events: EventPublisher
    on_pinned: OnPinned
    on_unpinned: OnUnpinned
    nc: Any = None
    """The node's NATS connection: with it, a GET of content held only by other nodes fetches
    it through the domain's verified fetch; without it, such a GET is ServiceUnavailable."""
    subjects: Subjects = field(default_factory=Subjects)
    names_writable: bool = True
    """False where agents may not write domain names (a domain with users): S3 objects are then
    not named ``BUCKET/KEY`` (docs/S3.md)."""
    on_read: Callable[[Cid, str | None, int], None] | None = None
    """Told of each object GET (root, access key, bytes): demand counting, docs/DEMAND.md."""


S3_CONTEXT = web.AppKey("s3", S3Context)


def build_s3_app(
    node: S3Node,
    *,
    region: str = DEFAULT_REGION,
    virtual_host_suffixes: tuple[str, ...] = (),
) -> web.Application:
    ctx = S3Context(
        node=node.node,
        volumes=node.volumes,
        volume_for=node.volume_for,
        index=S3Index(node.js_hub),
        keys=KeyStore(node.js_hub),
        names=NameRegistry(node.js_hub),
        events=node.events,
        on_pinned=node.on_pinned,
        on_unpinned=node.on_unpinned,
        region=region,
        nc=node.nc,
        subjects=node.subjects,
        on_read=node.on_read,
        name_objects=node.names_writable,
    )
    cache: dict[str, tuple[float, S3Key | None]] = {}

    async def lookup(access: str) -> S3Key | None:
        hit = cache.get(access)
        if hit is not None and time.monotonic() - hit[0] < _KEY_CACHE_SECONDS:
            return hit[1]
        key = await ctx.keys.get(access)
        if len(cache) > 10_000:
            cache.clear()
        cache[access] = (time.monotonic(), key)
        return key

    async def handle(request: web.Request) -> web.StreamResponse:
        request_id = secrets.token_hex(8).upper()
        try:
            parsed = await _authenticate(request, lookup, virtual_host_suffixes)
            response = await _route(parsed)(ctx, parsed)
        except S3Error as exc:
            response = _error(request, exc, request_id)
        except (UnicodeError, ValueError) as exc:
            # Bytes no S3 client sends (undecodable text, impossible numbers): a 400, not a 500.
            bad = S3Error("InvalidRequest", f"the request cannot be read: {exc}"[:200])
            response = _error(request, bad, request_id)
        except StoreFullError as exc:
            response = _error(request, S3Error("EntityTooLarge", str(exc), 507), request_id)
        except CimPlaceError as exc:
            _log.warning("S3 %s %s failed: %s", request.method, request.path, exc)
            response = _error(request, S3Error("ServiceUnavailable", str(exc)), request_id)
        response.headers["x-amz-request-id"] = request_id
        return response

    app = web.Application(client_max_size=1 << 20)
    app.router.add_route("*", "/{tail:.*}", handle)

    async def close(_: web.Application) -> None:
        ctx.executor.shutdown(wait=False, cancel_futures=True)

    app.on_cleanup.append(close)
    app[S3_CONTEXT] = ctx
    return app


def _error(request: web.Request, exc: S3Error, request_id: str) -> web.Response:
    if request.method == "HEAD":
        return web.Response(status=exc.status, headers={"x-amz-error-code": exc.code})
    return web.Response(
        status=exc.status,
        body=exc.body(request.path, request_id),
        content_type="application/xml",
    )


def _split(request: web.Request, suffixes: tuple[str, ...]) -> tuple[str, str]:
    raw = request.raw_path.split("?", 1)[0]
    host = request.headers.get("Host", "").rsplit(":", 1)[0].lower()
    for suffix in suffixes:
        if host.endswith("." + suffix):
            return host[: -len(suffix) - 1], unquote(raw[1:])
    bucket, _, key = raw.lstrip("/").partition("/")
    return unquote(bucket), unquote(key)


async def _authenticate(
    request: web.Request,
    lookup: Callable[[str], Awaitable[S3Key | None]],
    suffixes: tuple[str, ...],
) -> S3Request:
    raw_path, _, raw_query = request.raw_path.partition("?")
    pairs = parse_query(raw_query)
    query = dict(pairs)
    headers = {name.lower(): value for name, value in request.headers.items()}
    if len(headers) != len(request.headers):
        # Repeated headers are joined with ',' as SigV4 signs them.
        headers = {}
        for name, value in request.headers.items():
            lower = name.lower()
            headers[lower] = f"{headers[lower]},{value}" if lower in headers else value
    if "authorization" in headers:
        claim = parse_authorization(headers["authorization"], headers)
    elif "X-Amz-Signature" in query:
        claim = parse_presigned(pairs)
    elif "Signature" in query:
        raise S3Error(
            "AccessDenied",
            "SigV2 presigned URLs are not supported; presign with SigV4 "
            "(boto3: Config(signature_version='s3v4'))",
            403,
        )
    else:
        raise S3Error("AccessDenied", "anonymous requests are not allowed; sign with SigV4", 403)
    key = await lookup(claim.credential.access_key)
    if key is None:
        raise S3Error(
            "InvalidAccessKeyId",
            "the access key is not known to this domain (cim-place s3 key ls)",
            403,
        )
    signing_key = verify(
        claim, key.secret_key, request.method, raw_path, pairs, headers, datetime.now(UTC)
    )
    bucket, obj = _split(request, suffixes)
    return S3Request(request, bucket, obj, query, headers, claim, signing_key, key.access_key)


def _route(req: S3Request) -> Handler:
    method, q = req.http.method, req.query
    if not req.bucket:
        if method == "GET":
            return buckets.list_buckets
        raise S3Error("MethodNotAllowed", f"{method} / is not an S3 operation")
    if not req.key:
        table: dict[str, Handler] = {}
        if method == "GET":
            if "location" in q:
                return buckets.get_location
            if "uploads" in q:
                return multipart.list_uploads
            if "versioning" in q:
                return buckets.get_versioning
            if "versions" in q:
                return buckets.list_object_versions
            if set(q) & {"acl", "policy", "cors", "lifecycle", "tagging", "website"}:
                raise S3Error("NotImplemented", "bucket sub-resources are not supported")
            return buckets.list_objects_v2 if q.get("list-type") == "2" else buckets.list_objects
        table = {
            "PUT": buckets.create_bucket,
            "HEAD": buckets.head_bucket,
            "DELETE": buckets.delete_bucket,
        }
        if method == "POST" and "delete" in q:
            return objects.delete_objects
        if method in table and not (set(q) - {"x-id"}):
            return table[method]
        raise S3Error(
            "NotImplemented", f"{method} on a bucket with {sorted(q)[:3]} is not supported"
        )
    if "uploadId" in q:
        if method == "PUT" and "partNumber" in q:
            return multipart.upload_part
        by_method = {
            "GET": multipart.list_parts,
            "POST": multipart.complete,
            "DELETE": multipart.abort,
        }
        if method in by_method:
            return by_method[method]
    elif method == "POST" and "uploads" in q:
        return multipart.create
    elif set(q) & {"acl", "tagging", "retention", "legal-hold", "torrent", "restore", "attributes"}:
        raise S3Error("NotImplemented", "object sub-resources are not supported")
    else:
        handlers: dict[str, Handler] = {
            "GET": objects.get_object,
            "HEAD": objects.get_object,
            "DELETE": objects.delete_object,
            "PUT": objects.copy_object
            if "x-amz-copy-source" in req.headers
            else objects.put_object,
        }
        if method in handlers:
            return handlers[method]
    raise S3Error("MethodNotAllowed", f"{method} is not allowed here", 405)

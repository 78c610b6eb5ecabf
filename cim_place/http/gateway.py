"""The IPFS trustless gateway of a node (an aiohttp application): ``/ipfs/{cid}[/path]`` and
``/name/{name}``.

Owns the HTTP side of the IPFS path and trustless gateway specs: status codes, headers
(``ETag``, ``Cache-Control``, ``Content-Type``, ``Content-Range``), conditional and range
requests, and streaming. What a request asks for is parsed by :mod:`.gateway_request`; what is
read from the DAG by :mod:`.gateway_content`; where blocks come from by a
:class:`~cim_place.http.sources.ContentSource`. Blocks are read (and verified) in the gateway's
own worker threads, a few blocks ahead of the socket, so a slow client holds back the reads
and a fetch from another node streams to the client as it arrives.

Errors: 400 (malformed CID, path or parameter), 401 (unknown token), 403 (access rules), 404
(nobody holds it; no such path), 416 (range past the end), 501 (HAMT directories, codecs the
gateway only serves raw), 502 (a block that no node could supply verified). A failure after the
headers were sent cuts the connection, so a client never takes a short body for a whole one.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from aiohttp import web

from cim_place.errors import BlockNotFoundError, CimPlaceError, CorruptBlockError
from cim_place.http import gateway_content as content
from cim_place.http.gateway_request import (
    CAR_TYPE,
    RAW_TYPE,
    BadRequest,
    Format,
    Scope,
    Wanted,
    etag_matches,
    parse_content_path,
    parse_range,
    wanted,
)
from cim_place.http.sources import (
    Access,
    ContentSource,
    Identify,
    NotHeldError,
    OpenAccess,
    UnknownTokenError,
)
from cim_place.http.streaming import send_chunks
from cim_place.interfaces import BlockSource
from cim_place.objectstore.cid import Cid, to_str

_log = logging.getLogger(__name__)
_T = TypeVar("_T")

IMMUTABLE = "public, max-age=29030400, immutable"
SMALL_BODY = 1 << 20
"""Answers up to this size are read whole in one worker-thread call, then sent."""
READ_AHEAD = 4
"""Chunks read ahead of the socket (a chunk is at most a block, 1 MiB by default)."""
NameResolver = Callable[[str], Awaitable[Cid | None]]
"""A domain name's current CID (None: no such name); BadRequest for an invalid name."""

ReadObserver = Callable[[Cid, str | None, int], None]
"""Told of each GET of an object's root: (root, requester or None, the entry's size); demand
counting (docs/DEMAND.md). Requests for a child block alone are not told: a verifying client
walking a DAG one raw block at a time reads the object once, not once per block."""

GATEWAY_KEY: web.AppKey[Gateway] = web.AppKey("gateway")


class Gateway:
    """The handlers and what they read from; :meth:`app` builds the aiohttp application."""

    def __init__(
        self,
        source: ContentSource,
        *,
        access: Access | None = None,
        identify: Identify | None = None,
        names: NameResolver | None = None,
        threads: int = 16,
        on_read: ReadObserver | None = None,
    ) -> None:
        self.source = source
        self.on_read = on_read
        self.access: Access = access if access is not None else OpenAccess()
        self.identify = identify if identify is not None else Identify()
        self.names = names
        # Own threads: a read waiting for a block from another node must not take the default
        # executor, where the fetch that brings the block runs its own work.
        self.executor = ThreadPoolExecutor(threads, thread_name_prefix="cim-place-gateway")

    def app(self) -> web.Application:
        app = web.Application(client_max_size=1024)
        app[GATEWAY_KEY] = self
        app.router.add_route("GET", "/ipfs/{cid}{rest:.*}", self.ipfs)
        app.router.add_route("HEAD", "/ipfs/{cid}{rest:.*}", self.ipfs)
        app.router.add_route("GET", "/name/{name:.+}", self.name)
        app.router.add_route("HEAD", "/name/{name:.+}", self.name)
        app.on_cleanup.append(self._cleanup)
        return app

    async def _cleanup(self, app: web.Application) -> None:
        close = getattr(self.source, "close", None)
        if close is not None:
            await close()  # fetches in progress end, so reads waiting for them return
        self.executor.shutdown(wait=False, cancel_futures=True)

    async def _run(self, func: Callable[..., _T], *args: object) -> _T:
        return await asyncio.get_running_loop().run_in_executor(self.executor, func, *args)

    # -- /name ------------------------------------------------------------------------------------

    async def name(self, request: web.Request) -> web.StreamResponse:
        if self.names is None:
            return _error(404, "this node resolves no domain names")
        name = request.match_info["name"]
        try:
            cid = await self.names(name)
        except BadRequest as exc:
            return _error(exc.status, exc.reason)
        except (CimPlaceError, OSError, TimeoutError) as exc:
            return _error(502, f"cannot resolve the name {name!r}: {_one_line(exc)}")
        if cid is None:
            return _error(404, f"no name {name!r} in this domain")
        location = f"/ipfs/{to_str(cid)}"
        if request.query_string:
            location += "?" + request.query_string
        return web.Response(status=302, headers={"Location": location, "Cache-Control": "no-cache"})

    # -- /ipfs ------------------------------------------------------------------------------------

    async def ipfs(self, request: web.Request) -> web.StreamResponse:
        try:
            raw = request.rel_url.raw_path[len("/ipfs/") :]
            raw_cid, _, raw_rest = raw.partition("/")
            path = parse_content_path(raw_cid, raw_rest)
            want = wanted(dict(request.query), request.headers.get("Accept", ""))
            requester = self.identify(request)
            if not await self.access.may_read(requester, self.source.dag_root(path.root)):
                who = requester or "an anonymous client"
                status = 403 if requester else 401
                return _error(status, f"{who} may not read {to_str(path.root)}")
            source = await self.source.open(path.root)
            entry = await self._run(content.resolve, source, path.root, path.segments)
            if (
                self.on_read is not None
                and request.method == "GET"
                and self.source.dag_root(path.root) == path.root
            ):
                self.on_read(path.root, requester, entry.size)
            headers = {
                "X-Ipfs-Path": path.text(to_str(path.root)),
                "X-Ipfs-Roots": ",".join(to_str(c) for c in (*entry.path_blocks, entry.cid)),
                "Vary": "Accept",
                "Access-Control-Allow-Origin": "*",
            }
            if want.format is Format.RAW:
                return await self._raw(request, source, path.root, entry, headers)
            if want.format is Format.CAR:
                return await self._car(request, source, path.root, entry, want, headers)
            return await self._file(request, source, path.root, entry, headers)
        except BadRequest as exc:
            return _error(exc.status, exc.reason)
        except UnknownTokenError as exc:
            return _error(401, str(exc))
        except NotHeldError as exc:
            return _error(404, str(exc))
        except content.NoSuchPath as exc:
            return _error(404, str(exc))
        except content.Unsupported as exc:
            return _error(501, str(exc))
        except BlockNotFoundError as exc:
            return _error(404, f"block {exc.cid} is not held by any node of this domain")
        except CorruptBlockError as exc:
            return _error(
                502, f"block {exc.cid} is corrupt here and no node supplied a verified copy"
            )
        except CimPlaceError as exc:
            _log.warning("gateway request %s: %s", request.rel_url, exc)
            return _error(502, _one_line(exc))
        except (OSError, TimeoutError) as exc:  # the domain unreachable, a disk error
            _log.warning("gateway request %s failed: %r", request.rel_url, exc)
            return _error(502, f"the content cannot be read now: {_one_line(exc)}")

    async def _raw(
        self,
        request: web.Request,
        source: BlockSource,
        root: Cid,
        entry: content.Entry,
        headers: dict[str, str],
    ) -> web.StreamResponse:
        etag = f'"{to_str(entry.cid)}.raw"'
        if _not_modified(request, etag):
            return web.Response(status=304, headers={**headers, "ETag": etag})
        block = entry.block
        self.source.saw(root, entry.cid, block)
        headers.update(
            {
                "ETag": etag,
                "Cache-Control": IMMUTABLE,
                "Content-Type": RAW_TYPE,
                "X-Content-Type-Options": "nosniff",
                "Content-Disposition": f'attachment; filename="{to_str(entry.cid)}.bin"',
                "Accept-Ranges": "bytes",
            }
        )
        status = 200
        body: bytes = block
        byte_range = parse_range(request.headers.get("Range", ""), len(block))
        if byte_range is not None:
            first, last = byte_range
            status, body = 206, block[first : last + 1]
            headers["Content-Range"] = f"bytes {first}-{last}/{len(block)}"
        response = web.Response(status=status, headers=headers)
        if request.method != "HEAD":
            response.body = body
        else:
            response.content_length = len(body)
        return response

    async def _car(
        self,
        request: web.Request,
        source: BlockSource,
        root: Cid,
        entry: content.Entry,
        want: Wanted,
        headers: dict[str, str],
    ) -> web.StreamResponse:
        byte_range = None
        if want.entity_bytes is not None:
            byte_range = want.entity_bytes.resolve(entry.size)
        suffix = want.scope.value
        if want.entity_bytes is not None:
            suffix += f".{want.entity_bytes.start}:{want.entity_bytes.end or '*'}"
        etag = f'"{to_str(entry.cid)}.car.{suffix}"'
        if _not_modified(request, etag):
            return web.Response(status=304, headers={**headers, "ETag": etag})
        headers.update(
            {
                "ETag": etag,
                "Cache-Control": IMMUTABLE,
                "Content-Type": f"{CAR_TYPE}; version=1; order=dfs; dups=n",
                "X-Content-Type-Options": "nosniff",
                "Content-Disposition": f'attachment; filename="{to_str(entry.cid)}.car"',
            }
        )
        response = web.StreamResponse(status=200, headers=headers)
        if request.method == "HEAD":
            await response.prepare(request)
            return response
        if want.scope is Scope.ENTITY and want.entity_bytes is not None and byte_range is None:
            scope = "block"  # an empty range needs only the entity's root block
        else:
            scope = want.scope.value
        chunks = content.car_chunks(source, root, entry, scope, byte_range)
        return await self._stream(request, response, chunks)

    async def _file(
        self,
        request: web.Request,
        source: BlockSource,
        root: Cid,
        entry: content.Entry,
        headers: dict[str, str],
    ) -> web.StreamResponse:
        if entry.kind == content.KIND_DIRECTORY:
            index = await self._run(content.index_of, source, entry)
            if index is None:
                return await self._listing(request, source, entry, headers)
            entry = await self._run(content.resolve, source, entry.cid, ("index.html",))
        elif entry.kind != content.KIND_FILE:
            raise content.Unsupported(
                f"{to_str(entry.cid)} is not a UnixFS file or directory; "
                "ask for it with ?format=raw or ?format=car"
            )
        etag = f'"{to_str(entry.cid)}"'
        if _not_modified(request, etag):
            return web.Response(status=304, headers={**headers, "ETag": etag})
        size = entry.size
        byte_range = parse_range(request.headers.get("Range", ""), size)
        first, last = byte_range if byte_range is not None else (0, size - 1)
        length = max(0, last - first + 1)
        filename = request.query.get("filename", "")
        kind = content.type_by_name(filename or entry.name)
        body: bytes | None = None
        chunks: Iterator[bytes] = iter(())
        if request.method != "HEAD" and entry.inline is not None:
            body = entry.inline[first : last + 1]  # a one-block file: read already
            if kind is None:
                kind = content.content_type("", entry.inline[: content.SNIFF_BYTES])
        elif request.method != "HEAD" and length <= SMALL_BODY:
            # One trip to a worker thread for a small answer (most requests of a website).
            body = b"".join(await self._run(_collect, source, entry.cid, first, last))
            if kind is None and first == 0:
                kind = content.content_type("", body[: content.SNIFF_BYTES])
        elif request.method != "HEAD":
            chunks = content.file_chunks(source, entry.cid, first, last)
            if kind is None and first == 0:
                # Sniff from the first chunk the response sends anyway.
                lead = await self._run(next, chunks, b"")
                kind = content.content_type("", lead[: content.SNIFF_BYTES])
                chunks = itertools.chain((lead,), chunks)
        if kind is None:
            sniff_end = min(size, content.SNIFF_BYTES) - 1
            head = b"".join(await self._run(_collect, source, entry.cid, 0, sniff_end))
            kind = content.content_type("", head)
        headers.update(
            {
                "ETag": etag,
                "Cache-Control": IMMUTABLE,
                "Content-Type": kind,
                "Accept-Ranges": "bytes",
            }
        )
        if filename or request.query.get("download") == "true":
            headers["Content-Disposition"] = content.disposition(
                filename or entry.name or to_str(entry.cid),
                attachment=request.query.get("download") == "true",
            )
        status = 200
        if byte_range is not None:
            status = 206
            headers["Content-Range"] = f"bytes {first}-{last}/{size}"
        if body is not None:
            return web.Response(status=status, headers=headers, body=body)
        response = web.StreamResponse(status=status, headers=headers)
        response.content_length = length
        if request.method == "HEAD" or length == 0:
            await response.prepare(request)
            return response
        return await self._stream(request, response, chunks)

    async def _listing(
        self,
        request: web.Request,
        source: BlockSource,
        entry: content.Entry,
        headers: dict[str, str],
    ) -> web.StreamResponse:
        body = await self._run(content.directory_listing, source, entry, request.path)
        headers.update(
            {"ETag": f'"DirIndex-{to_str(entry.cid)}"', "Content-Type": "text/html; charset=utf-8"}
        )
        response = web.Response(status=200, headers=headers)
        if request.method != "HEAD":
            response.body = body
        else:
            response.content_length = len(body)
        return response

    async def _stream(
        self, request: web.Request, response: web.StreamResponse, chunks: Iterator[bytes]
    ) -> web.StreamResponse:
        return await send_chunks(request, response, chunks, self.executor, READ_AHEAD)


def _collect(source: BlockSource, cid: Cid, first: int, last: int) -> list[bytes]:
    return list(content.file_chunks(source, cid, first, last))


def _not_modified(request: web.Request, etag: str) -> bool:
    header = request.headers.get("If-None-Match")
    return header is not None and etag_matches(header, etag)


def _one_line(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text.splitlines()[0]


def _error(status: int, reason: str) -> web.Response:
    headers = {"Cache-Control": "no-store", "Access-Control-Allow-Origin": "*"}
    if status == 401:
        headers["WWW-Authenticate"] = 'Bearer realm="cim-place"'
    return web.Response(status=status, text=reason.splitlines()[0] + "\n", headers=headers)

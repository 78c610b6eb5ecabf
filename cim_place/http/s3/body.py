"""Request bodies: aws-chunked decoding, digests, and the pipe into an importer thread.

A body is never held whole in memory: chunks go from the socket into a bounded pipe that a
worker thread reads as a file (the UnixFS importer, or a part file being written). The digests
(MD5 for the ETag, SHA-256 when the signature covers it, CRC32 and Content-MD5 when the client
sends them) are updated on the event loop as chunks pass, and checked before the reader sees the
end of the file: a mismatch aborts the reader, so nothing is pinned.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import queue
import zlib
from collections.abc import AsyncIterator, Callable, Mapping
from concurrent.futures import Executor
from typing import Any, TypeVar

from aiohttp import StreamReader

from cim_place.errors import StoreError
from cim_place.http.s3.errors import S3Error
from cim_place.http.s3.sigv4 import (
    STREAMING,
    STREAMING_UNSIGNED_TRAILER,
    UNSIGNED,
    ChunkSigner,
)

T = TypeVar("T")
WINDOW = 16
"""Chunks buffered between the socket and the reader thread."""
_MAX_CHUNK_HEADER = 4096
_MAX_CHUNK = 16 << 20


class BodyAborted(StoreError):
    """Raised in the reader thread when the request body turned out bad or broke off."""


class Digests:
    """The digests of a body, checked against what the request claims."""

    def __init__(self, headers: Mapping[str, str], payload_hash: str) -> None:
        self.md5 = hashlib.md5()
        self.size = 0
        self._sha256 = (
            hashlib.sha256()
            if payload_hash not in (UNSIGNED, STREAMING, STREAMING_UNSIGNED_TRAILER)
            else None
        )
        self._payload_hash = payload_hash
        self._crc32: int | None = 0 if "x-amz-checksum-crc32" in headers else None
        self._headers = headers
        self.trailers: dict[str, str] = {}

    def update(self, data: bytes) -> None:
        self.md5.update(data)
        self.size += len(data)
        if self._sha256 is not None:
            self._sha256.update(data)
        if self._crc32 is not None:
            self._crc32 = zlib.crc32(data, self._crc32)

    def want_crc32(self) -> None:
        if self._crc32 is None:
            self._crc32 = 0

    def check(self) -> None:
        if self._sha256 is not None and self._sha256.hexdigest() != self._payload_hash:
            raise S3Error(
                "XAmzContentSHA256Mismatch", "the body's SHA-256 is not x-amz-content-sha256"
            )
        expected_md5 = self._headers.get("content-md5")
        if expected_md5 is not None:
            try:
                wanted = base64.b64decode(expected_md5, validate=True)
            except (binascii.Error, ValueError):
                raise S3Error("InvalidDigest", "Content-MD5 is not base64") from None
            if wanted != self.md5.digest():
                raise S3Error("BadDigest", "the body's MD5 is not Content-MD5")
        crc = self._headers.get("x-amz-checksum-crc32") or self.trailers.get("x-amz-checksum-crc32")
        if crc is not None and self._crc32 is not None:
            mine = base64.b64encode(self._crc32.to_bytes(4, "big")).decode()
            if mine != crc.strip():
                raise S3Error("BadDigest", "the body's CRC32 is not x-amz-checksum-crc32")


async def plain_chunks(content: StreamReader) -> AsyncIterator[bytes]:
    while True:
        data = await content.readany()
        if not data:
            return
        yield data


async def _line(content: StreamReader) -> bytes:
    try:
        line = await content.readuntil(b"\n")
    except (asyncio.IncompleteReadError, ValueError):
        raise S3Error("IncompleteBody", "the aws-chunked body ends inside a chunk header") from None
    if len(line) > _MAX_CHUNK_HEADER or not line.endswith(b"\r\n"):
        raise S3Error("InvalidRequest", "a malformed aws-chunked chunk header")
    return line[:-2]


async def aws_chunks(
    content: StreamReader, signer: ChunkSigner | None, digests: Digests
) -> AsyncIterator[bytes]:
    """The payload of an aws-chunked body: ``hex;chunk-signature=SIG CRLF data CRLF``...,
    a zero-length chunk, then (unsigned-trailer mode) trailer lines and an empty line."""
    while True:
        header = (await _line(content)).decode("latin-1")
        size_text, _, ext = header.partition(";")
        try:
            size = int(size_text.strip(), 16)
        except ValueError:
            raise S3Error("InvalidRequest", "an aws-chunked chunk size is not hex") from None
        if not 0 <= size <= _MAX_CHUNK:
            raise S3Error("InvalidRequest", f"an aws-chunked chunk of {size} bytes")
        try:
            data = await content.readexactly(size) if size else b""
        except asyncio.IncompleteReadError:
            raise S3Error("IncompleteBody", "the aws-chunked body is truncated") from None
        if signer is not None:
            name, _, signature = ext.partition("=")
            if name.strip() != "chunk-signature":
                raise S3Error("AccessDenied", "an aws-chunked chunk has no signature", 403)
            signer.check(signature, hashlib.sha256(data).hexdigest())
        if size == 0:
            break
        if await content.readexactly(2) != b"\r\n":
            raise S3Error("InvalidRequest", "an aws-chunked chunk does not end with CRLF")
        yield data
    # Trailers (x-amz-checksum-crc32:...) then an empty line; a signed stream ends with CRLF.
    while True:
        try:
            line = await _line(content)
        except S3Error:
            return
        if not line:
            return
        name, _, value = line.decode("latin-1").partition(":")
        digests.trailers[name.strip().lower()] = value.strip()
        if name.strip().lower() == "x-amz-checksum-crc32":
            digests.want_crc32()


class _End:
    pass


class BodyPipe:
    """File-like for a worker thread; fed by the event loop, at most WINDOW chunks ahead."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._queue: queue.SimpleQueue[bytes | _End | BaseException] = queue.SimpleQueue()
        self._room = asyncio.Semaphore(WINDOW)
        self._current = memoryview(b"")
        self._ended = False

    async def feed(self, data: bytes, reader: asyncio.Future[Any]) -> bool:
        """Queue ``data``; False (nothing queued) when the reader ended while waiting."""
        if self._room.locked():
            room = asyncio.ensure_future(self._room.acquire())
            await asyncio.wait({room, reader}, return_when=asyncio.FIRST_COMPLETED)
            if not room.done():
                room.cancel()
                return False
        else:
            await self._room.acquire()
        self._queue.put(data)
        return True

    def finish(self) -> None:
        self._queue.put(_End())

    def abort(self, error: BaseException) -> None:
        self._queue.put(error)

    def _next(self) -> bool:
        while not len(self._current):
            if self._ended:
                return False
            item = self._queue.get()
            if isinstance(item, _End):
                self._ended = True
                return False
            if isinstance(item, BaseException):
                self._ended = True
                raise BodyAborted(f"the request body was refused: {item}")
            self._loop.call_soon_threadsafe(self._room.release)
            self._current = memoryview(item)
        return True

    def readinto(self, buffer: Any) -> int:
        target = memoryview(buffer).cast("B")
        filled = 0
        while filled < len(target) and self._next():
            n = min(len(target) - filled, len(self._current))
            target[filled : filled + n] = self._current[:n]
            self._current = self._current[n:]
            filled += n
        return filled

    def read(self, size: int = -1, /) -> bytes:
        pieces: list[bytes] = []
        wanted = size if size >= 0 else 1 << 62
        while wanted > 0 and self._next():
            piece = self._current[:wanted]
            pieces.append(bytes(piece))
            self._current = self._current[len(piece) :]
            wanted -= len(piece)
        return b"".join(pieces)


async def consume(
    chunks: AsyncIterator[bytes],
    digests: Digests,
    reader: Callable[[BodyPipe], T],
    executor: Executor | None,
    *,
    max_size: int,
) -> T:
    """Run ``reader(pipe)`` in a thread on the body; digests checked before it sees the end."""
    loop = asyncio.get_running_loop()
    pipe = BodyPipe(loop)
    future = loop.run_in_executor(executor, reader, pipe)
    try:
        async for data in chunks:
            digests.update(data)
            if digests.size > max_size:
                raise S3Error("EntityTooLarge", f"the body is larger than {max_size} bytes")
            if future.done() or not await pipe.feed(data, future):
                break  # the reader failed: its error is raised below
        digests.check()
    except BaseException as exc:
        pipe.abort(exc)
        # The reader's own error matters less than the cause.
        with contextlib.suppress(BaseException):
            await future
        raise
    pipe.finish()
    return await future

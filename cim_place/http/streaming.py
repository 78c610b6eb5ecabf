"""Streaming a response whose chunks are read in worker threads (blocking, verified reads).

The chunks are read a few ahead of the socket and written as the socket drains, so a slow
client holds back the reads. The first chunk is read before the headers go out, so a failure
there is still answered with a status; a failure later aborts the connection: with a
``Content-Length`` or a chunked body the client sees an incomplete response, never a short one
taken for whole.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator
from concurrent.futures import Executor

from aiohttp import web

_log = logging.getLogger(__name__)

_Item = bytes | BaseException | None


async def send_chunks(
    request: web.Request,
    response: web.StreamResponse,
    chunks: Iterator[bytes],
    executor: Executor,
    ahead: int,
) -> web.StreamResponse:
    """Send ``chunks`` (each ``next`` runs in ``executor``, ``ahead`` chunks ahead). Raises
    what the first chunk's read raised, before anything is sent."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[_Item] = asyncio.Queue(ahead)

    async def produce() -> None:
        try:
            while (chunk := await loop.run_in_executor(executor, next, chunks, None)) is not None:
                if chunk:
                    await queue.put(chunk)
            await queue.put(None)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # any failure reaches the response, which is then cut
            await queue.put(exc)

    producer = asyncio.create_task(produce())
    try:
        item = await queue.get()
        if isinstance(item, BaseException):
            raise item  # nothing sent yet: the caller answers with a status
        await response.prepare(request)
        while item is not None:
            if isinstance(item, BaseException):
                reason = (str(item) or type(item).__name__).splitlines()[0]
                _log.warning("gateway response for %s cut: %s", request.rel_url, reason)
                if request.transport is not None:
                    request.transport.abort()
                return response
            await response.write(item)
            item = await queue.get()
        await response.write_eof()
    finally:
        producer.cancel()
        with contextlib.suppress(BaseException):
            await producer
        close = getattr(chunks, "close", None)
        if close is not None:
            with contextlib.suppress(Exception):
                await loop.run_in_executor(executor, close)
    return response

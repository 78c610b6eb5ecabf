"""The pipe between an upload's NATS handler and its importer thread: chunks in, a file out."""

from __future__ import annotations

import queue
from collections.abc import Callable
from dataclasses import dataclass

from cim_place.cluster.exchange.upload_wire import UploadAborted

__all__ = ["ChunkPipe"]


class _End:
    pass


@dataclass(frozen=True, slots=True)
class _Stop:
    code: str
    message: str


_Item = memoryview | _End | _Stop


class ChunkPipe:
    """A file-like stream fed with chunks by the event loop and read by an importer thread.

    ``feed``/``finish``/``abort`` never block (the caller bounds what is fed: the window);
    ``read``/``readinto`` block until data, the end (``b""``/0) or an abort (raises
    UploadAborted). ``on_consumed(n)`` is called from the reading thread each time a whole chunk
    has been read, with the number of chunks consumed so far.
    """

    def __init__(self, on_consumed: Callable[[int], None] | None = None) -> None:
        self._queue: queue.SimpleQueue[_Item] = queue.SimpleQueue()
        self._on_consumed = on_consumed
        self._current: memoryview | None = None
        self._pos = 0
        self._ended = False
        self.fed = 0
        self.consumed = 0

    @property
    def pending(self) -> int:
        """Chunks fed and not yet wholly read."""
        return self.fed - self.consumed

    def feed(self, chunk: memoryview | bytes) -> None:
        self.fed += 1
        self._queue.put(memoryview(chunk))

    def finish(self) -> None:
        self._queue.put(_End())

    def abort(self, code: str, message: str) -> None:
        self._queue.put(_Stop(code, message))

    def _chunk(self) -> memoryview | None:
        """The chunk being read (waiting for one if needed); None at the end."""
        while self._current is None:
            if self._ended:
                return None
            item = self._queue.get()
            if isinstance(item, _Stop):
                raise UploadAborted(item.code, item.message)
            if isinstance(item, _End):
                self._ended = True
                return None
            if len(item):
                self._current, self._pos = item, 0
            else:
                self._consumed_one()
        return self._current

    def _consumed_one(self) -> None:
        self.consumed += 1
        if self._on_consumed is not None:
            self._on_consumed(self.consumed)

    def readinto(self, buffer: memoryview | bytearray) -> int:
        target = memoryview(buffer).cast("B")
        filled = 0
        while filled < len(target):
            chunk = self._chunk()
            if chunk is None:
                break
            n = min(len(target) - filled, len(chunk) - self._pos)
            target[filled : filled + n] = chunk[self._pos : self._pos + n]
            filled += n
            self._pos += n
            if self._pos == len(chunk):
                self._current = None
                self._consumed_one()
        return filled

    def read(self, size: int = -1, /) -> bytes:
        if size < 0:
            parts = []
            while piece := self.read(1 << 20):
                parts.append(piece)
            return b"".join(parts)
        # Views of the chunks joined once: one copy, into the fresh bytes the importer keeps.
        pieces: list[memoryview] = []
        wanted = size
        while wanted > 0:
            chunk = self._chunk()
            if chunk is None:
                break
            n = min(wanted, len(chunk) - self._pos)
            pieces.append(chunk[self._pos : self._pos + n])
            wanted -= n
            self._pos += n
            if self._pos == len(chunk):
                self._current = None
                self._consumed_one()
        return b"".join(pieces)

"""Object names of the status index in one blob, and name globs run over it (pure).

Names are appended to one ``\\n``-separated UTF-8 blob; a row holds its name's number. A glob
becomes one regular expression (:func:`glob_regex`, the rules of ``fnmatch.fnmatchcase``) run
over the whole blob in C, whose matches are turned into a table of name numbers: a million names
cost one pass of the regular expression engine, not a million calls. The table is kept while the
blob is unchanged, so the following pages of the same glob cost no search. Names replaced or
dropped stay in the blob until they outnumber the live ones; :meth:`NameBlob.rebuild` then
rewrites it. A newline inside a name (never seen in practice) is stored as NUL, so such a name
cannot be matched by a glob spelling the newline; globs with control characters are refused
upstream anyway.
"""

from __future__ import annotations

import re
from array import array

import numpy as np
import numpy.typing as npt

from cim_place.cluster.controller.status_rows import glob_regex

__all__ = ["NO_NAME", "NameBlob"]

NO_NAME = 0
"""The name number of an object without a name."""
_COMPACT_AFTER = 65536


class NameBlob:
    """Names by number (1, 2, ...; 0: none) and the glob tables over them."""

    def __init__(self) -> None:
        self._blob = bytearray(b"\n")
        self._at = array("q", [-1])  # name number -> offset of the "\n" before it
        self._garbage = 0
        self._version = 0
        self._text: tuple[int, str, npt.NDArray[np.int64]] | None = None
        self._table: tuple[int, str, npt.NDArray[np.bool_]] | None = None

    def __len__(self) -> int:
        return len(self._at)

    def text(self, number: int) -> str | None:
        if number == NO_NAME:
            return None
        start = self._at[number] + 1
        return self._blob[start : self._blob.index(b"\n", start)].decode()

    def add(self, name: str) -> int:
        """A new number for ``name``."""
        self._version += 1
        self._at.append(len(self._blob) - 1)
        self._blob += name.replace("\n", "\x00").encode() + b"\n"
        return len(self._at) - 1

    def drop(self) -> bool:
        """Count one name no longer used; True when :meth:`rebuild` is due."""
        self._garbage += 1
        return self._garbage > _COMPACT_AFTER and self._garbage * 2 > len(self._at)

    def rebuild(self, numbers: list[int]) -> list[int]:
        """Keep only the names ``numbers``; their new numbers, in the same order."""
        texts = [self.text(number) or "" for number in numbers]
        self._blob = bytearray(b"\n")
        self._at = array("q", [-1])
        self._garbage = 0
        return [self.add(text) for text in texts]

    def table(self, glob: str) -> npt.NDArray[np.bool_]:
        """A bool per name number: whether that name matches ``glob``."""
        if self._table is not None and self._table[:2] == (self._version, glob):
            return self._table[2]
        text, starts = self._decoded()
        pattern = re.compile(f"\n(?:{glob_regex(glob)})(?=\n)")
        table = np.zeros(len(self._at), dtype=bool)
        hits = np.fromiter((m.start() for m in pattern.finditer(text)), dtype=np.int64)
        table[np.searchsorted(starts, hits)] = True
        table[NO_NAME] = False
        self._table = (self._version, glob, table)
        return table

    def _decoded(self) -> tuple[str, npt.NDArray[np.int64]]:
        """The blob as text and where each name's line starts in it (in characters)."""
        if self._text is not None and self._text[0] == self._version:
            return self._text[1], self._text[2]
        text = self._blob.decode()
        starts = np.frombuffer(self._at, dtype=np.int64).copy()
        if len(text) != len(self._blob):  # not ASCII: bytes before a start -> characters
            raw = np.frombuffer(bytes(self._blob), dtype=np.uint8)
            tails = np.concatenate(([0], np.cumsum((raw & 0xC0) == 0x80)))
            starts[1:] -= tails[starts[1:]]
        self._text = (self._version, text, starts)
        return text, starts

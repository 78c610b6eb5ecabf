"""The one ``with`` protocol of objects that hold processes, files or locks until closed.

This module owns ``Closing``: a mixin whose ``__enter__`` returns the object and whose
``__exit__`` calls its ``close()``, so a class that releases everything in ``close()`` is usable
in a ``with`` block without writing both methods again. It imports nothing of cim_place, so every
layer (the object store at the bottom included) may use it.
"""

from __future__ import annotations

from types import TracebackType
from typing import Self

__all__ = ["Closing"]


class Closing:
    """Mixin: ``with obj:`` returns ``obj`` and calls ``obj.close()`` on the way out."""

    def close(self) -> None:
        raise NotImplementedError(f"{type(self).__name__} must define close()")

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

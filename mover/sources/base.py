"""The source interface every backend implements (file, device, imageio, ssh).

A source has a size, describes its content as extents, and hands out independent readers so several
threads (or connections) read at once.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class Extent:
    """A byte range of the source.

    ``zero``: the range reads as zeros (a hole or an unallocated cluster) and need not be read.
    ``dirty``: the range changed since the base backup (for ``context="dirty"``; always True otherwise).
    """

    start: int
    length: int
    zero: bool = False
    dirty: bool = True

    @property
    def end(self) -> int:
        return self.start + self.length


class Reader(Protocol):
    """One reader: used by one thread at a time."""

    def readinto(self, offset: int, buf: memoryview) -> int:
        """Fill ``buf`` from ``offset``; return the bytes read (short only at the end of the source)."""
        ...

    def close(self) -> None: ...


class Source(Protocol):
    """A disk to back up."""

    @property
    def name(self) -> str:
        """What to call the source in messages and logs (never a secret)."""
        ...

    @property
    def size(self) -> int: ...

    @property
    def max_readers(self) -> int:
        """How many readers may be open at once."""
        ...

    def extents(self, context: str = "zero") -> Iterator[Extent]:
        """Extents covering the whole source in order; ``context="dirty"`` marks changed ranges."""
        ...

    def reader(self) -> Reader: ...

    def close(self) -> None: ...

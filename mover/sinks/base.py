"""The sink interface every restore destination implements."""

from __future__ import annotations

from typing import Protocol


class Sink(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def max_writers(self) -> int:
        """How many threads may call ``write``/``zero`` at once."""
        ...

    def truncate(self, size: int) -> None:
        """Make the destination ``size`` bytes long (or check that it is at least that long)."""
        ...

    def write(self, offset: int, data: bytes | memoryview) -> None: ...

    def zero(self, offset: int, length: int) -> None:
        """Make the range read as zeros; a fresh destination may do nothing."""
        ...

    def flush(self) -> None: ...

    def close(self) -> None: ...

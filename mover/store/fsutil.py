"""Atomic file writes and the mapping of OS errors to store errors.

Every file of the store appears under its final name only once complete and durable: written to a temporary
name in the same directory tree, fsynced, renamed, and the directory fsynced.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import uuid
from collections.abc import Iterator

from mover.errors import StoreError, StoreFull

log = logging.getLogger(__name__)

TMP_DIR = "tmp"  # temporary files live here until renamed: same filesystem, so rename is atomic


def store_error(err: OSError, path: str, what: str) -> StoreError:
    """The store error for an OS error: ENOSPC/EDQUOT is ``StoreFull`` (retryable once space is freed)."""
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return StoreFull(f"{what}: {err.strerror}", path=path)
    return StoreError(f"{what}: {err.strerror or err}", path=path)


def fsync_dir(path: str) -> None:
    """Make a rename or unlink in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def tmp_path(root: str, suffix: str = "") -> str:
    """A unique temporary path under ``root/tmp``."""
    return os.path.join(root, TMP_DIR, f"{uuid.uuid4().hex}{suffix}.tmp")


@contextlib.contextmanager
def atomic_file(root: str, final: str, mode: int = 0o644) -> Iterator[int]:
    """Yield a file descriptor to write; on success the file is fsynced and renamed to ``final``.

    On any failure the temporary file is removed, so no partial file is ever visible under ``final``.
    """
    tmp = tmp_path(root)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except OSError as e:
        raise store_error(e, root, f"cannot create {os.path.relpath(final, root)}") from e
    try:
        try:
            yield fd
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, final)
        fsync_dir(os.path.dirname(final))
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(e, OSError):
            raise store_error(e, root, f"cannot write {os.path.relpath(final, root)}") from e
        raise


def write_all(fd: int, data: bytes | bytearray | memoryview) -> None:
    """``os.write`` until every byte is written."""
    mv = memoryview(data).cast("B")
    while mv:
        n = os.write(fd, mv)
        mv = mv[n:]


def write_file(root: str, final: str, data: bytes, mode: int = 0o644) -> None:
    """Atomically replace ``final`` with ``data``."""
    with atomic_file(root, final, mode) as fd:
        write_all(fd, data)


def write_new(root: str, final: str, data: bytes, mode: int = 0o644) -> None:
    """Create ``final`` with ``data`` only if it does not exist (``FileExistsError`` otherwise).

    link(2) publishes the complete, fsynced file under its name and fails if the name is taken, so of
    several processes creating the same file exactly one wins and no one sees it partial.
    """
    tmp = tmp_path(root)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        try:
            write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.link(tmp, final)
        fsync_dir(os.path.dirname(final))
    except FileExistsError:
        raise
    except OSError as e:
        raise store_error(e, root, f"cannot write {os.path.relpath(final, root)}") from e
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


def remove(path: str) -> None:
    """Unlink ``path`` if it exists."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)

"""Measuring one command: wall time and peak memory (``/usr/bin/time -f %M``), and facts about files on disk."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from mover.errors import FerryError

TIME = "/usr/bin/time"  # Debian package "time" (in scripts/bootstrap.sh)


class BenchError(FerryError):
    """A benchmarked command failed; the message carries its last line of output."""

    msg = "bench: {self.reason}"


@dataclass
class Measured:
    """One finished command."""

    argv: list[str]
    seconds: float
    peak_rss: int  # bytes; max RSS of the process (and its waited-for children)
    returncode: int
    stdout: str
    stderr: str

    def check(self) -> Measured:
        """Raise ``BenchError`` when the command failed."""
        if self.returncode:
            last = (self.stderr.strip().splitlines() or self.stdout.strip().splitlines() or ["no output"])[-1]
            raise BenchError(f"{Path(self.argv[0]).name} exit {self.returncode}: {last}")
        return self


def run(
    argv: Sequence[str],
    cwd: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    logdir: str | os.PathLike[str] | None = None,
) -> Measured:
    """Run ``argv`` to completion, measuring wall time and peak RSS.

    Peak RSS comes from ``/usr/bin/time -f %M``: a child forked from this (large) Python process and reaped
    with ``os.wait4`` would report this process's RSS, which the kernel records as the child's high-water mark
    at exec; ``time`` is a small process, so its child's figure is the command's own.
    """
    if not shutil.which(argv[0]):
        raise BenchError(f"{argv[0]} not found")
    logs = Path(logdir) if logdir else Path(cwd or ".")
    logs.mkdir(parents=True, exist_ok=True)
    out_path, err_path, rss_path = logs / "last.stdout", logs / "last.stderr", logs / "last.rss"
    rss_path.unlink(missing_ok=True)
    full_env = dict(os.environ)
    if env:
        full_env.update(env)
    wrapped = [TIME, "-f", "%M", "-o", str(rss_path), *argv]
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        start = time.perf_counter()
        proc = subprocess.run(wrapped, cwd=cwd, env=full_env, stdout=out, stderr=err, stdin=subprocess.DEVNULL)
        seconds = time.perf_counter() - start
    try:
        # time writes "Command exited with non-zero status N" before the figure when the command fails.
        peak_kib = int(rss_path.read_text().split()[-1])
    except (FileNotFoundError, ValueError, IndexError):
        peak_kib = 0
    return Measured(
        argv=list(argv),
        seconds=seconds,
        peak_rss=peak_kib * 1024,
        returncode=proc.returncode,
        stdout=out_path.read_text(errors="replace"),
        stderr=err_path.read_text(errors="replace"),
    )


def du(path: str | os.PathLike[str]) -> int:
    """Bytes allocated on disk by a file or a directory tree (as ``du`` counts them)."""
    p = Path(path)
    if p.is_file():
        return p.stat().st_blocks * 512
    total = 0
    for dirpath, _, filenames in os.walk(p):
        for name in filenames:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_blocks * 512
            except FileNotFoundError:
                continue
    return total


def identical(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> bool:
    """True when two files have the same bytes (``cmp``, fast and C)."""
    if os.stat(a).st_size != os.stat(b).st_size:
        return False
    return subprocess.run(["cmp", "-s", str(a), str(b)]).returncode == 0


def data_bytes(path: str | os.PathLike[str]) -> int:
    """Bytes in data extents of a file (SEEK_DATA/SEEK_HOLE), i.e. what a sparse-aware reader must read."""
    total = 0
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        pos = 0
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:  # ENXIO: no data after pos
                break
            end = os.lseek(fd, start, os.SEEK_HOLE)
            total += end - start
            pos = end
    finally:
        os.close(fd)
    return total


def warm(path: str | os.PathLike[str]) -> None:
    """Read a file's data extents once so every tool starts from the same (warm) page cache."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        pos = 0
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:
                break
            end = os.lseek(fd, start, os.SEEK_HOLE)
            off = start
            while off < end:
                n = len(os.pread(fd, min(8 * 1024**2, end - off), off))
                if not n:
                    break
                off += n
            pos = end
    finally:
        os.close(fd)

"""Realistic disk images for tests, the benchmark and the demo.

``build_image`` makes an ext4 filesystem with ``mkfs.ext4 -d`` from real files of this machine (a deterministic,
seeded selection from /usr/lib, /usr/share and /usr/bin up to a data budget), leaves the free space as zeros and
the file sparse, optionally converted to qcow2. Built images are cached by (size, fill, seed, format) so tests and
the benchmark do not rebuild them; callers get a sparse copy they may modify.

``change_blocks`` writes random data into a percentage of the 64 KiB clusters of a raw image, in runs as a guest
would, and returns the changed extents in the JSON shape of ovirt-imageio's ``/extents?context=dirty``.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import logging
import os
import random
import shutil
import stat
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from lab.errors import LabError

log = logging.getLogger(__name__)

# Bump when the way images are built changes, so stale cache entries are not reused.
BUILDER_VERSION = 1

# Where the files come from: binaries, libraries and shared data compress and deduplicate like a real guest's
# system disk (a mix of ELF, text, compressed archives and images).
SOURCE_ROOTS = ("/usr/lib", "/usr/share", "/usr/bin")

# Very large files would dominate a small image with one kind of data; a guest disk is mostly many small files.
MAX_FILE_SIZE = 64 * 1024**2

# ext4 block size; the budget counts files rounded up to it.
FS_BLOCK = 4096

# Dirty bitmaps and qcow2 clusters are 64 KiB (DESIGN.md), so changes are counted in these units.
CLUSTER = 65536

_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}


@dataclass(frozen=True)
class ImageInfo:
    """What ``build_image`` made."""

    path: Path
    size: int  # virtual (guest) size in bytes
    format: str  # "raw" or "qcow2"
    fill: float  # fraction of the size the copied files were budgeted to use
    seed: int
    files: int  # regular files copied into the filesystem
    data_bytes: int  # their total size
    allocated: int  # bytes allocated on the host for the image file (it is sparse)
    cached: bool  # True when the cache already held the image


def parse_size(value: int | str) -> int:
    """Parse ``64M``, ``1G``, ``6GiB`` or a plain byte count."""
    if isinstance(value, int):
        return value
    text = value.strip().upper().removesuffix("IB").removesuffix("B")
    unit = text[-1:] if text[-1:] in _UNITS and not text[-1:].isdigit() else ""
    number = text[: len(text) - len(unit)]
    try:
        return int(float(number) * _UNITS[unit])
    except ValueError:
        raise LabError(f"bad size {value!r} (use e.g. 64M, 1G, 6G)") from None


def format_size(n: int) -> str:
    """Short human size for names and tables (``64M``, ``6G``)."""
    for unit in ("T", "G", "M", "K"):
        if n >= _UNITS[unit] and n % _UNITS[unit] == 0:
            return f"{n // _UNITS[unit]}{unit}"
    return str(n)


def default_cache_dir() -> Path:
    """The image cache: ``$FERRY_IMAGE_CACHE`` or ``~/.cache/ferry/images``."""
    env = os.environ.get("FERRY_IMAGE_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "ferry" / "images"


def build_image(
    path: str | os.PathLike[str] | None,
    size: int | str,
    fill: float = 0.5,
    seed: int = 0,
    fmt: str = "raw",
    cache_dir: str | os.PathLike[str] | None = None,
) -> ImageInfo:
    """Build (or take from the cache) an ext4 image of ``size`` filled to ``fill`` with real files.

    The result is written to ``path`` as a sparse copy the caller owns. With ``path=None`` the cached image
    itself is returned: callers must then treat it as read-only.
    """
    nbytes = parse_size(size)
    if fmt not in ("raw", "qcow2"):
        raise LabError(f"unknown image format {fmt!r} (raw or qcow2)")
    if not 0.0 <= fill <= 0.9:
        raise LabError(f"fill {fill} out of range 0..0.9 (ext4 needs room for its metadata)")
    if nbytes < 16 * 1024**2 or nbytes % CLUSTER:
        raise LabError(f"size {nbytes} must be a multiple of 64 KiB and at least 16 MiB")
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    stem = f"ext4-v{BUILDER_VERSION}-{format_size(nbytes)}-f{round(fill * 100)}-s{seed}"
    raw = cache / f"{stem}.raw"
    cached = cache / f"{stem}.{fmt}"
    meta = cache / f"{stem}.meta"
    was_cached = True
    # One builder per entry: tests and the bench may ask for the same image at once.
    with _locked(cache / f"{stem}.lock"):
        if not (raw.exists() and meta.exists()):
            was_cached = False
            files, data = _build_raw(raw, nbytes, fill, seed)
            _write_atomic(meta, f"{files} {data}\n")
        if fmt == "qcow2" and not cached.exists():
            was_cached = False
            tmp = cached.with_suffix(".qcow2.tmp")
            _run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(tmp)])
            os.replace(tmp, cached)
    files, data = (int(x) for x in meta.read_text().split())
    out = cached
    if path is not None:
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        _run(["cp", "--sparse=always", "--reflink=auto", str(cached), str(out)])
    info = ImageInfo(
        path=out,
        size=nbytes,
        format=fmt,
        fill=fill,
        seed=seed,
        files=files,
        data_bytes=data,
        allocated=os.stat(out).st_blocks * 512,
        cached=was_cached,
    )
    log.info(
        "Image path=%s size=%d format=%s files=%d data=%d allocated=%d cached=%s",
        out, nbytes, fmt, files, data, info.allocated, was_cached,
    )
    return info


def select_files(budget: int, seed: int, roots: tuple[str, ...] = SOURCE_ROOTS) -> list[tuple[Path, str, int]]:
    """Pick regular files from ``roots`` in a seeded order until ``budget`` bytes (rounded to blocks).

    Returns (absolute path, path relative to ``/``, size). The order is deterministic for a given machine state.
    """
    candidates = list(_candidates(roots))
    random.Random(seed).shuffle(candidates)
    chosen: list[tuple[Path, str, int]] = []
    used = 0
    for item in candidates:
        cost = -(-item[2] // FS_BLOCK) * FS_BLOCK
        if used + cost > budget:
            continue
        chosen.append(item)
        used += cost
        if budget - used < FS_BLOCK:
            break
    return chosen


@functools.lru_cache(maxsize=4)
def _candidates(roots: tuple[str, ...]) -> tuple[tuple[Path, str, int], ...]:
    # Walking /usr takes seconds; one walk per process is enough (tests and the bench build several images).
    candidates: list[tuple[Path, str, int]] = []
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            for name in sorted(filenames):
                p = Path(dirpath, name)
                try:
                    st = p.lstat()
                except OSError:
                    continue
                if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_FILE_SIZE:
                    continue
                candidates.append((p, str(p.relative_to("/")), st.st_size))
    return tuple(candidates)


def change_blocks(
    path: str | os.PathLike[str], percent: float, seed: int, cluster: int = CLUSTER
) -> list[dict[str, int | bool]]:
    """Write random data into ``percent`` % of the ``cluster``-sized clusters of the raw image at ``path``.

    Clusters are changed in runs of 1-16 (a guest writes files, not scattered sectors). The runs land anywhere,
    filesystem metadata included: the bytes change as a guest's would, but ext4's consistency is not kept (do not
    mount the result expecting a clean filesystem). Returns the extents of
    the whole disk, merged, as ovirt-imageio's ``/extents?context=dirty`` reports them:
    ``[{"start": 0, "length": N, "dirty": false, "zero": false}, ...]``.
    """
    p = Path(path)
    with open(p, "rb") as f:
        if f.read(4) == b"QFI\xfb":
            raise LabError(f"{p} is qcow2: change_blocks writes raw images only (use qemu-io for qcow2)")
    size = p.stat().st_size
    if not 0 <= percent <= 100:
        raise LabError(f"percent {percent} out of range 0..100")
    nclusters = -(-size // cluster)
    want = round(nclusters * percent / 100)
    rng = random.Random(seed)
    dirty = bytearray(nclusters)
    count = 0
    while count < want:
        start = rng.randrange(nclusters)
        run = min(rng.randint(1, 16), want - count, nclusters - start)
        for i in range(start, start + run):
            if not dirty[i]:
                dirty[i] = 1
                count += 1
    extents = _extents(dirty, cluster, size)
    fd = os.open(p, os.O_RDWR)
    try:
        for ext in extents:
            if not ext["dirty"]:
                continue
            off, end = int(ext["start"]), int(ext["start"]) + int(ext["length"])
            while off < end:
                n = min(end - off, 8 * 1024**2)
                os.pwrite(fd, rng.randbytes(n), off)
                off += n
        os.fsync(fd)
    finally:
        os.close(fd)
    log.info("Changed path=%s percent=%s clusters=%d of=%d", p, percent, count, nclusters)
    return extents


def dirty_bytes(extents: list[dict[str, int | bool]]) -> int:
    """Total length of the dirty extents."""
    return sum(int(e["length"]) for e in extents if e["dirty"])


def _extents(dirty: bytearray, cluster: int, size: int) -> list[dict[str, int | bool]]:
    out: list[dict[str, int | bool]] = []
    i = 0
    n = len(dirty)
    while i < n:
        j = i
        while j < n and dirty[j] == dirty[i]:
            j += 1
        start = i * cluster
        end = min(j * cluster, size)
        out.append({"start": start, "length": end - start, "dirty": bool(dirty[i]), "zero": False})
        i = j
    return out


def _build_raw(out: Path, size: int, fill: float, seed: int) -> tuple[int, int]:
    files = select_files(int(size * fill), seed)
    data = sum(f[2] for f in files)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".stage-") as stage:
        root = Path(stage, "root")
        root.mkdir()
        for src, rel, _ in files:
            dst = root / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            # Hard links make staging free on the same filesystem; mkfs.ext4 -d copies the content anyway.
            try:
                os.link(src, dst)
            except OSError:
                shutil.copy2(src, dst)
        tmp = Path(stage, "image.raw")
        with open(tmp, "wb") as f:
            f.truncate(size)
        fs_uuid = str(uuid.UUID(int=random.Random(seed).getrandbits(128), version=4))
        env = dict(os.environ, E2FSPROGS_FAKE_TIME="1700000000")
        _run(
            [
                "mkfs.ext4", "-q", "-F", "-b", str(FS_BLOCK), "-I", "256", "-L", "ferry-bench",
                "-U", fs_uuid, "-E", f"nodiscard,hash_seed={fs_uuid}", "-d", str(root), str(tmp),
            ],
            env=env,
        )
        # mkfs may write zero-filled metadata blocks; punch them so the file is as sparse as the data allows.
        _run(["fallocate", "--dig-holes", str(tmp)])
        os.replace(tmp, out)
    log.info("Built path=%s size=%d files=%d data=%d", out, size, len(files), data)
    return len(files), data


def _run(cmd: list[str], env: dict[str, str] | None = None) -> None:
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if res.returncode:
        last = (res.stderr.strip().splitlines() or ["no output"])[-1]
        raise LabError(f"{cmd[0]} failed (exit {res.returncode}): {last}")


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)

"""Thin wrappers of qemu-img and qemu-io, the tools vdsm itself runs on a hypervisor.

Every failure raises :class:`lab.errors.LabError` with one line: the command and qemu's own message.
"""

from __future__ import annotations

import json
import logging
import subprocess
from pathlib import Path
from typing import Any

from lab.errors import LabError

log = logging.getLogger("lab.qemu")

# vdsm creates qcow2 volumes with compat=1.1 (needed for persistent bitmaps) and the default 64 KiB clusters.
QCOW2_OPTIONS = "compat=1.1"


def run(cmd: list[str], timeout: float = 300) -> str:
    """Run a command and return its stdout; LabError with qemu's message when it fails."""
    log.debug("Run cmd=%s", " ".join(cmd))
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except FileNotFoundError:
        raise LabError(f"{cmd[0]} not found (install qemu-utils)") from None
    except subprocess.TimeoutExpired:
        raise LabError(f"{cmd[0]} {cmd[1] if len(cmd) > 1 else ''} timed out after {timeout}s") from None
    if p.returncode != 0:
        err = (p.stderr or p.stdout).strip().splitlines()
        msg = err[-1] if err else f"exit code {p.returncode}"
        raise LabError(f"{cmd[0]} {cmd[1] if len(cmd) > 1 else ''} failed: {msg}")
    return p.stdout


def create(
    path: Path,
    fmt: str,
    size: int | None = None,
    backing: Path | None = None,
    backing_fmt: str | None = None,
    preallocation: str | None = None,
) -> None:
    """Create an image; qcow2 images get vdsm's options, and a backing file when given."""
    cmd = ["qemu-img", "create", "-f", fmt]
    opts = []
    if fmt == "qcow2":
        opts.append(QCOW2_OPTIONS)
    if preallocation:
        opts.append(f"preallocation={preallocation}")
    if opts:
        cmd += ["-o", ",".join(opts)]
    if backing is not None:
        # vdsm writes relative backing names (the volume id): chains survive a moved mount point.
        cmd += ["-b", str(backing), "-F", backing_fmt or "qcow2", "-u"]
    cmd.append(str(path))
    if size is not None:
        cmd.append(str(size))
    run(cmd)


def info(path: Path, chain: bool = False, force_share: bool = True) -> Any:
    """``qemu-img info --output json`` (a list, base last, with ``chain``).

    ``force_share`` (-U) lets the lab inspect an image a running "VM" holds open for writing, as vdsm does
    for metadata only.
    """
    cmd = ["qemu-img", "info", "--output", "json"]
    if chain:
        cmd.append("--backing-chain")
    if force_share:
        cmd.append("-U")
    cmd.append(str(path))
    return json.loads(run(cmd))


def measure(path: Path, out_fmt: str = "qcow2", src_fmt: str | None = None) -> dict[str, int]:
    """``qemu-img measure``: bytes needed to copy the image (required, fully-allocated)."""
    cmd = ["qemu-img", "measure", "--output", "json", "-O", out_fmt]
    if src_fmt:
        cmd += ["-f", src_fmt]
    cmd.append(str(path))
    return dict(json.loads(run(cmd)))


def rebase(path: Path, backing: Path | str | None, backing_fmt: str = "qcow2", unsafe: bool = False) -> None:
    """Change the backing file; safe mode copies the differing clusters, unsafe only rewrites the header."""
    cmd = ["qemu-img", "rebase", "-f", "qcow2"]
    if unsafe:
        cmd.append("-u")
    if backing is None:
        cmd += ["-b", ""]
    else:
        cmd += ["-b", str(backing), "-F", backing_fmt]
    cmd.append(str(path))
    run(cmd)


def commit(path: Path, base: Path | None = None, drop: bool = False) -> None:
    """Commit ``path`` into its backing file (or ``base``, further down); ``drop`` (-d) leaves it unchanged."""
    cmd = ["qemu-img", "commit", "-f", "qcow2"]
    if drop:
        cmd.append("-d")
    if base is not None:
        cmd += ["-b", str(base)]
    cmd.append(str(path))
    run(cmd)


def convert(src: Path, dst: Path, src_fmt: str, dst_fmt: str = "raw", bitmaps: bool = False) -> None:
    """``qemu-img convert``; ``bitmaps`` copies persistent bitmaps (as vdsm does when copying a volume)."""
    cmd = ["qemu-img", "convert", "-U", "-f", src_fmt, "-O", dst_fmt]
    if bitmaps:
        cmd.append("--bitmaps")
    cmd += [str(src), str(dst)]
    run(cmd)


def _bitmap(path: Path, op: list[str], name: str) -> None:
    run(["qemu-img", "bitmap", "-f", "qcow2", *op, str(path), name])


def bitmap_add(path: Path, name: str, disabled: bool = False, granularity: int | None = None) -> None:
    """Add a persistent dirty bitmap (vdsm: a checkpoint)."""
    op = ["--add"]
    if disabled:
        op.append("--disable")
    if granularity:
        op += ["-g", str(granularity)]
    _bitmap(path, op, name)


def bitmap_remove(path: Path, name: str) -> None:
    _bitmap(path, ["--remove"], name)


def bitmap_enable(path: Path, name: str) -> None:
    _bitmap(path, ["--enable"], name)


def bitmap_disable(path: Path, name: str) -> None:
    _bitmap(path, ["--disable"], name)


def bitmap_clear(path: Path, name: str) -> None:
    _bitmap(path, ["--clear"], name)


def bitmap_merge(path: Path, name: str, source: str, source_file: Path | None = None) -> None:
    """Merge bitmap ``source`` (of ``source_file``, or of ``path``) into bitmap ``name`` of ``path``."""
    op = ["--merge", source]
    if source_file is not None:
        op += ["-b", str(source_file), "-F", "qcow2"]
    _bitmap(path, op, name)


def bitmaps(path: Path) -> list[dict[str, Any]]:
    """The persistent bitmaps of one qcow2 image (name, granularity, flags: auto/in-use/...)."""
    data = info(path)
    spec = data.get("format-specific", {}).get("data", {})
    return list(spec.get("bitmaps", []))


def io(path: Path, fmt: str, commands: list[str], force_share: bool = False) -> str:
    """Run qemu-io commands (``write -P 0x5a 0 64k`` ...) on an image, opened read-write."""
    cmd = ["qemu-io", "-f", fmt]
    if force_share:
        cmd.append("-U")
    for c in commands:
        cmd += ["-c", c]
    cmd.append(str(path))
    out = run(cmd)
    # qemu-io reports some failures on stdout and still exits 0.
    for line in out.splitlines():
        if "failed" in line.lower() or line.startswith("qemu-io:"):
            raise LabError(f"qemu-io on {path.name} failed: {line.strip()}")
    return out

"""Tests of lab.guest: writes land exactly where reported, bitmaps see them, locks are respected."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from lab import guest, qemu
from lab.errors import LabError
from lab.imageio import NbdExport

MiB = 1024**2
CLUSTER = 65536


def _raw(image: Path, fmt: str, out: Path) -> bytes:
    qemu.convert(image, out, fmt, "raw")
    return out.read_bytes()


def _dirty(image: Path, bitmap: str) -> list[tuple[int, int]]:
    out = subprocess.run(
        ["nbdinfo", f"--map=qemu:dirty-bitmap:{bitmap}", "--json", "--",
         "[", "qemu-nbd", "-r", "-f", "qcow2", "-B", bitmap, str(image), "]"],
        check=True, capture_output=True, text=True, timeout=30,
    ).stdout
    return [(e["offset"], e["length"]) for e in json.loads(out) if e["type"] & 1]


def _check_changes(before: bytes, after: bytes, extents: list[dict[str, int | bool]]) -> None:
    mask = bytearray(len(before))
    for e in extents:
        s, n = int(e["start"]), int(e["length"])
        mask[s:s + n] = b"\1" * n
        # Random data: every 64 KiB cluster written is different from what was there.
        for c in range(s, s + n, CLUSTER):
            assert after[c:c + CLUSTER] != before[c:c + CLUSTER]
    same = [i for i in range(0, len(before), CLUSTER) if not mask[i]]
    assert all(after[i:i + CLUSTER] == before[i:i + CLUSTER] for i in same)


def test_write_qcow2_with_bitmap(tmp_path: Path) -> None:
    img = tmp_path / "active.qcow2"
    qemu.create(img, "qcow2", size=16 * MiB)
    qemu.io(img, "qcow2", ["write -P 0x11 0 16M"])
    qemu.bitmap_add(img, "checkpoint")
    before = _raw(img, "qcow2", tmp_path / "a.raw")
    extents = guest.write(img, "qcow2", percent=10, seed=7)
    clusters = 16 * MiB // CLUSTER
    assert sum(int(e["length"]) for e in extents) == round(clusters * 0.10) * CLUSTER
    assert all(e["dirty"] is True and int(e["start"]) % CLUSTER == 0 for e in extents)
    assert _dirty(img, "checkpoint") == [(int(e["start"]), int(e["length"])) for e in extents]
    _check_changes(before, _raw(img, "qcow2", tmp_path / "b.raw"), extents)


def test_write_raw_and_determinism(tmp_path: Path) -> None:
    img = tmp_path / "disk.raw"
    with open(img, "wb") as f:
        f.truncate(8 * MiB)
    before = img.read_bytes()
    extents = guest.write(img, "raw", percent=25, seed=3)
    _check_changes(before, img.read_bytes(), extents)
    assert guest.pick_extents(8 * MiB, 25, 3) == [(int(e["start"]), int(e["length"])) for e in extents]
    assert guest.pick_extents(8 * MiB, 25, 4) != guest.pick_extents(8 * MiB, 25, 3)
    assert guest.write(img, "raw", percent=0, seed=1) == []
    assert guest.pick_extents(8 * MiB, 100, 1) == [(0, 8 * MiB)]
    # Unaligned size: the last cluster is cut at the end of the disk.
    assert guest.pick_extents(100_000, 100, 1) == [(0, 100_000)]


def test_write_refused_while_backup_reads(tmp_path: Path) -> None:
    img = tmp_path / "active.qcow2"
    qemu.create(img, "qcow2", size=4 * MiB)
    before = _raw(img, "qcow2", tmp_path / "a.raw")
    with NbdExport(img, "qcow2", read_only=True), pytest.raises(LabError, match="in use by a reader"):
        guest.write(img, "qcow2", percent=50, seed=1)
    assert _raw(img, "qcow2", tmp_path / "b.raw") == before
    assert guest.write(img, "qcow2", percent=50, seed=1)


def test_bad_percent(tmp_path: Path) -> None:
    img = tmp_path / "d.qcow2"
    qemu.create(img, "qcow2", size=MiB)
    with pytest.raises(LabError, match="out of range"):
        guest.write(img, "qcow2", percent=120, seed=1)

"""Tests of the realistic image builder and the block changer (real mkfs.ext4, e2fsck, debugfs, qemu-img)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from lab import images
from lab.errors import LabError

SIZE = 64 * 1024**2


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("image-cache")


@pytest.fixture(scope="module")
def raw(cache: Path, tmp_path_factory: pytest.TempPathFactory) -> images.ImageInfo:
    return images.build_image(tmp_path_factory.mktemp("img") / "disk.raw", SIZE, fill=0.5, seed=7, cache_dir=cache)


def _data_bytes(path: Path) -> int:
    """Bytes of non-zero 64 KiB clusters in a file."""
    total = 0
    with open(path, "rb") as f:
        while chunk := f.read(images.CLUSTER):
            if chunk.count(0) != len(chunk):
                total += len(chunk)
    return total


def test_build_raw_is_a_sparse_ext4_with_real_files(raw: images.ImageInfo) -> None:
    assert raw.path.stat().st_size == SIZE
    assert raw.format == "raw"
    assert raw.files > 50
    # The budget is half the disk; files alone fill most of it, and the rest of the disk stays zero.
    assert 0.3 * SIZE < raw.data_bytes <= 0.5 * SIZE
    assert raw.allocated < 0.8 * SIZE
    assert raw.data_bytes <= _data_bytes(raw.path) < 0.8 * SIZE
    fsck = subprocess.run(["e2fsck", "-fn", str(raw.path)], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr


def test_files_in_image_match_their_sources(raw: images.ImageInfo) -> None:
    chosen = images.select_files(int(SIZE * 0.5), seed=7)
    assert len(chosen) == raw.files
    # A few files, the largest and some others, read back from inside the filesystem with debugfs.
    picks = [max(chosen, key=lambda c: c[2]), chosen[0], chosen[len(chosen) // 2]]
    for src, rel, size in picks:
        out = subprocess.run(
            ["debugfs", "-R", f"cat /{rel}", str(raw.path)], capture_output=True, check=True
        ).stdout
        assert len(out) == size
        assert out == src.read_bytes()


def test_selection_is_deterministic_per_seed() -> None:
    a = images.select_files(8 * 1024**2, seed=1)
    b = images.select_files(8 * 1024**2, seed=1)
    c = images.select_files(8 * 1024**2, seed=2)
    assert [x[1] for x in a] == [x[1] for x in b]
    assert [x[1] for x in a] != [x[1] for x in c]
    assert sum(-(-x[2] // 4096) * 4096 for x in a) <= 8 * 1024**2


def test_cache_is_reused_and_copies_are_independent(raw: images.ImageInfo, cache: Path, tmp_path: Path) -> None:
    again = images.build_image(tmp_path / "again.raw", SIZE, fill=0.5, seed=7, cache_dir=cache)
    assert again.cached
    assert again.files == raw.files
    assert again.path.read_bytes() == raw.path.read_bytes()
    images.change_blocks(again.path, 5, seed=1)
    cached = images.build_image(None, SIZE, fill=0.5, seed=7, cache_dir=cache)
    assert cached.path.parent == cache
    assert cached.path.read_bytes() == raw.path.read_bytes()


def test_qcow2_output_has_the_same_content(raw: images.ImageInfo, cache: Path, tmp_path: Path) -> None:
    q = images.build_image(tmp_path / "disk.qcow2", SIZE, fill=0.5, seed=7, fmt="qcow2", cache_dir=cache)
    info = json.loads(
        subprocess.run(["qemu-img", "info", "--output=json", str(q.path)], capture_output=True, check=True).stdout
    )
    assert info["format"] == "qcow2"
    assert info["virtual-size"] == SIZE
    cmp = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "qcow2", str(raw.path), str(q.path)])
    assert cmp.returncode == 0
    with pytest.raises(LabError, match="qcow2"):
        images.change_blocks(q.path, 1, seed=0)


def test_change_blocks_writes_exactly_the_reported_extents(raw: images.ImageInfo, tmp_path: Path) -> None:
    disk = tmp_path / "changed.raw"
    shutil.copyfile(raw.path, disk)
    extents = images.change_blocks(disk, 2, seed=11)
    nclusters = SIZE // images.CLUSTER
    assert images.dirty_bytes(extents) == round(nclusters * 0.02) * images.CLUSTER
    # Whole disk covered, in order, merged (neighbours differ), in imageio's dirty-extent shape.
    pos = 0
    for prev, ext in zip([None, *extents], extents, strict=False):
        assert set(ext) == {"start", "length", "dirty", "zero"}
        assert ext["start"] == pos and ext["length"] > 0 and ext["zero"] is False
        if prev is not None:
            assert prev["dirty"] != ext["dirty"]
        pos += int(ext["length"])
    assert pos == SIZE
    # Runs: fewer dirty extents than dirty clusters, as a guest writing files would produce.
    dirty = [e for e in extents if e["dirty"]]
    assert len(dirty) < round(nclusters * 0.02)
    old, new = raw.path.read_bytes(), disk.read_bytes()
    for ext in extents:
        s, e = int(ext["start"]), int(ext["start"]) + int(ext["length"])
        if ext["dirty"]:
            for c in range(s, e, images.CLUSTER):
                assert old[c : c + images.CLUSTER] != new[c : c + images.CLUSTER]
        else:
            assert old[s:e] == new[s:e]


def test_change_blocks_is_deterministic(raw: images.ImageInfo, tmp_path: Path) -> None:
    a, b = tmp_path / "a.raw", tmp_path / "b.raw"
    shutil.copyfile(raw.path, a)
    shutil.copyfile(raw.path, b)
    assert images.change_blocks(a, 1, seed=3) == images.change_blocks(b, 1, seed=3)
    assert a.read_bytes() == b.read_bytes()


def test_sizes_and_bad_input(tmp_path: Path) -> None:
    assert images.parse_size("64M") == SIZE
    assert images.parse_size("6GiB") == 6 * 1024**3
    assert images.parse_size(4096) == 4096
    assert images.format_size(6 * 1024**3) == "6G"
    with pytest.raises(LabError, match="bad size"):
        images.parse_size("lots")
    with pytest.raises(LabError, match="multiple of 64 KiB"):
        images.build_image(tmp_path / "x.raw", 1000, cache_dir=tmp_path)
    with pytest.raises(LabError, match="format"):
        images.build_image(tmp_path / "x.raw", SIZE, fmt="vmdk", cache_dir=tmp_path)
    with pytest.raises(LabError, match="percent"):
        (tmp_path / "z.raw").write_bytes(b"\0" * images.CLUSTER)
        images.change_blocks(tmp_path / "z.raw", 101, seed=0)

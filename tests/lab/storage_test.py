"""Tests of lab.storage: vdsm layout, chains, snapshots as layers, cold merge, bitmaps as checkpoints."""

from __future__ import annotations

import json
import subprocess
import uuid
from pathlib import Path

import pytest

from lab import qemu
from lab.errors import LabError
from lab.storage import BLANK_UUID, Domain

MiB = 1024**2


def _id() -> str:
    return str(uuid.uuid4())


def _raw(path: Path, out: Path) -> bytes:
    qemu.convert(path, out, "qcow2" if qemu.info(path)["format"] == "qcow2" else "raw", "raw")
    return out.read_bytes()


def _dirty(image: Path, bitmap: str) -> list[tuple[int, int]]:
    """Dirty extents of a bitmap as qemu-nbd exports them (read by nbdinfo, a real NBD client)."""
    out = subprocess.run(
        ["nbdinfo", f"--map=qemu:dirty-bitmap:{bitmap}", "--json", "--",
         "[", "qemu-nbd", "-r", "-f", "qcow2", "-B", bitmap, str(image), "]"],
        check=True, capture_output=True, text=True, timeout=30,
    ).stdout
    return [(e["offset"], e["length"]) for e in json.loads(out) if e["type"] & 1]


@pytest.fixture(params=["file", "block"])
def domain(tmp_path: Path, request: pytest.FixtureRequest) -> Domain:
    return Domain(tmp_path / "mnt", _id(), f"sd-{request.param}", request.param)


def test_layout(domain: Domain) -> None:
    disk, vol = _id(), _id()
    path = domain.create_volume(disk, vol, 4 * MiB, "cow")
    assert path == domain.root / domain.id / "images" / disk / vol
    assert (domain.root / domain.id / "dom_md" / "metadata").read_text().startswith("CLASS=Data")
    md = domain.volume_info(disk, vol)
    assert md["FORMAT"] == "COW" and md["VOLTYPE"] == "LEAF" and md["PUUID"] == BLANK_UUID
    assert md["CAP"] == str(4 * MiB) and md["IMAGE"] == disk
    assert qemu.info(path)["format"] == "qcow2"
    assert domain.disks() == [disk] and domain.volumes(disk) == [vol]
    if domain.kind == "block":
        assert path.is_symlink() and Path(path.readlink()) == domain.dev_path(vol)
        assert (domain.root / "lvm" / domain.id / f"{vol}.tags").read_text().split(",")[0] == f"IU_{disk}"
        domain.deactivate(vol)
        assert not domain.dev_path(vol).exists() and not path.exists()
        assert domain.data_path(disk, vol).exists()
        domain.activate(vol)
        assert path.exists()


def test_snapshot_layers_and_merge(domain: Domain, tmp_path: Path) -> None:
    disk, base, s1, s2 = _id(), _id(), _id(), _id()
    domain.create_volume(disk, base, 2 * MiB, "raw")
    qemu.io(domain.volume_path(disk, base), "raw", ["write -P 0x11 0 1M"])
    snap1 = _raw(domain.volume_path(disk, base), tmp_path / "snap1.raw")

    domain.add_layer(disk, base, s1)
    assert domain.volume_info(disk, base)["VOLTYPE"] == "INTERNAL"
    assert domain.chain(disk, s1) == [base, s1]
    # The new layer names its backing file by volume id only, as vdsm writes it.
    assert qemu.info(domain.volume_path(disk, s1))["backing-filename"] == base
    qemu.io(domain.volume_path(disk, s1), "qcow2", ["write -P 0x22 512k 512k"])
    domain.add_layer(disk, s1, s2)
    qemu.io(domain.volume_path(disk, s2), "qcow2", ["write -P 0x33 1536k 64k"])
    assert domain.chain(disk, s2) == [base, s1, s2]
    assert domain.top(disk) == s2
    before = _raw(domain.volume_path(disk, s2), tmp_path / "before.raw")
    assert _raw(domain.volume_path(disk, base), tmp_path / "b.raw") == snap1

    # Removing the snapshot whose volume is s1 merges s2 into s1; s1 becomes the leaf.
    assert domain.merge(disk, s1) == s2
    assert domain.chain(disk, s1) == [base, s1]
    assert domain.top(disk) == s1 and sorted(domain.volumes(disk)) == sorted([base, s1])
    assert _raw(domain.volume_path(disk, s1), tmp_path / "after.raw") == before
    # Then the first snapshot: s1 merged into the raw base.
    assert domain.merge(disk, base) == s1
    assert domain.chain(disk, base) == [base]
    assert domain.volume_info(disk, base)["VOLTYPE"] == "LEAF"
    assert _raw(domain.volume_path(disk, base), tmp_path / "after2.raw") == before


def test_merge_rebases_grandchildren(domain: Domain, tmp_path: Path) -> None:
    disk, a, b, c = _id(), _id(), _id(), _id()
    domain.create_volume(disk, a, 1 * MiB, "cow")
    qemu.io(domain.volume_path(disk, a), "qcow2", ["write -P 1 0 256k"])
    domain.add_layer(disk, a, b)
    qemu.io(domain.volume_path(disk, b), "qcow2", ["write -P 2 256k 256k"])
    domain.add_layer(disk, b, c)
    qemu.io(domain.volume_path(disk, c), "qcow2", ["write -P 3 512k 256k"])
    before = _raw(domain.volume_path(disk, c), tmp_path / "x.raw")
    assert domain.merge(disk, a) == b
    assert domain.chain(disk, c) == [a, c]
    assert qemu.info(domain.volume_path(disk, c))["backing-filename"] == a
    assert domain.volume_info(disk, a)["VOLTYPE"] == "INTERNAL"
    assert _raw(domain.volume_path(disk, c), tmp_path / "y.raw") == before


def test_bitmaps_carried_and_merged(domain: Domain, tmp_path: Path) -> None:
    disk, base, top = _id(), _id(), _id()
    domain.create_volume(disk, base, 4 * MiB, "cow")
    domain.add_bitmap(disk, base, "cp1")
    qemu.io(domain.volume_path(disk, base), "qcow2", ["write 0 64k"])
    domain.add_layer(disk, base, top)
    assert [b["name"] for b in domain.bitmaps(disk, top)] == ["cp1"]
    qemu.io(domain.volume_path(disk, top), "qcow2", ["write 1M 128k"])

    # The top's bitmap alone knows only the writes after the snapshot; the overlay merges the chain.
    assert _dirty(domain.volume_path(disk, top), "cp1") == [(MiB, 128 * 1024)]
    overlay = domain.backup_overlay(disk, top, "cp1", tmp_path / "overlay.qcow2")
    assert _dirty(overlay, "cp1") == [(0, 65536), (MiB, 128 * 1024)]
    overlay.unlink()

    domain.merge(disk, base)
    assert _dirty(domain.volume_path(disk, base), "cp1") == [(0, 65536), (MiB, 128 * 1024)]
    domain.remove_bitmap_chain(disk, base, "cp1")
    assert domain.bitmaps(disk, base) == []
    with pytest.raises(LabError, match="no bitmap cp1"):
        domain.backup_overlay(disk, base, "cp1", tmp_path / "o2.qcow2")


def test_sizes_and_delete(domain: Domain) -> None:
    disk, thin, thick_disk, thick = _id(), _id(), _id(), _id()
    domain.create_volume(disk, thin, 8 * MiB, "raw", sparse=True)
    domain.create_volume(thick_disk, thick, 8 * MiB, "raw", sparse=False)
    assert domain.actual_size(disk, thin) == 0
    assert domain.actual_size(thick_disk, thick) >= 8 * MiB
    assert domain.virtual_size(disk, thin) == 8 * MiB
    domain.delete_disk(disk)
    assert disk not in domain.disks()
    assert not domain.data_path(disk, thin).exists()
    with pytest.raises(LabError, match="no volume"):
        domain.volume_info(disk, thin)


def test_bad_input(domain: Domain) -> None:
    disk, v = _id(), _id()
    with pytest.raises(LabError, match="unknown volume format"):
        domain.create_volume(disk, v, MiB, "vmdk")
    domain.create_volume(disk, v, MiB, "cow")
    with pytest.raises(LabError, match="already exists"):
        domain.create_volume(disk, v, MiB, "cow")
    with pytest.raises(LabError, match="no child"):
        domain.merge(disk, v)
    with pytest.raises(LabError, match="unknown storage domain kind"):
        Domain(domain.root, _id(), "x", "tape")


def test_rhev_paths(domain: Domain, tmp_path: Path) -> None:
    disk, vol = _id(), _id()
    domain.create_volume(disk, vol, MiB, "cow")
    rhev = tmp_path / "rhev" / "data-center"
    pool = _id()
    mnt = domain.link_rhev(rhev, pool)
    assert mnt.parent.name == ("blockSD" if domain.kind == "block" else f"lab-nfs.localdomain:_exports_{domain.name}")
    host = domain.host_path(rhev, disk, vol)
    assert host.read_bytes() == domain.volume_path(disk, vol).read_bytes()
    assert (rhev / pool / domain.id / "images" / disk / vol).exists()
    # The chain resolves through the host path too (relative backing names).
    top = _id()
    domain.add_layer(disk, vol, top)
    chain = qemu.info(domain.host_path(rhev, disk, top), chain=True)
    assert [Path(i["filename"]).name for i in chain] == [top, vol]
    assert domain.link_rhev(rhev, pool) == mnt


def test_live_backup_with_transient_layer(tmp_path: Path) -> None:
    """The point-in-time recipe of lab/README.md: the guest keeps writing while the backup reads a frozen top."""
    from lab import guest
    from lab.imageio import NbdExport

    dom = Domain(tmp_path / "mnt", _id(), "nfs1", "file")
    disk, top, tmp = _id(), _id(), _id()
    dom.create_volume(disk, top, 8 * MiB, "cow")
    dom.add_bitmap(disk, top, "cp1")
    written = guest.write(dom.volume_path(disk, top), "qcow2", percent=10, seed=1)
    frozen = _raw(dom.volume_path(disk, top), tmp_path / "frozen.raw")

    # Backup start: the new checkpoint, then a transient layer that takes the guest's writes.
    dom.add_bitmap(disk, top, "cp2")
    dom.add_layer(disk, top, tmp)
    overlay = dom.backup_overlay(disk, top, "cp1", tmp_path / "overlay.qcow2")
    with NbdExport(overlay, "qcow2", read_only=True, bitmap="cp1") as nbd:
        during = guest.write(dom.volume_path(disk, tmp), "qcow2", percent=5, seed=2)
        out = tmp_path / "backup.raw"
        qemu.run(["qemu-img", "convert", "-f", "raw", "-O", "raw", f"nbd+unix:///?socket={nbd.socket}", str(out)])
        assert out.read_bytes() == frozen
    assert _dirty(overlay, "cp1") == [(int(e["start"]), int(e["length"])) for e in written]
    overlay.unlink()

    # Finalize: fold the transient layer back; the active volume id is unchanged, cp2 saw the writes.
    assert dom.merge(disk, top) == tmp
    assert dom.top(disk) == top
    assert _dirty(dom.volume_path(disk, top), "cp2") == [(int(e["start"]), int(e["length"])) for e in during]


def test_resize_and_usage(domain: Domain, tmp_path: Path) -> None:
    disk, base, top = _id(), _id(), _id()
    domain.create_volume(disk, base, 2 * MiB, "raw")
    domain.add_layer(disk, base, top)
    with pytest.raises(LabError, match="not the leaf"):
        domain.resize(disk, base, 4 * MiB)
    domain.resize(disk, top, 4 * MiB)
    assert domain.virtual_size(disk, top) == 4 * MiB
    assert qemu.info(domain.volume_path(disk, top))["virtual-size"] == 4 * MiB
    with pytest.raises(LabError, match="cannot shrink"):
        domain.resize(disk, top, MiB)
    used0, avail = domain.usage()
    qemu.io(domain.volume_path(disk, top), "qcow2", ["write -P 1 3M 1M"])
    used1, _ = domain.usage()
    assert avail > 0 and used1 >= used0 + MiB

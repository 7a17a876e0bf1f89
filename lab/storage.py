"""Storage domains laid out as vdsm lays them, with qcow2 chains made by qemu-img.

A file domain (NFS, Gluster) is a directory ``<root>/<sd>/`` holding ``dom_md/`` and
``images/<disk>/<volume>`` files, each with a ``.meta`` file in vdsm's key=value format (storage format 5).
Volume files name their backing file by volume id only (relative), as vdsm writes them, so a chain works
from whatever mount point it is reached through.

A block domain (iSCSI, FC) is an LVM volume group named by the domain id whose logical volumes are the
volumes. device-mapper cannot run on this kernel, so the lab emulates the narrowest piece: the LV's data is a
file ``<root>/lvm/<sd>/<volume>`` (with ``.tags`` as LVM tags IU_/PU_/MD_ and ``.meta`` standing for vdsm's
metadata slot); activating it makes ``<root>/dev/<sd>/<volume>`` (as /dev/<vg>/<lv>) point at it, and
``<root>/<sd>/images/<disk>/<volume>`` links to that /dev path as vdsm's prepared images do. ``lvs`` and
``lvchange -ay/-an`` scripts over SSH (lab.sshd) act on the same files.

Snapshots add a layer (the old top becomes the snapshot's volume, INTERNAL); the persistent dirty bitmaps of
the old top are added, empty, to the new layer, as vdsm's ``bitmaps.add_bitmaps`` does. Removing a snapshot
is vdsm's cold merge: the child is committed into the snapshot's volume, bitmaps merged, grandchildren
rebased, the child deleted; the snapshot's volume id survives.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

from lab import qemu
from lab.errors import LabError

log = logging.getLogger("lab.storage")

BLANK_UUID = "00000000-0000-0000-0000-000000000000"
FORMATS = {"cow": "qcow2", "raw": "raw"}
KINDS = ("file", "block")
# vdsm's default bitmap granularity: 64 KiB, the qcow2 cluster size.
BITMAP_GRANULARITY = 65536


class Domain:
    """One storage domain of kind "file" (NFS/Gluster-like) or "block" (iSCSI, emulated LVM)."""

    def __init__(self, root: Path | str, id: str, name: str, kind: str = "file") -> None:
        if kind not in KINDS:
            raise LabError(f"unknown storage domain kind {kind!r} (file or block)")
        self.root = Path(root)
        self.id = id
        self.name = name
        self.kind = kind
        self.path = self.root / id
        self.images = self.path / "images"
        # Emulated LVM: the VG's LVs (data) and the /dev/<vg> directory of active LVs.
        self.vg_dir = self.root / "lvm" / id
        self.dev_dir = self.root / "dev" / id
        self._init_layout()

    def _init_layout(self) -> None:
        self.images.mkdir(parents=True, exist_ok=True)
        md = self.path / "dom_md"
        md.mkdir(exist_ok=True)
        meta = md / "metadata"
        if not meta.exists():
            sd_type = "NFS" if self.kind == "file" else "ISCSI"
            meta.write_text(
                f"CLASS=Data\nDESCRIPTION={self.name}\nROLE=Regular\nSDUUID={self.id}\n"
                f"TYPE={sd_type}\nVERSION=5\nBLOCK_SIZE=512\nALIGNMENT=1048576\n"
            )
            for name in ("ids", "leases", "inbox", "outbox", "xleases"):
                (md / name).touch()
        if self.kind == "block":
            self.vg_dir.mkdir(parents=True, exist_ok=True)
            self.dev_dir.mkdir(parents=True, exist_ok=True)

    # Paths

    def volume_path(self, disk_id: str, volume_id: str) -> Path:
        """The volume as a host reaches it: ``<root>/<sd>/images/<disk>/<volume>``."""
        return self.images / disk_id / volume_id

    def data_path(self, disk_id: str, volume_id: str) -> Path:
        """The file holding the volume's bytes (for block domains: the emulated LV, active or not)."""
        if self.kind == "block":
            return self.vg_dir / volume_id
        return self.volume_path(disk_id, volume_id)

    def dev_path(self, volume_id: str) -> Path:
        """Block domains: the /dev/<vg>/<lv> path, present only while the LV is active."""
        return self.dev_dir / volume_id

    @property
    def mount_name(self) -> str:
        """The directory vdsm mounts the domain on under /rhev/data-center/mnt (``server:_export`` or blockSD)."""
        if self.kind == "block":
            return "blockSD"
        return f"lab-nfs.localdomain:_exports_{self.name}"

    def link_rhev(self, rhev_root: Path | str, pool_id: str) -> Path:
        """Make the domain reachable as on a host; return ``<rhev_root>/mnt/<mount_name>/<sd>``.

        ``rhev_root`` stands for /rhev/data-center (the lab keeps it under its own directory, never in /).
        Both vdsm paths are linked: ``mnt/<mount>/<sd>`` and the pool's ``<pool>/<sd>``.
        """
        root = Path(rhev_root)
        mnt = root / "mnt" / self.mount_name / self.id
        pool = root / pool_id / self.id
        for link in (mnt, pool):
            link.parent.mkdir(parents=True, exist_ok=True)
            if not link.is_symlink():
                link.symlink_to(self.path.absolute())
        return mnt

    def host_path(self, rhev_root: Path | str, disk_id: str, volume_id: str) -> Path:
        """The volume's path on a host: ``<rhev_root>/mnt/<mount>/<sd>/images/<disk>/<volume>``."""
        return Path(rhev_root) / "mnt" / self.mount_name / self.id / "images" / disk_id / volume_id

    def _meta_path(self, disk_id: str, volume_id: str) -> Path:
        if self.kind == "block":
            return self.vg_dir / f"{volume_id}.meta"
        return self.images / disk_id / f"{volume_id}.meta"

    # Metadata

    def volume_info(self, disk_id: str, volume_id: str) -> dict[str, str]:
        """The volume's vdsm metadata (CAP, FORMAT, TYPE, VOLTYPE, PUUID, IMAGE, ...)."""
        p = self._meta_path(disk_id, volume_id)
        try:
            text = p.read_text()
        except FileNotFoundError:
            raise LabError(f"no volume {volume_id} in disk {disk_id} of domain {self.name}") from None
        md: dict[str, str] = {}
        for line in text.splitlines():
            if "=" in line:
                k, v = line.split("=", 1)
                md[k] = v
        return md

    def _write_meta(self, disk_id: str, volume_id: str, md: dict[str, str]) -> None:
        p = self._meta_path(disk_id, volume_id)
        tmp = p.with_suffix(".meta.tmp")
        tmp.write_text("".join(f"{k}={v}\n" for k, v in md.items()) + "EOF\n")
        os.replace(tmp, p)
        if self.kind == "block":
            tags = [f"IU_{disk_id}", f"PU_{md['PUUID']}", f"MD_{md.get('SLOT', '1')}"]
            (self.vg_dir / f"{volume_id}.tags").write_text(",".join(tags) + "\n")

    def _update_meta(self, disk_id: str, volume_id: str, **changes: str) -> None:
        md = self.volume_info(disk_id, volume_id)
        md.update(changes)
        md.pop("EOF", None)
        self._write_meta(disk_id, volume_id, md)

    def disks(self) -> list[str]:
        """Ids of the disks (vdsm images) in this domain."""
        return sorted(p.name for p in self.images.iterdir() if p.is_dir())

    def volumes(self, disk_id: str) -> list[str]:
        """Ids of the volumes of one disk, in no particular order."""
        if self.kind == "block":
            tag = f"IU_{disk_id}"
            return sorted(
                p.name[: -len(".tags")]
                for p in self.vg_dir.glob("*.tags")
                if tag in p.read_text().strip().split(",")
            )
        d = self.images / disk_id
        if not d.is_dir():
            return []
        return sorted(p.name[: -len(".meta")] for p in d.glob("*.meta"))

    def chain(self, disk_id: str, top_id: str) -> list[str]:
        """Volume ids from the base to ``top_id``."""
        out = [top_id]
        seen = {top_id}
        parent = self.volume_info(disk_id, top_id)["PUUID"]
        while parent != BLANK_UUID:
            if parent in seen:
                raise LabError(f"disk {disk_id}: loop in volume chain at {parent}")
            out.append(parent)
            seen.add(parent)
            parent = self.volume_info(disk_id, parent)["PUUID"]
        out.reverse()
        return out

    def children(self, disk_id: str, volume_id: str) -> list[str]:
        return [v for v in self.volumes(disk_id) if self.volume_info(disk_id, v)["PUUID"] == volume_id]

    def top(self, disk_id: str) -> str:
        """The disk's leaf (active) volume."""
        leaves = [v for v in self.volumes(disk_id) if self.volume_info(disk_id, v)["VOLTYPE"] == "LEAF"]
        if len(leaves) != 1:
            raise LabError(f"disk {disk_id}: expected one leaf volume, found {len(leaves)}")
        return leaves[0]

    # Volumes

    def create_volume(
        self,
        disk_id: str,
        volume_id: str,
        size: int,
        fmt: str,
        sparse: bool = True,
        parent: str | None = None,
        description: str = "",
    ) -> Path:
        """Create a volume of ``size`` bytes, "cow" (qcow2) or "raw", on top of ``parent`` if given."""
        if fmt not in FORMATS:
            raise LabError(f"unknown volume format {fmt!r} (cow or raw)")
        if parent is not None and fmt != "cow":
            raise LabError("a volume with a parent must be cow")
        if self._meta_path(disk_id, volume_id).exists():
            raise LabError(f"volume {volume_id} already exists in domain {self.name}")
        (self.images / disk_id).mkdir(parents=True, exist_ok=True)
        data = self.data_path(disk_id, volume_id)
        parent_fmt = None
        if parent is not None:
            pmd = self.volume_info(disk_id, parent)
            parent_fmt = FORMATS[pmd["FORMAT"].lower()]
            size = int(pmd["CAP"])
        if self.kind == "block":
            self._link_block(disk_id, volume_id)
        if fmt == "raw":
            with open(data, "wb") as f:
                f.truncate(size)
                if not sparse:
                    # Preallocated raw: blocks really allocated, as on a thick LV or a preallocated NFS file.
                    os.posix_fallocate(f.fileno(), 0, size)
        else:
            # Created through its images/<disk> path so the relative backing name resolves as on a host.
            qemu.create(
                self.volume_path(disk_id, volume_id),
                "qcow2",
                size=size,
                backing=Path(parent) if parent else None,
                backing_fmt=parent_fmt,
                preallocation=None if sparse else "metadata",
            )
        md = {
            "CAP": str(size),
            "CTIME": str(int(time.time())),
            "DESCRIPTION": description,
            "DISKTYPE": "DATA",
            "DOMAIN": self.id,
            "FORMAT": fmt.upper(),
            "GEN": "0",
            "IMAGE": disk_id,
            "LEGALITY": "LEGAL",
            "PUUID": parent or BLANK_UUID,
            "TYPE": "SPARSE" if sparse else "PREALLOCATED",
            "VOLTYPE": "LEAF",
        }
        self._write_meta(disk_id, volume_id, md)
        log.info("Created volume sd=%s disk=%s vol=%s fmt=%s size=%d", self.name, disk_id, volume_id, fmt, size)
        return self.volume_path(disk_id, volume_id)

    def _link_block(self, disk_id: str, volume_id: str) -> None:
        self.vg_dir.joinpath(volume_id).touch()
        self.activate(volume_id)
        link = self.volume_path(disk_id, volume_id)
        if not link.is_symlink():
            link.symlink_to(self.dev_path(volume_id))
        # vdsm's .meta lives in the VG's metadata LV; the lab keeps it beside the LV data.

    def activate(self, volume_id: str) -> None:
        """Block domains: ``lvchange -ay``: make /dev/<vg>/<lv> appear."""
        if self.kind != "block":
            return
        dev = self.dev_path(volume_id)
        if not dev.is_symlink():
            dev.symlink_to(self.vg_dir / volume_id)

    def deactivate(self, volume_id: str) -> None:
        """Block domains: ``lvchange -an``: /dev/<vg>/<lv> disappears (the data stays)."""
        if self.kind == "block":
            self.dev_path(volume_id).unlink(missing_ok=True)

    def is_active(self, volume_id: str) -> bool:
        return self.kind == "file" or self.dev_path(volume_id).is_symlink()

    def delete_volume(self, disk_id: str, volume_id: str) -> None:
        """Remove one volume (data, metadata, links)."""
        self.volume_path(disk_id, volume_id).unlink(missing_ok=True)
        self._meta_path(disk_id, volume_id).unlink(missing_ok=True)
        if self.kind == "block":
            self.deactivate(volume_id)
            (self.vg_dir / volume_id).unlink(missing_ok=True)
            (self.vg_dir / f"{volume_id}.tags").unlink(missing_ok=True)

    def delete_disk(self, disk_id: str) -> None:
        """Remove a disk and all its volumes."""
        for v in self.volumes(disk_id):
            self.delete_volume(disk_id, v)
        shutil.rmtree(self.images / disk_id, ignore_errors=True)
        log.info("Deleted disk sd=%s disk=%s", self.name, disk_id)

    def actual_size(self, disk_id: str, volume_id: str) -> int:
        """Bytes allocated on storage for the volume (what the engine reports as actual_size)."""
        return self.data_path(disk_id, volume_id).stat().st_blocks * 512

    def resize(self, disk_id: str, volume_id: str, size: int) -> None:
        """Extend the disk (vdsm only grows volumes): the leaf with ``qemu-img resize``, CAP in its metadata."""
        md = self.volume_info(disk_id, volume_id)
        if md["VOLTYPE"] != "LEAF":
            raise LabError(f"volume {volume_id} of disk {disk_id} is not the leaf: only the active layer grows")
        if size < int(md["CAP"]):
            raise LabError(f"cannot shrink disk {disk_id} from {md['CAP']} to {size} bytes")
        if size == int(md["CAP"]):
            return
        fmt = self.qemu_format(disk_id, volume_id)
        qemu.run(["qemu-img", "resize", "-f", fmt, str(self.volume_path(disk_id, volume_id)), str(size)])
        self._update_meta(disk_id, volume_id, CAP=str(size))

    def usage(self) -> tuple[int, int]:
        """(used, available) bytes, as the engine reports a storage domain: allocated by volumes, free below."""
        used = 0
        for disk in self.disks():
            for vol in self.volumes(disk):
                with contextlib.suppress(FileNotFoundError):
                    used += self.actual_size(disk, vol)
        st = os.statvfs(self.path)
        return used, st.f_bavail * st.f_frsize

    def virtual_size(self, disk_id: str, volume_id: str) -> int:
        return int(self.volume_info(disk_id, volume_id)["CAP"])

    def qemu_format(self, disk_id: str, volume_id: str) -> str:
        """"qcow2" or "raw", as qemu tools want it."""
        return FORMATS[self.volume_info(disk_id, volume_id)["FORMAT"].lower()]

    # Snapshots

    def add_layer(self, disk_id: str, top_id: str, new_id: str) -> Path:
        """Snapshot: a new qcow2 leaf on top of ``top_id``, which becomes INTERNAL (the snapshot's volume).

        The top's persistent bitmaps are added, empty and enabled, to the new layer (vdsm's
        ``bitmaps.add_bitmaps``), so a checkpoint keeps recording writes across the snapshot.
        """
        md = self.volume_info(disk_id, top_id)
        if md["VOLTYPE"] != "LEAF":
            raise LabError(f"volume {top_id} of disk {disk_id} is not the leaf")
        path = self.create_volume(disk_id, new_id, int(md["CAP"]), "cow", parent=top_id)
        try:
            if md["FORMAT"] == "COW":
                for bm in self.bitmaps(disk_id, top_id):
                    if "in-use" in bm.get("flags", []):
                        # An inconsistent bitmap (unclean shutdown) is not carried: vdsm skips it too.
                        continue
                    qemu.bitmap_add(path, bm["name"], granularity=bm["granularity"])
        except LabError:
            self.delete_volume(disk_id, new_id)
            raise
        self._update_meta(disk_id, top_id, VOLTYPE="INTERNAL")
        return path

    def merge(self, disk_id: str, volume_id: str) -> str:
        """Remove the snapshot whose volume is ``volume_id``: merge its child into it (cold merge).

        The child's data is committed into ``volume_id``, its bitmaps merged into the same-named bitmaps of
        ``volume_id`` (added when missing), the child's children rebased onto ``volume_id``, and the child
        deleted. ``volume_id`` survives and takes the child's place (LEAF if the child was). Returns the id of
        the removed child volume.
        """
        kids = self.children(disk_id, volume_id)
        if not kids:
            raise LabError(f"volume {volume_id} of disk {disk_id} has no child to merge")
        child = kids[0]
        cmd = self.volume_info(disk_id, child)
        base_path = self.volume_path(disk_id, volume_id)
        child_path = self.volume_path(disk_id, child)
        base_cow = self.volume_info(disk_id, volume_id)["FORMAT"] == "COW"
        child_bitmaps = self.bitmaps(disk_id, child)
        # -d: the child is deleted afterwards, emptying it would only cost time.
        qemu.commit(child_path, drop=True)
        if base_cow:
            have = {b["name"] for b in self.bitmaps(disk_id, volume_id)}
            for bm in child_bitmaps:
                if "in-use" in bm.get("flags", []):
                    continue
                if bm["name"] not in have:
                    qemu.bitmap_add(base_path, bm["name"], granularity=bm["granularity"])
                qemu.bitmap_merge(base_path, bm["name"], bm["name"], source_file=child_path)
        for grandchild in self.children(disk_id, child):
            # Unsafe rebase: after the commit the base holds exactly what the child held.
            qemu.rebase(
                self.volume_path(disk_id, grandchild), volume_id, self.qemu_format(disk_id, volume_id),
                unsafe=True,
            )
            self._update_meta(disk_id, grandchild, PUUID=volume_id)
        self._update_meta(disk_id, volume_id, VOLTYPE=cmd["VOLTYPE"])
        self.delete_volume(disk_id, child)
        log.info("Merged sd=%s disk=%s child=%s into=%s", self.name, disk_id, child, volume_id)
        return child

    # Bitmaps (checkpoints)

    def add_bitmap(self, disk_id: str, volume_id: str, name: str, granularity: int = BITMAP_GRANULARITY) -> None:
        """Add a persistent dirty bitmap (a checkpoint) to a qcow2 volume."""
        if self.volume_info(disk_id, volume_id)["FORMAT"] != "COW":
            raise LabError(f"volume {volume_id} is raw: bitmaps need qcow2")
        qemu.bitmap_add(self.volume_path(disk_id, volume_id), name, granularity=granularity)

    def remove_bitmap(self, disk_id: str, volume_id: str, name: str) -> None:
        qemu.bitmap_remove(self.volume_path(disk_id, volume_id), name)

    def bitmaps(self, disk_id: str, volume_id: str) -> list[dict[str, Any]]:
        """The volume's bitmaps as qemu-img reports them: name, granularity, flags."""
        if self.volume_info(disk_id, volume_id)["FORMAT"] != "COW":
            return []
        return qemu.bitmaps(self.volume_path(disk_id, volume_id))

    def remove_bitmap_chain(self, disk_id: str, top_id: str, name: str) -> None:
        """Delete a checkpoint: its bitmap from every layer that has it."""
        for v in self.chain(disk_id, top_id):
            if any(b["name"] == name for b in self.bitmaps(disk_id, v)):
                self.remove_bitmap(disk_id, v, name)

    def backup_overlay(self, disk_id: str, top_id: str, bitmap: str, path: Path) -> Path:
        """A transient qcow2 overlay on ``top_id`` whose bitmap ``bitmap`` merges that bitmap of every layer.

        This is what vdsm does for a backup of a chain (nbd.py with a bitmap): qemu-nbd ``-B`` exports the
        bitmap of one node only, so the changes recorded in lower layers (before a snapshot) are merged into
        the overlay. Serve ``path`` with ``NbdExport(path, "qcow2", read_only=True, bitmap=bitmap)``. LabError
        when no layer has the bitmap (a broken checkpoint).
        """
        layers = [v for v in self.chain(disk_id, top_id) if self.volume_info(disk_id, v)["FORMAT"] == "COW"]
        sources = [v for v in layers if any(b["name"] == bitmap for b in self.bitmaps(disk_id, v))]
        if not sources:
            raise LabError(f"disk {disk_id}: no bitmap {bitmap} in its chain")
        top = self.volume_path(disk_id, top_id).absolute()
        qemu.create(
            path, "qcow2", size=self.virtual_size(disk_id, top_id), backing=top,
            backing_fmt=self.qemu_format(disk_id, top_id),
        )
        gran = next(b["granularity"] for b in self.bitmaps(disk_id, sources[0]) if b["name"] == bitmap)
        # Disabled: the overlay is never written; the bitmap is a frozen view of the checkpoint's changes.
        qemu.bitmap_add(path, bitmap, disabled=True, granularity=gran)
        for v in sources:
            qemu.bitmap_merge(path, bitmap, bitmap, source_file=self.volume_path(disk_id, v))
        return path

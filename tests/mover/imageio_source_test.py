"""The imageio source against the real ovirt-imageio daemon (TLS, throwaway CA) and real qemu-nbd."""

from __future__ import annotations

import json
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from imageio_env import ImageioDaemon, QemuNbd, free_port, make_image, qemu_img, qemu_io, raw_content

from lab.pki import CA
from mover.errors import SourceError
from mover.sources.imageio import ImageioSource, redact

MiB = 1 << 20
SIZE = 8 * MiB
WRITES = [(0, MiB, 0x41), (4 * MiB, 64 * 1024, 0x42), (SIZE - 128 * 1024, 128 * 1024, 0x43)]


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[ImageioDaemon]:
    d = ImageioDaemon(tmp_path / "imageio")
    try:
        yield d
    finally:
        d.close()


@pytest.fixture
def disk(tmp_path: Path) -> Path:
    img = tmp_path / "disk.qcow2"
    make_image(img, SIZE, WRITES)
    return img


def spec(url: str, ca_pem: str, **kw: object) -> dict[str, object]:
    return {"type": "imageio", "transfer_url": url, "proxy_url": None, "ca_pem": ca_pem, "size": SIZE,
            "format": "raw"} | kw  # fmt: skip


def read_all(src: ImageioSource, chunk: int = MiB) -> bytes:
    out = bytearray(src.size)
    r = src.reader()
    try:
        for off in range(0, src.size, chunk):
            assert r.readinto(off, memoryview(out)[off : off + chunk]) == min(chunk, src.size - off)
    finally:
        r.close()
    return bytes(out)


def test_extents_and_content(tmp_path: Path, daemon: ImageioDaemon, disk: Path) -> None:
    nbd = QemuNbd(disk, tmp_path / "nbd.sock")
    try:
        url = daemon.add_ticket(nbd.url, SIZE, ["read"])
        src = ImageioSource(spec(url, daemon.ca_pem))
        try:
            assert src.size == SIZE
            assert src.max_readers == 8  # imageio's nbd backend allows 8
            assert url.rsplit("/", 1)[1] not in src.name  # the ticket is never shown whole
            ext = list(src.extents("zero"))
            assert ext[0].start == 0 and sum(e.length for e in ext) == SIZE
            data = [(e.start, e.length) for e in ext if not e.zero]
            assert data == [(0, MiB), (4 * MiB, 64 * 1024), (SIZE - 128 * 1024, 128 * 1024)]
            # Without a dirty request, "dirty" means a full read: every extent is dirty.
            assert all(e.dirty for e in src.extents("dirty"))
            assert read_all(src) == raw_content(disk)
            # A short read at the end of the disk.
            r = src.reader()
            buf = bytearray(MiB)
            assert r.readinto(SIZE - 4096, memoryview(buf)) == 4096
            assert buf[:4096] == b"\x43" * 4096
            r.close()
        finally:
            src.close()
    finally:
        nbd.close()


def test_parallel_readers(tmp_path: Path, daemon: ImageioDaemon, disk: Path) -> None:
    nbd = QemuNbd(disk, tmp_path / "nbd.sock")
    try:
        src = ImageioSource(spec(daemon.add_ticket(nbd.url, SIZE, ["read"]), daemon.ca_pem), max_connections=4)
        assert src.max_readers == 4
        out = bytearray(SIZE)
        errors: list[BaseException] = []

        def work(i: int) -> None:
            r = src.reader()
            try:
                for off in range(i * MiB, SIZE, 4 * MiB):
                    r.readinto(off, memoryview(out)[off : off + MiB])
            except BaseException as e:
                errors.append(e)
            finally:
                r.close()

        threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        src.close()
        assert not errors
        assert bytes(out) == raw_content(disk)
        assert daemon.dir.joinpath("daemon.log").read_text().count("OPEN connection") >= 4
    finally:
        nbd.close()


def test_dirty_extents(tmp_path: Path, daemon: ImageioDaemon, disk: Path) -> None:
    # A checkpoint: a persistent bitmap started now; later guest writes are what an incremental reads.
    qemu_img("bitmap", "--add", str(disk), "ckpt")
    qemu_io(disk, "qcow2", f"write -P 0x55 {2 * MiB} 65536", f"write -z {4 * MiB} 65536")
    nbd = QemuNbd(disk, tmp_path / "nbd.sock", bitmap="ckpt")
    try:
        url = daemon.add_ticket(nbd.url, SIZE, ["read"], dirty=True)
        src = ImageioSource(spec(url, daemon.ca_pem, dirty=True), dirty=True)
        try:
            dirty = [(e.start, e.length, e.zero) for e in src.extents("dirty") if e.dirty]
            assert dirty == [(2 * MiB, 65536, False), (4 * MiB, 65536, True)]
            assert sum(e.length for e in src.extents("dirty")) == SIZE
        finally:
            src.close()
    finally:
        nbd.close()


def test_falls_back_to_proxy_url(tmp_path: Path, daemon: ImageioDaemon, disk: Path) -> None:
    nbd = QemuNbd(disk, tmp_path / "nbd.sock")
    try:
        url = daemon.add_ticket(nbd.url, SIZE, ["read"])
        dead = f"https://127.0.0.1:{free_port()}/images/" + url.rsplit("/", 1)[1]
        src = ImageioSource(spec(dead, daemon.ca_pem, proxy_url=url))
        try:
            assert src.url == redact(url)
            assert read_all(src) == raw_content(disk)
        finally:
            src.close()
        with pytest.raises(SourceError, match="cannot connect") as e:
            ImageioSource(spec(dead, daemon.ca_pem))
        assert e.value.retryable
    finally:
        nbd.close()


def test_wrong_ca_and_bad_ticket(tmp_path: Path, daemon: ImageioDaemon, disk: Path) -> None:
    other = CA.create(tmp_path / "other-ca").cert_path.read_text()
    nbd = QemuNbd(disk, tmp_path / "nbd.sock")
    try:
        url = daemon.add_ticket(nbd.url, SIZE, ["read"])
        with pytest.raises(SourceError, match="TLS verification failed"):
            ImageioSource(spec(url, other))
        with pytest.raises(SourceError, match="HTTP 403") as e:
            ImageioSource(spec(url.rsplit("/", 1)[0] + "/no-such-ticket", daemon.ca_pem))
        assert not e.value.retryable
        with pytest.raises(SourceError, match="raw transfers only"):
            ImageioSource(spec(url, daemon.ca_pem, format="cow"))
    finally:
        nbd.close()


def test_shallow_layer_extents(tmp_path: Path, daemon: ImageioDaemon, disk: Path) -> None:
    # Snapshot method: the layer added since the last backup, served alone (no backing), tells which
    # clusters changed: those it holds, written or zeroed; its holes show the (unchanged) base through.
    layer = tmp_path / "layer.qcow2"
    qemu_img("create", "-f", "qcow2", "-b", str(disk), "-F", "qcow2", str(layer))
    qemu_io(layer, "qcow2", f"write -P 0x66 {2 * MiB} 65536", "write -z 0 65536")
    image = json.dumps({"driver": "qcow2", "backing": None, "file": {"driver": "file", "filename": str(layer)}})
    nbd = QemuNbd("json:" + image, tmp_path / "nbd.sock", fmt=None, allocation_depth=True)
    try:
        url = daemon.add_ticket(nbd.url, SIZE, ["read"])
        src = ImageioSource(spec(url, daemon.ca_pem, shallow=True), shallow=True)
        try:
            changed = [(e.start, e.length, e.zero) for e in src.extents("dirty") if e.dirty]
            assert changed == [(0, 65536, True), (2 * MiB, 65536, False)]
            assert sum(e.length for e in src.extents("dirty")) == SIZE
        finally:
            src.close()
    finally:
        nbd.close()

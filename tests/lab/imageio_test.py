"""Tests of lab.imageio with the real ovirt-imageio daemon, qemu-nbd and the real ovirt_imageio client."""

from __future__ import annotations

import os
import random
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from ovirt_imageio import client

from lab import qemu
from lab.errors import LabError
from lab.imageio import ImageioDaemon, NbdExport
from lab.pki import CA

MiB = 1024**2
SIZE = 8 * MiB


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> CA:
    return CA.create(tmp_path_factory.mktemp("ca"))


@pytest.fixture(scope="module")
def host(ca: CA, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ImageioDaemon]:
    d = ImageioDaemon(tmp_path_factory.mktemp("hosts"), "host1", ca)
    d.start()
    try:
        yield d
    finally:
        d.stop()
    assert not d.running


@pytest.fixture(scope="module")
def proxy(ca: CA, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ImageioDaemon]:
    d = ImageioDaemon(tmp_path_factory.mktemp("engine"), "proxy", ca)
    d.start()
    try:
        yield d
    finally:
        d.stop()


def _image(tmp_path: Path, seed: int = 1) -> Path:
    """A qcow2 image holding random data in scattered runs, zeros and holes elsewhere."""
    rng = random.Random(seed)
    raw = tmp_path / "src.raw"
    with open(raw, "wb") as f:
        f.truncate(SIZE)
        for _ in range(12):
            off = rng.randrange(0, SIZE // 4096) * 4096
            f.seek(off)
            f.write(rng.randbytes(min(rng.randrange(4096, 300_000), SIZE - off)))
    img = tmp_path / "disk.qcow2"
    qemu.convert(raw, img, "raw", "qcow2")
    raw.unlink()
    return img


def _as_raw(img: Path, fmt: str, out: Path) -> bytes:
    qemu.convert(img, out, fmt, "raw")
    return out.read_bytes()


def test_download_bit_for_bit(host: ImageioDaemon, ca: CA, tmp_path: Path) -> None:
    img = _image(tmp_path)
    tid = str(uuid.uuid4())
    with NbdExport(img, "qcow2", read_only=True) as nbd:
        host.add_ticket(tid, SIZE, nbd.url, ["read"], transfer_id=str(uuid.uuid4()))
        try:
            with client.ImageioClient(host.transfer_url(tid), cafile=str(ca.cert_path)) as c:
                data_bytes = sum(e.length for e in c.extents("zero") if not e.zero)
            out = tmp_path / "out.raw"
            client.download(host.transfer_url(tid), str(out), str(ca.cert_path), fmt="raw")
            assert out.read_bytes() == _as_raw(img, "qcow2", tmp_path / "expect.raw")
            st = host.ticket(tid)
            # imageio counts the bytes it read: the data extents, not the zeros the client skipped.
            assert 0 < data_bytes < SIZE and st["transferred"] == data_bytes and st["ops"] == ["read"]
            assert st["active"] is False and st["connections"] == 0
        finally:
            host.remove_ticket(tid)
    with pytest.raises(LabError, match="no ticket"):
        host.ticket(tid)
    assert not nbd.socket.exists()


def test_download_through_proxy(host: ImageioDaemon, proxy: ImageioDaemon, ca: CA, tmp_path: Path) -> None:
    img = _image(tmp_path, seed=2)
    tid = str(uuid.uuid4())
    with NbdExport(img, "qcow2") as nbd:
        host.add_ticket(tid, SIZE, nbd.url, ["read"])
        # The engine's proxy ticket has the same id and the host daemon's https URL.
        proxy.add_ticket(tid, SIZE, host.transfer_url(tid), ["read"])
        try:
            out = tmp_path / "out.qcow2"
            client.download(proxy.transfer_url(tid), str(out), str(ca.cert_path), fmt="qcow2")
            assert _as_raw(out, "qcow2", tmp_path / "a.raw") == _as_raw(img, "qcow2", tmp_path / "b.raw")
        finally:
            proxy.remove_ticket(tid)
            host.remove_ticket(tid)


def test_dirty_extents_are_the_written_clusters(host: ImageioDaemon, ca: CA, tmp_path: Path) -> None:
    img = _image(tmp_path, seed=3)
    qemu.bitmap_add(img, "checkpoint-1")
    # Unaligned writes dirty every 64 KiB cluster they touch.
    qemu.io(img, "qcow2", ["write -P 0x41 65536 65536", "write -P 0x42 1000000 200000", "write 7M 10"])
    expected = [(65536, 65536), (983040, 1245184 - 983040), (7 * MiB, 65536)]
    tid = str(uuid.uuid4())
    with NbdExport(img, "qcow2", bitmap="checkpoint-1") as nbd:
        host.add_ticket(tid, SIZE, nbd.url, ["read"], dirty=True)
        try:
            with client.ImageioClient(host.transfer_url(tid), cafile=str(ca.cert_path)) as c:
                dirty = [(e.start, e.length) for e in c.extents("dirty") if e.dirty]
            assert dirty == expected
            # An incremental download holds exactly those clusters, with the image's data.
            out = tmp_path / "inc.qcow2"
            client.download(host.transfer_url(tid), str(out), str(ca.cert_path), fmt="qcow2", incremental=True)
            got = _as_raw(out, "qcow2", tmp_path / "inc.raw")
            want = _as_raw(img, "qcow2", tmp_path / "full.raw")
            for off, n in expected:
                assert got[off:off + n] == want[off:off + n]
            mask = bytearray(SIZE)
            for off, n in expected:
                mask[off:off + n] = b"\1" * n
            assert all(b == 0 for b, m in zip(got, mask, strict=True) if not m)
        finally:
            host.remove_ticket(tid)


def test_upload_bit_for_bit(host: ImageioDaemon, ca: CA, tmp_path: Path) -> None:
    src = _image(tmp_path, seed=4)
    dst = tmp_path / "new.qcow2"
    qemu.create(dst, "qcow2", size=SIZE)
    tid = str(uuid.uuid4())
    with NbdExport(dst, "qcow2", read_only=False) as nbd:
        host.add_ticket(tid, SIZE, nbd.url, ["write"])
        try:
            client.upload(str(src), host.transfer_url(tid), str(ca.cert_path))
        finally:
            host.remove_ticket(tid)
    assert _as_raw(dst, "qcow2", tmp_path / "d.raw") == _as_raw(src, "qcow2", tmp_path / "s.raw")


def test_shallow_export_reads_one_layer(host: ImageioDaemon, ca: CA, tmp_path: Path) -> None:
    base = _image(tmp_path, seed=5)
    top = tmp_path / "top.qcow2"
    qemu.create(top, "qcow2", size=SIZE, backing=base, backing_fmt="qcow2")
    qemu.io(top, "qcow2", ["write -P 0x7e 2M 64k"])
    tid = str(uuid.uuid4())
    with NbdExport(top, "qcow2", backing=False) as nbd:
        host.add_ticket(tid, SIZE, nbd.url, ["read"])
        try:
            with client.ImageioClient(host.transfer_url(tid), cafile=str(ca.cert_path)) as c:
                data = [(e.start, e.length) for e in c.extents("zero") if not e.hole]
        finally:
            host.remove_ticket(tid)
    assert data == [(2 * MiB, 65536)]


def test_bad_ticket_and_bad_image(host: ImageioDaemon, tmp_path: Path) -> None:
    with pytest.raises(LabError, match="add ticket"):
        host.add_ticket(str(uuid.uuid4()), SIZE, "gopher://x", ["read"])
    with pytest.raises(LabError, match=r"qemu-nbd missing\.qcow2"):
        NbdExport(tmp_path / "missing.qcow2", "qcow2")
    assert os.listdir(tmp_path) == []


def test_restart_after_crash_ends_stale_daemon(ca: CA, tmp_path: Path) -> None:
    from lab.procs import alive

    first = ImageioDaemon(tmp_path, "h", ca)
    first.start()
    assert first.proc is not None
    stale = first.proc.pid
    # The lab died without stopping its daemon: a new lab process starts the same host again.
    first.proc = None
    second = ImageioDaemon(tmp_path, "h", ca, port=first.port)
    try:
        second.start()
        assert not alive(stale) and second.running and second.port == first.port
    finally:
        second.stop()
    assert not second.pid_path.exists()

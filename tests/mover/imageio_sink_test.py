"""The imageio sink against the real ovirt-imageio daemon and a writable qemu-nbd export."""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from imageio_env import ImageioDaemon, QemuNbd, make_image, raw_content

from mover.errors import SinkError
from mover.sinks.imageio import ImageioSink, _merge

MiB = 1 << 20
SIZE = 8 * MiB


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[ImageioDaemon]:
    d = ImageioDaemon(tmp_path / "imageio")
    try:
        yield d
    finally:
        d.close()


def spec(url: str, ca_pem: str, size: int = SIZE) -> dict[str, object]:
    return {"type": "imageio", "transfer_url": url, "proxy_url": None, "ca_pem": ca_pem, "size": size,
            "format": "raw"}  # fmt: skip


def test_put_zero_flush(tmp_path: Path, daemon: ImageioDaemon) -> None:
    # The target starts full of old data (as a preallocated volume on block storage may): zero ranges must
    # really be written as zeros, without sending them.
    disk = tmp_path / "target.qcow2"
    make_image(disk, SIZE, [(0, SIZE, 0x77)])
    nbd = QemuNbd(disk, tmp_path / "nbd.sock", read_only=False)
    try:
        url = daemon.add_ticket(nbd.url, SIZE, ["write"])
        sink = ImageioSink(spec(url, daemon.ca_pem))
        try:
            assert sink.max_writers == 8
            sink.truncate(SIZE)
            with pytest.raises(SinkError, match="only"):
                sink.truncate(SIZE + 1)
            want = bytearray(SIZE)
            # Block 0: data with a 128 KiB zero piece inside; block 1: a zero block; the rest from 4 threads.
            block0 = bytearray(b"\x01" * MiB)
            block0[256 * 1024 : 384 * 1024] = bytes(128 * 1024)
            want[0:MiB] = block0
            sink.write(0, bytes(block0))
            sink.zero(MiB, MiB)

            def work(i: int) -> None:
                for off in range((2 + i) * MiB, SIZE, 4 * MiB):
                    sink.write(off, bytes([0x10 + i]) * MiB)

            for i in range(4):
                for off in range((2 + i) * MiB, SIZE, 4 * MiB):
                    want[off : off + MiB] = bytes([0x10 + i]) * MiB
            threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            sink.flush()
            # Zeros were never sent as data: only the non-zero bytes went out in PUTs.
            assert sink.stats["put_bytes"] == (SIZE - 2 * MiB) + (MiB - 128 * 1024)
            assert sink.stats["zero_bytes"] == MiB + 128 * 1024
            assert sink.stats["zero_requests"] == 2  # one per disjoint range, never per block
        finally:
            sink.close()
    finally:
        nbd.close()
    assert raw_content(disk) == bytes(want)
    assert "FLUSH" in (daemon.dir / "daemon.log").read_text().upper()


def test_write_beyond_disk_and_bad_ticket(tmp_path: Path, daemon: ImageioDaemon) -> None:
    disk = tmp_path / "t.qcow2"
    make_image(disk, SIZE, [])
    nbd = QemuNbd(disk, tmp_path / "nbd.sock", read_only=False)
    try:
        ro = daemon.add_ticket(nbd.url, SIZE, ["read"])
        sink = ImageioSink(spec(ro, daemon.ca_pem))
        try:
            with pytest.raises(SinkError, match="beyond"):
                sink.write(SIZE - 10, b"x" * 20)
            # A read-only ticket refuses writes: a clear, permanent error.
            with pytest.raises(SinkError, match="HTTP 403") as e:
                sink.write(0, b"x" * 4096)
            assert not e.value.retryable
        finally:
            sink.close()
    finally:
        nbd.close()


def test_server_gone_is_retryable_and_drops_the_connection(tmp_path: Path, daemon: ImageioDaemon) -> None:
    disk = tmp_path / "t.qcow2"
    make_image(disk, SIZE, [])
    nbd = QemuNbd(disk, tmp_path / "nbd.sock", read_only=False)
    try:
        sink = ImageioSink(spec(daemon.add_ticket(nbd.url, SIZE, ["write"]), daemon.ca_pem))
        try:
            sink.write(0, b"x" * MiB)  # leaves one open connection in the pool
            daemon.close()
            # The pooled connection is dead: the PUT fails as retryable (another mover or attempt may succeed).
            with pytest.raises(SinkError, match=f"PUT at offset {MiB}") as e:
                sink.write(MiB, b"y" * MiB)
            assert e.value.retryable
            # The broken connection was not put back: the flush's PATCH needs a new one, and cannot connect.
            with pytest.raises(SinkError, match="connect:") as e:
                sink.flush()
            assert e.value.retryable
        finally:
            sink.close()
    finally:
        nbd.close()


def test_merge() -> None:
    assert _merge([(10, 5), (0, 10), (20, 1), (14, 2)]) == [(0, 16), (20, 1)]
    assert _merge([]) == []

"""Sinks: a file restored sparse (zeros never written), a real loop device zeroed with BLKZEROOUT."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from mover.errors import SinkError
from mover.sinks import open_sink
from mover.sinks.device import DeviceSink
from mover.sinks.file import HOLE_GRANULE, FileSink

MiB = 1024 * 1024


@pytest.fixture
def loop_device(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A real loop device over an 8 MiB file of random data; always detached."""
    backing = tmp_path / "disk.img"
    backing.write_bytes(os.urandom(8 * MiB))
    dev = subprocess.run(["losetup", "-f", "--show", str(backing)], check=True, capture_output=True,
                         text=True).stdout.strip()
    try:
        yield dev, backing
    finally:
        subprocess.run(["losetup", "-d", dev], check=False)


def test_file_sink_leaves_zeros_as_holes(tmp_path: Path) -> None:
    path = tmp_path / "out.img"
    sink = open_sink(str(path))
    assert isinstance(sink, FileSink)
    sink.truncate(64 * MiB)
    block = bytearray(os.urandom(MiB))
    block[HOLE_GRANULE : 8 * HOLE_GRANULE] = bytes(7 * HOLE_GRANULE)  # a zero stretch inside a data block
    sink.write(10 * MiB, bytes(block))
    sink.zero(20 * MiB, 10 * MiB)
    sink.flush()
    sink.close()
    st = os.stat(path)
    assert st.st_size == 64 * MiB
    data = path.read_bytes()
    assert data[10 * MiB : 11 * MiB] == bytes(block)
    assert data.count(0) == len(data) - sum(1 for b in block if b)  # everything else reads as zeros
    allocated = st.st_blocks * 512
    assert allocated <= MiB - 7 * HOLE_GRANULE + 64 * 1024  # only the non-zero pieces (+ fs slack)


def test_file_sink_refuses_to_clobber(tmp_path: Path) -> None:
    path = tmp_path / "precious"
    path.write_bytes(b"do not lose me")
    with pytest.raises(SinkError, match="not empty"):
        open_sink(str(path))
    assert path.read_bytes() == b"do not lose me"
    sink = open_sink(str(path), overwrite=True)
    sink.truncate(MiB)
    sink.close()
    assert path.read_bytes() == bytes(MiB)  # old content gone, all hole


def test_file_sink_unwritable_dir(tmp_path: Path) -> None:
    with pytest.raises(SinkError, match="No such file"):
        open_sink(str(tmp_path / "no" / "such" / "dir" / "x.img"))


def test_device_sink_zero_and_write(loop_device: tuple[str, Path]) -> None:
    dev, _ = loop_device
    sink = open_sink(dev)
    assert isinstance(sink, DeviceSink)
    with pytest.raises(SinkError, match="device holds"):
        sink.truncate(9 * MiB)
    sink.truncate(8 * MiB)
    data = os.urandom(MiB)
    sink.zero(0, 4 * MiB)  # BLKZEROOUT: old random data must not show through
    sink.write(4 * MiB, data)
    sink.flush()
    sink.close()
    with open(dev, "rb") as f:
        got = f.read()
    assert got[: 4 * MiB] == bytes(4 * MiB)
    assert got[4 * MiB : 5 * MiB] == data


def test_device_sink_fresh_skips_zeroing(loop_device: tuple[str, Path]) -> None:
    dev, backing = loop_device
    before = backing.read_bytes()
    sink = DeviceSink(dev, fresh=True)
    sink.zero(0, 8 * MiB)  # the caller promised the device is zero already: nothing is written
    sink.flush()
    sink.close()
    with open(dev, "rb") as f:
        assert f.read() == before

"""Tests of the benchmark's measuring helpers, the compression bound and the report (no timing asserted)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import zstandard

from bench import bound, core, measure, report


def test_peak_rss_is_the_commands_own(tmp_path: Path) -> None:
    small = measure.run(["true"], logdir=tmp_path)
    big = measure.run([sys.executable, "-c", "x = bytearray(200 * 2**20); x[::4096] = b'1' * len(x[::4096])"],
                      logdir=tmp_path)
    # Not this (large) Python process's RSS inherited at fork: a tiny command reports a tiny figure.
    assert 0 < small.peak_rss < 16 * 2**20
    assert big.peak_rss > 200 * 2**20
    assert big.returncode == 0 and big.seconds > 0


def test_failed_and_missing_commands(tmp_path: Path) -> None:
    m = measure.run([sys.executable, "-c", "import sys; print('boom', file=sys.stderr); sys.exit(3)"],
                    logdir=tmp_path)
    assert m.returncode == 3
    with pytest.raises(measure.BenchError, match="exit 3: boom"):
        m.check()
    with pytest.raises(measure.BenchError, match="not found"):
        measure.run(["no-such-command-ferry"], logdir=tmp_path)


def test_file_facts(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    with open(a, "wb") as f:
        f.truncate(8 * 2**20)
        f.seek(2**20)
        f.write(os.urandom(65536))
    with open(b, "wb") as f:
        f.write(a.read_bytes())  # same bytes, fully allocated
    assert measure.data_bytes(a) < 2**20 <= measure.data_bytes(b)
    assert measure.du(a) < measure.du(b)
    assert measure.identical(a, b)
    with open(b, "r+b") as f:
        f.seek(7 * 2**20)
        f.write(b"x")
    assert not measure.identical(a, b)
    assert core.is_sparse(measure.du(a), measure.du(a), 8 * 2**20)
    assert not core.is_sparse(measure.du(b), measure.du(a), 8 * 2**20)


def test_bound_skips_holes_and_zero_blocks(tmp_path: Path) -> None:
    p = tmp_path / "img"
    text = b"ferry bench " * 10000
    with open(p, "wb") as f:
        f.truncate(64 * 2**20)
        f.seek(2**20)
        f.write(bytes(4 * 65536))  # allocated but zero: skipped
        f.write(text)
    b = bound.measure(p)
    # The data extent ends at the 4 KiB filesystem block after the text; the zero blocks before it are skipped.
    assert b.data_bytes == -(-len(text) // 4096) * 4096
    assert b.compressed < len(text) // 10
    assert zstandard.ZstdCompressor(level=1).compress(text)  # same codec family, sanity


def test_report_rows_and_targets() -> None:
    res = {
        "tools": {
            "ferry": {"backup1": {"seconds": 2.0, "peak_rss": 100 * 2**20, "stored": 100 * 2**20},
                      "backup2": {"seconds": 0.4, "peak_rss": 90 * 2**20},
                      "backup2_changed": {"seconds": 0.05, "peak_rss": 80 * 2**20},
                      "restore": {"seconds": 1.0, "rate_gbps": 6.4, "sparse": True, "identical": True}},
            "borg": {"backup1": {"seconds": 8.0, "peak_rss": 50 * 2**20, "stored": 100 * 2**20},
                     "restore": {"seconds": 5.0, "rate_gbps": 1.2, "sparse": True, "identical": True}},
            "restic": {"backup1": {"seconds": 10.0, "peak_rss": 50 * 2**20, "stored": 90 * 2**20}},
        },
        "bound": {"seconds": 1.0, "compressed": 95 * 2**20, "threads": 2, "data_bytes": 3 * 2**30},
        "sparse64": {"peak_rss": 400 * 2**20},
    }
    rows = {r["tool"]: r for r in report.rows(res)}
    assert rows["borg"]["ferry_ratio_time"] == 0.25
    assert rows["ferry"]["changed_ratio"] == 0.025
    assert rows["ferry"]["peak_mib"] == 100.0
    assert rows["zstd-1 bound (2 threads)"]["ferry_ratio_time"] == 2.0
    t = {x["target"]: x for x in report.targets(res)}
    assert t["full backup time / borg"]["ok"] is True
    assert t["full backup time / restic"]["ok"] is False  # 0.2 > 1/6
    assert t["full backup time / zstd-1 bound"]["ok"] is False
    assert t["stored bytes / borg"]["ok"] is True
    assert t["peak memory MiB (64 GiB sparse)"]["ok"] is False
    assert t["restore GB/s (logical)"]["ok"] is True
    text = report.render(report.rows(res))
    assert text.splitlines()[0].startswith("tool") and "NO" not in text
    assert "NO" in report.render_targets(report.targets(res))

"""Micro-benchmarks of the hot-path kernels (pytest-benchmark).

Run: ``.venv/bin/pytest bench/kernels_bench.py --benchmark-enable``. Each benchmark records its throughput
in ``extra_info["mb_per_s"]``; the numbers behind the store's defaults (block size, hash, zstd level) are
in docs/store-format.md. Data: real files of this machine (``/usr/bin``, ``/usr/lib``), which compress
about as a system disk does, so zstd figures are not flattered by synthetic data.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import zstandard

from mover import kernels

SIZE = 16 << 20  # bytes per round: large enough to leave the caches, small enough to keep the run short
KEY = bytes(range(32))


def real_data(size: int = SIZE) -> bytes:
    """``size`` bytes from the files of this machine (binaries and libraries first)."""
    out = bytearray()
    for top in ("/usr/bin", "/usr/lib/x86_64-linux-gnu", "/usr/lib", "/usr/share"):
        for dirpath, _, files in os.walk(top):
            for f in sorted(files):
                p = Path(dirpath, f)
                try:
                    if p.is_file() and not p.is_symlink():
                        out += p.read_bytes()[: size - len(out)]
                except OSError:
                    continue
                if len(out) >= size:
                    return bytes(out)
    return bytes(out) + bytes(size - len(out))


DATA = real_data()


def run(benchmark: Any, fn: Callable[[], object], nbytes: int) -> None:
    benchmark.pedantic(fn, rounds=5, iterations=1, warmup_rounds=1)
    if benchmark.stats is not None:
        benchmark.extra_info["mb_per_s"] = round(nbytes / benchmark.stats.stats.mean / 1e6)


def test_is_zero_of_zeros(benchmark: Any) -> None:
    zeros = bytes(SIZE)
    run(benchmark, lambda: kernels.is_zero(zeros), SIZE)


@pytest.mark.parametrize("block_size", [64 << 10, 256 << 10])
def test_zero_flags(benchmark: Any, block_size: int) -> None:
    data = DATA[: SIZE // 2] + bytes(SIZE // 2)
    run(benchmark, lambda: kernels.zero_flags(data, block_size), SIZE)


@pytest.mark.parametrize("algorithm", sorted(kernels.HASH_ALGORITHMS))
@pytest.mark.parametrize("block_size", [64 << 10, 256 << 10, 1 << 20])
def test_block_ids(benchmark: Any, algorithm: str, block_size: int) -> None:
    run(benchmark, lambda: kernels.block_ids(algorithm, KEY, DATA, block_size), SIZE)


@pytest.mark.parametrize("level", [1, 3])
@pytest.mark.parametrize("block_size", [64 << 10, 256 << 10, 1 << 20])
def test_zstd(benchmark: Any, level: int, block_size: int) -> None:
    cctx = zstandard.ZstdCompressor(level=level)
    mv = memoryview(DATA)
    stored = sum(min(len(cctx.compress(mv[i : i + block_size])), block_size) for i in range(0, SIZE, block_size))
    benchmark.extra_info["ratio"] = round(SIZE / stored, 3)
    run(benchmark, lambda: [cctx.compress(mv[i : i + block_size]) for i in range(0, SIZE, block_size)], SIZE)


def test_bsearch_million_entries(benchmark: Any) -> None:
    """One lookup in a segment of 10^6 entries of 56 bytes (about 56 GiB of 256 KiB blocks)."""
    n, size = 1_000_000, 56
    ids = sorted(os.urandom(32) for _ in range(n))
    table = b"".join(i + bytes(size - 32) for i in ids)
    probes = [ids[i] for i in range(0, n, n // 1000)]

    def lookups() -> None:
        for p in probes:
            kernels.bsearch(table, 0, n, size, p)

    benchmark.pedantic(lookups, rounds=5, iterations=1)

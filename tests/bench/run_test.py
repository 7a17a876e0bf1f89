"""The benchmark end to end on a tiny image (quick mode): every column and figure comes out; no timing asserted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench import report

ROOT = Path(__file__).resolve().parents[2]
TOOLS = ("ferry", "borg", "restic", "qemu-img")


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess[str], dict, Path]:
    work = tmp_path_factory.mktemp("bench")
    out = work / "out.json"
    res = subprocess.run(
        [sys.executable, "-m", "bench.run", "--quick", "--size", "64M", "--sparse-size", "2G", "--no-imageio",
         "--workdir", str(work / "w"), "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    return res, json.loads(out.read_text()), work / "w"


def test_table_has_every_column_and_tool(bench_run: tuple) -> None:
    res, doc, _ = bench_run
    for _, header in report.COLUMNS:
        assert header in res.stdout
    for tool in TOOLS:
        assert any(line.startswith(tool + " ") for line in res.stdout.splitlines()), tool
    assert "zstd-1 bound" in res.stdout
    table = doc["core"]["table"]
    assert [r["tool"] for r in table][:4] == list(TOOLS)
    for row in table:
        assert set(row) == {k for k, _ in report.COLUMNS}
    for row in table[:4]:
        # Every measured figure is present for the tools (Ferry alone has the --changed column).
        for key in ("backup_s", "ferry_ratio_time", "stored_mib", "ferry_ratio_stored", "peak_mib", "backup2_s",
                    "restore_s", "restore_gbps", "durable_s"):
            assert isinstance(row[key], float | int) and row[key] > 0, (row["tool"], key)
    assert table[0]["changed_s"] > 0


def test_restores_are_identical_and_ferry_sparse(bench_run: tuple) -> None:
    _, doc, _ = bench_run
    tools = doc["core"]["tools"]
    for tool in TOOLS:
        assert tools[tool]["restore"]["identical"] is True, tool
    assert tools["ferry"]["restore"]["sparse"] is True
    assert tools["ferry"]["restore_changed"]["identical"] is True
    # The 1% change touched ~1% of the 64 KiB clusters, and only the changed ranges were new to the store.
    change = doc["core"]["change"]
    assert change["dirty_bytes"] == round(1024 * 0.01) * 65536
    assert tools["ferry"]["backup2_changed"]["stored_delta"] <= tools["ferry"]["backup2"]["stored_delta"] + 65536


def test_bound_targets_sparse_and_machine(bench_run: tuple) -> None:
    res, doc, workdir = bench_run
    bound = doc["core"]["bound"]
    assert 0 < bound["compressed"] < bound["data_bytes"] <= 64 * 1024**2
    targets = doc["core"]["targets"]
    assert len(targets) == 10
    for t in targets:
        assert t["value"] is not None, t["target"]
        assert t["ok"] in (True, False)
    assert "targets:" in res.stdout
    sp = doc["sparse64"]
    assert sp["size"] == 2 * 1024**3 and sp["peak_rss"] > 0 and sp["data"] > 0
    assert doc["machine"]["cores"] >= 1 and doc["machine"]["cpu"]
    assert "kernels" not in doc  # quick mode skips them
    # The run's scratch directory is gone.
    assert list(workdir.iterdir()) == []


def test_block_size_sweep(tmp_path: Path) -> None:
    out = tmp_path / "sweep.json"
    res = subprocess.run(
        [sys.executable, "-m", "bench.run", "--quick", "--size", "64M", "--block-sizes", "64K,1M", "--no-imageio",
         "--workdir", str(tmp_path / "w"), "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    doc = json.loads(out.read_text())
    assert "core" not in doc and "sparse64" not in doc
    tools = doc["block_sizes"]["tools"]
    assert set(tools) == {"ferry-64K", "ferry-1024K"}
    for t in tools.values():
        assert t["restore"]["identical"] and t["restore_changed"]["identical"]
    # Larger blocks: a 1% change of 64 KiB clusters makes more new data.
    assert tools["ferry-1024K"]["backup2"]["stored_delta"] > tools["ferry-64K"]["backup2"]["stored_delta"]
    assert "ferry-64K" in res.stdout and "ferry-1024K" in res.stdout

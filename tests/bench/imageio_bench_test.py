"""The imageio benchmark end to end on tiny disks: the lab, NATS, the control plane and movers as processes,
ovirt-imageio's client against Ferry. Every figure and target comes out and both restores are bit-identical;
no time is asserted (the machine is shared)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bench import imageio_bench

ROOT = Path(__file__).resolve().parents[2]
MIB = 2**20


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict[str, Any], Path]:
    work = tmp_path_factory.mktemp("imageio-bench")
    out = work / "out.json"
    res = subprocess.run(
        [sys.executable, "-m", "bench.imageio_bench", "--size", "32M", "--fill", "0.4", "--workdir", str(work),
         "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=400,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    return res.stdout, json.loads(out.read_text()), work


def test_every_figure(bench_run: tuple[str, dict[str, Any], Path]) -> None:
    _, doc, _ = bench_run
    assert doc["disk_size"] == 32 * MIB
    full = doc["full"]
    for key in ("seconds", "data_seconds"):
        assert full["client"][key] > 0
    assert full["ferry"]["seconds"] > 0 and full["ferry"]["disk_seconds"] > 0
    assert full["ferry"]["kinds"] == ["full"]
    # The disk's data crossed the network once; the store holds less (compressed, deduplicated).
    assert 0 < full["ferry"]["stored"] < full["ferry"]["read"] <= 32 * MIB
    assert full["ratio"] == pytest.approx(full["ferry"]["seconds"] / full["client"]["seconds"], rel=0.01)

    incr = doc["incremental"]
    assert incr["ferry"]["kinds"] == ["incremental"]
    # Only the dirty extents moved: what the guest wrote (1%), rounded to the store's blocks at most.
    assert 0 < incr["dirty_bytes"] <= incr["ferry"]["read"] < 0.2 * full["ferry"]["read"]
    assert incr["ratio"] > 0

    rst = doc["restore"]
    assert rst["client"]["seconds"] > 0 and rst["ferry"]["seconds"] > 0 and rst["ratio"] > 0

    so = doc["scale_out"]
    assert so["movers_1"]["kinds"] == so["movers_2"]["kinds"] == ["full", "full"]
    assert len(so["movers_1"]["movers"]) == 1
    assert len(so["movers_2"]["movers"]) == 2  # the two limited movers took one disk each
    assert so["movers_1"]["stored"] > 0 and so["movers_2"]["stored"] > 0  # fresh stores: nothing deduplicated
    assert so["speedup"] > 0

    # CPU of each side and of the imageio daemons serving it, per step.
    for step in (full["client"], full["ferry"], rst["client"], rst["ferry"], so["movers_1"], so["movers_2"]):
        assert step["cpu"] > 0 and step["server_cpu"] > 0 and 0 < step["machine_busy"] <= 100, step

    # Where Ferry's time went, from the control plane's log: the data phase and the overheads around it.
    for step in (full["ferry"], incr["ferry"], so["movers_2"]):
        assert {"cli+trigger", "preparing", "exporting", "finalizing", "cli exit"} <= set(step["phases"])
        assert sum(step["phases"].values()) == pytest.approx(step["seconds"], abs=0.5)
    assert rst["ferry"]["phases"]["uploading"] > 0

    assert [t["figure"] for t in doc["targets"]] == [t[0] for t in imageio_bench.TARGETS]
    assert all(isinstance(t["met"], bool) for t in doc["targets"])
    assert doc["machine"]["cores"] and len(doc["machine"]["loadavg_end"]) == 3


def test_restores_identical(bench_run: tuple[str, dict[str, Any], Path]) -> None:
    _, doc, _ = bench_run
    assert doc["restore"]["client"]["identical"] is True
    assert doc["restore"]["ferry"]["identical"] is True


def test_table(bench_run: tuple[str, dict[str, Any], Path]) -> None:
    out, _, _ = bench_run
    for label in ("full: client download (raw)", "full: ferry backup", "incremental (1% written)",
                  "restore: client upload", "restore: ferry restore --disk", "scale-out: 2 disks, 1 mover",
                  "scale-out: 2 disks, 2 movers", "where Ferry's time goes", "targets:"):
        assert label in out, label
    for name, _, _ in imageio_bench.TARGETS:
        line = next(line for line in out.splitlines() if line.strip().startswith(name))
        assert line.rstrip().endswith(("met", "MISSED")), line


def test_nothing_left(bench_run: tuple[str, dict[str, Any], Path]) -> None:
    _, _, work = bench_run
    # The run's own directory (lab, stores, downloaded file) is removed, and none of its processes remain.
    assert [p.name for p in work.iterdir()] == ["out.json"]
    procs = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert str(work) not in procs


def test_render_marks_missed_targets() -> None:
    """The table and targets from figures alone (no run): a missed target says so."""
    step = {"seconds": 2.0, "disk_seconds": 1.0, "read": 10 * MIB, "stored": 4 * MIB, "movers": ["a"]}
    res: dict[str, Any] = {
        "full": {"client": {"seconds": 1.0, "data_seconds": 0.8}, "ferry": step, "ratio": 2.0, "ratio_data": 1.25},
        "incremental": {"ferry": {**step, "seconds": 0.05}, "ratio": 0.025, "ratio_data": 0.02},
        "restore": {"client": {"seconds": 1.0, "data_seconds": 0.9, "identical": True},
                    "ferry": {"seconds": 1.1, "identical": True}, "ratio": 1.1},
        "scale_out": {"movers_1": step, "movers_2": {**step, "movers": ["a", "b"]}, "speedup": 1.0},
    }
    res["targets"] = imageio_bench.targets(res)
    assert [t["met"] for t in res["targets"]] == [False, True, True, False]
    text = imageio_bench.render(res)
    assert "2.00x client" in text and "2 movers used" in text and text.count("MISSED") == 2

"""``python -m bench.run`` (``make bench``): Ferry against borg, restic and qemu-img on one realistic image.

One run: build (or take from the cache) an ext4 image filled with real files, measure the compression bound,
back up and restore it with every tool, change 1% of it and back it up again, back up a 64 GiB sparse image
with Ferry, run the kernel micro-benchmarks, then print the table and the issue's targets (``--json`` writes
everything). ``--block-sizes 64K,256K,1M,4M`` instead compares Ferry stores of each block size.

Suites are functions ``(Context, args) -> dict`` listed in ``SUITES``; more comparisons (e.g. the
ovirt-imageio client against Ferry's imageio mode) are added as another module and one more entry there.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import core, imageio_bench, report
from bench.measure import BenchError
from bench.peers import PEERS, Ferry, Tool
from lab import images
from mover.errors import FerryError

log = logging.getLogger("bench")

ROOT = Path(__file__).resolve().parent.parent
KERNELS_BENCH = ROOT / "bench" / "kernels_bench.py"


def machine() -> dict[str, Any]:
    """The machine the figures come from, and how busy it was (other work shares these cores)."""
    model = ""
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except FileNotFoundError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "memory_gib": round(mem / 1024**3, 1),
        "kernel": platform.release(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "loadavg_start": os.getloadavg(),
    }


def tool_names(args: argparse.Namespace) -> list[str]:
    return [t.strip() for t in args.tools.split(",") if t.strip()]


def suite_core(ctx: core.Context, args: argparse.Namespace) -> dict[str, Any]:
    """Ferry and its peers on the same image."""
    wanted = tool_names(args)
    tools: list[Tool] = [Ferry(ctx.workdir)] if "ferry" in wanted else []
    tools += [cls(ctx.workdir) for cls in PEERS if cls.name in wanted]
    return core.compare(ctx, tools)


def suite_block_sizes(ctx: core.Context, args: argparse.Namespace) -> dict[str, Any]:
    """Ferry stores of each block size on the same image (to choose the store's default)."""
    sizes = [images.parse_size(s) for s in args.block_sizes.split(",") if s.strip()]
    return core.compare(ctx, [Ferry(ctx.workdir, block_size=bs) for bs in sizes])


def suite_sparse(ctx: core.Context, args: argparse.Namespace) -> dict[str, Any]:
    """A large sparse image (mostly holes) backed up by Ferry: time and peak memory."""
    tool = Ferry(ctx.workdir, name="ferry-sparse")
    return core.sparse_image(ctx, tool, images.parse_size(args.sparse_size))


def suite_kernels(ctx: core.Context, args: argparse.Namespace) -> dict[str, Any]:
    """The ext kernels' pytest-benchmark micro-benchmarks (bench/kernels_bench.py), summarised."""
    if not KERNELS_BENCH.exists():
        return {"skipped": "bench/kernels_bench.py not present"}
    out = ctx.workdir / "kernels.json"
    res = subprocess.run(
        [sys.executable, "-m", "pytest", str(KERNELS_BENCH), "-q", "--benchmark-enable",
         f"--benchmark-json={out}", "-p", "no:cacheprovider"],
        cwd=ROOT, capture_output=True, text=True,
    )
    if res.returncode or not out.exists():
        return {"failed": (res.stdout.strip().splitlines() or ["no output"])[-1]}
    doc = json.loads(out.read_text())
    return {"benchmarks": [
        {"name": b["name"], "mean_us": round(b["stats"]["mean"] * 1e6, 2), "ops": round(b["stats"]["ops"], 1),
         **({"mb_per_s": b["extra_info"]["mb_per_s"]} if "mb_per_s" in b.get("extra_info", {}) else {})}
        for b in doc.get("benchmarks", [])
    ]}


SuiteFn = Callable[[core.Context, argparse.Namespace], dict[str, Any]]

# (results key, suite, whether this run wants it)
SUITES: list[tuple[str, SuiteFn, Callable[[argparse.Namespace], bool]]] = [
    ("core", suite_core, lambda a: not a.block_sizes),
    ("block_sizes", suite_block_sizes, lambda a: bool(a.block_sizes)),
    ("sparse64", suite_sparse, lambda a: not a.block_sizes and a.sparse_size != "0" and "ferry" in tool_names(a)),
    ("kernels", suite_kernels, lambda a: a.kernels),
    ("imageio", imageio_bench.suite, lambda a: a.imageio and not a.block_sizes),
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.splitlines()[0])
    p.add_argument("--size", default=os.environ.get("BENCH_SIZE", "6G"),
                   help="image size (standard 6G; 1G for a quick run)")
    p.add_argument("--quick", action="store_true", help="1 GiB image, 8 GiB sparse image, 256 MiB imageio disks, no kernel benchmarks")
    p.add_argument("--fill", type=float, default=0.5, help="fraction of the image filled with files")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", default=str(ROOT / "bench" / "out"), help="scratch space (repos, restores)")
    p.add_argument("--restore-dir", metavar="DIR",
                   help="write restores here (e.g. /dev/shm to measure the software, not this machine's disk)")
    p.add_argument("--json", metavar="FILE", help="write every figure as JSON")
    p.add_argument("--tools", default="ferry,borg,restic,qemu-img", help="comma-separated tools to run")
    p.add_argument("--block-sizes", metavar="LIST", default="",
                   help="instead of the peers: Ferry stores of each block size, e.g. 64K,256K,1M,4M")
    p.add_argument("--sparse-size", default="64G", help="size of the sparse image (0 to skip)")
    p.add_argument("--no-kernels", dest="kernels", action="store_false", help="skip the kernel micro-benchmarks")
    p.add_argument("--keep", action="store_true", help="keep the repositories in the workdir afterwards")
    p.add_argument("--no-imageio", dest="imageio", action="store_false",
                   help="skip the imageio-mode benchmark (lab, NATS, movers vs the ovirt-imageio client)")
    p.add_argument("--imageio-size", default="1G", help="disk size of the imageio-mode benchmark (default 1G)")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.size = "1G" if args.size == p.get_default("size") else args.size
        args.sparse_size = "8G" if args.sparse_size == "64G" else args.sparse_size
        args.kernels = False
        args.imageio_size = "256M" if args.imageio_size == "1G" else args.imageio_size
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    # A fresh directory of our own under the workdir: only it is removed afterwards, never the workdir.
    workdir = Path(args.workdir).resolve() / f"run-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    workdir.mkdir(parents=True)
    try:
        return _main(args, workdir)
    except FerryError as e:
        print(f"bench: error: {e}", file=sys.stderr)
        return e.exit_code
    finally:
        if args.keep:
            print(f"bench: kept {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def _main(args: argparse.Namespace, workdir: Path) -> int:
    results: dict[str, Any] = {"machine": machine(), "args": {k: v for k, v in vars(args).items()}}
    print(f"bench: building or loading the {args.size} image (fill {args.fill}, seed {args.seed})", file=sys.stderr)
    info = images.build_image(None, args.size, fill=args.fill, seed=args.seed)
    restore_dir = None
    if args.restore_dir:
        restore_dir = Path(args.restore_dir).resolve() / workdir.name
        restore_dir.mkdir(parents=True)
    ctx = core.Context(workdir=workdir, image=info, seed=args.seed, restore_dir=restore_dir)
    try:
        return _suites(args, ctx, results)
    finally:
        if restore_dir:
            shutil.rmtree(restore_dir, ignore_errors=True)


def _suites(args: argparse.Namespace, ctx: core.Context, results: dict[str, Any]) -> int:
    for key, fn, wanted in SUITES:
        if not wanted(args):
            continue
        print(f"bench: running {key}", file=sys.stderr)
        started = time.perf_counter()
        try:
            results[key] = fn(ctx, args)
        except BenchError as e:
            # One failing tool must not hide the others' figures: record it and go on.
            results[key] = {"error": str(e)}
            print(f"bench: {key} failed: {e}", file=sys.stderr)
        results[key]["suite_seconds"] = round(time.perf_counter() - started, 1)
    results["machine"]["loadavg_end"] = os.getloadavg()
    _print(results, args)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, sort_keys=True, default=str) + "\n")
    failed = [k for k in ("core", "block_sizes", "sparse64") if "error" in results.get(k, {})]
    return 1 if failed else 0


def _print(results: dict[str, Any], args: argparse.Namespace) -> None:
    m = results["machine"]
    print(f"machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB, {m['date']}, "
          f"load {m['loadavg_start'][0]:.1f} -> {m['loadavg_end'][0]:.1f}")
    for key, ferry in (("core", "ferry"), ("block_sizes", "")):
        res = results.get(key)
        if not res or "error" in res:
            continue
        img = res["image"]
        print(f"\nimage: {img['size'] / 1024**3:.1f} GiB ext4, {img['files']} files, "
              f"{img['data_extents'] / 1024**2:.0f} MiB in data extents; "
              f"1% change = {res['change']['dirty_bytes'] / 1024**2:.0f} MiB in {res['change']['dirty_extents']} runs")
        table = report.rows(res, ferry=ferry or next(iter(res["tools"]), "ferry"))
        res["table"] = table
        print(report.render(table))
        if key == "core":
            res["targets"] = report.targets({**res, "sparse64": results.get("sparse64", {})})
            print("\ntargets:")
            print(report.render_targets(res["targets"]))
    sp = results.get("sparse64")
    if sp and "error" not in sp:
        print(f"\nsparse {sp['size'] / 1024**3:.0f} GiB image ({sp['data'] / 1024**2:.0f} MiB data): "
              f"ferry backup {sp['seconds']:.2f} s, peak {sp['peak_rss'] / 1024**2:.0f} MiB, "
              f"restore {sp['restore']['seconds']:.2f} s ({sp['restore']['rate_gbps']:.1f} GB/s logical)")
    k = results.get("kernels")
    if k and "benchmarks" in k:
        print("\nkernels:")
        for b in k["benchmarks"]:
            print(f"  {b['name']}: {b['mean_us']} us/call" + (f", {b['mb_per_s']} MB/s" if "mb_per_s" in b else ""))
    for key in ("core", "block_sizes", "sparse64", "kernels"):
        if key in results and ("error" in results[key] or "failed" in results[key]):
            print(f"\n{key}: {results[key].get('error') or results[key].get('failed')}")


if __name__ == "__main__":
    sys.exit(main())

"""``python -m bench.imageio_bench`` (``make bench-imageio``): Ferry's imageio mode against ovirt-imageio's client.

One run on the lab (real engine API, real ovirt-imageio daemons, qemu-nbd), with embedded NATS, the control
plane and movers as separate processes:

1. a VM (down) with one qcow2 disk of realistic data (ext4 of real files); its volume read once (warm cache);
2. **full**: ``ovirt_imageio.client.download`` (raw) through an image transfer made with ovirtsdk4, then
   ``ferry backup --type full`` with one mover (deduplicating and compressing into the store);
3. **incremental**: the guest writes 1% of the disk (``lab.write``), ``ferry backup --type incremental``;
4. **restore**: ``ovirt_imageio.client.upload`` of the downloaded file to a new disk, then
   ``ferry restore BACKUP --disk DISK`` of the full backup to a new disk; both compared bit for bit with the
   downloaded file (the disk at the full backup);
5. **scale-out**: a VM with two such disks, backed up full by one mover limited to one job and one pipeline
   thread (``--workers 1 --threads 1``), then by two such movers (each run into a fresh store, so neither
   deduplicates against the other).

Times are wall times of the whole step as an administrator waits for it (engine calls included, on both
sides); the client's data-only time and the movers' per-disk time are reported next to them. Targets (issue
4): full <= 1.0x the client, incremental <= 0.05x the full, restore <= 1.2x the client's upload, scale-out
>= 1.7x. They are printed, never asserted.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench import imageio_client
from bench.imageio_plane import FerryPlane, cpu_seconds, pids_of
from bench.measure import BenchError, warm
from lab import images
from mover.errors import FerryError

log = logging.getLogger("bench.imageio")

MIB = 2**20
CHANGE_PERCENT = 1.0
# (figure, target, direction): "max" = at most the target, "min" = at least.
TARGETS = [
    ("full / client download", 1.0, "max"),
    ("incremental / full", 0.05, "max"),
    ("restore / client upload", 1.2, "max"),
    ("scale-out: 1 mover / 2 movers", 1.7, "min"),
]


def same(a: str | Path, b: str | Path) -> bool:
    """Guest-visible contents equal (``qemu-img compare`` reads through any format)."""
    return subprocess.run(["qemu-img", "compare", "-q", "-U", str(a), str(b)]).returncode == 0


def disk_spec(size: int, fill: float, seed: int) -> dict[str, Any]:
    return {"size": size, "format": "cow", "sparse": True, "fill": fill, "seed": seed, "backup": "incremental"}


class Cpu:
    """CPU seconds spent during a step: by the client (this process and its reaped children, e.g. the client's
    qemu-nbd), by Ferry (movers, control plane, and the ``ferry`` command, a child of this process), and by
    the lab's imageio daemons serving the data (the hypervisor's work, on the same cores here)."""

    def __init__(self, plane: FerryPlane, lab_dir: Path) -> None:
        self.plane = plane
        self.servers = pids_of("ovirt-imageio", f"{lab_dir}/")

    def now(self) -> dict[str, float]:
        t = os.times()
        with open("/proc/stat") as f:
            ticks = [int(x) for x in f.readline().split()[1:]]
        idle = ticks[3] + ticks[4]  # idle + iowait
        return {"local": t.user + t.system + t.children_user + t.children_system, "ferry": self.plane.cpu(),
                "server": cpu_seconds(self.servers), "busy": float(sum(ticks) - idle), "all": float(sum(ticks))}

    def start(self) -> dict[str, float]:
        """The counters at the start of a step, after a ``sync``: no step pays for an earlier step's dirty
        pages being written back (each restore writes a whole disk, the download a whole file)."""
        os.sync()
        return self.now()

    def since(self, before: dict[str, float], ferry: bool) -> dict[str, float]:
        after = self.now()
        d = {k: after[k] - before[k] for k in after}
        # How busy the whole machine was (every process, ours and others'): 100% = all cores saturated.
        busy = d["busy"] / d["all"] if d["all"] else 0.0
        return {"cpu": round(d["local"] + (d["ferry"] if ferry else 0.0), 2), "server_cpu": round(d["server"], 2),
                "machine_busy": round(100 * busy, 1)}


def _backup(plane: FerryPlane, cpu: Cpu, vm: str, kind: str) -> dict[str, Any]:
    before = cpu.start()
    secs, out, span = plane.timed_json("backup", vm, "--mode", "imageio", "--type", kind)
    (b,) = out
    if b["state"] != "succeeded":
        raise BenchError(f"backup of {vm} ({kind}) {b['state']}: {b.get('error')}")
    disks = [d["stats"] for d in b["disks"]]
    return {"id": b["id"], "seconds": round(secs, 3), "kinds": [d["kind"] for d in b["disks"]],
            "disk_seconds": round(max(float(s.get("seconds", 0)) for s in disks), 3),
            "read": sum(int(s.get("read", 0)) for s in disks), "stored": sum(int(s.get("stored", 0)) for s in disks),
            "movers": sorted({str(s.get("mover", "")) for s in disks}), **cpu.since(before, ferry=True),
            "phases": plane.phases(b["id"], span)}


def run(size: int, fill: float, work: Path) -> dict[str, Any]:
    """The whole benchmark in ``work`` (lab, Ferry's processes, files); every figure as a dict."""
    from lab import client as labclient

    lab = labclient.up(work / "lab")
    plane: FerryPlane | None = None
    sdk = None
    try:
        plane = FerryPlane(work / "ferry", lab.url, lab.user, lab.password, lab.ca_file)
        sdk = lab.connection()
        res: dict[str, Any] = {"disk_size": size, "fill": fill}
        print(f"bench-imageio: creating VM bench-a with one {size // MIB} MiB disk", file=sys.stderr)
        vm = lab.create_vm("bench-a", disks=[disk_spec(size, fill, 1)], start=False, guest_agent=False)
        disk = vm["disks"][0]
        for path in lab.volume_paths(disk):
            warm(path)
        plane.start_movers(1)
        cpu = Cpu(plane, work / "lab")

        print("bench-imageio: full (client download, then ferry backup)", file=sys.stderr)
        raw = work / "client-download.raw"
        before = cpu.start()
        dl = imageio_client.download(sdk, lab.ca_file, disk, raw)
        dl_cpu = cpu.since(before, ferry=False)
        full = _backup(plane, cpu, "bench-a", "full")
        res["full"] = {"client": {"seconds": round(dl.seconds, 3), "data_seconds": round(dl.data_seconds, 3),
                                  **dl_cpu},
                       "ferry": full, "ratio": round(full["seconds"] / dl.seconds, 3),
                       "ratio_data": round(full["disk_seconds"] / dl.data_seconds, 3)}

        print(f"bench-imageio: incremental after a {CHANGE_PERCENT}% guest write", file=sys.stderr)
        changed = lab.write(vm["id"], disk=0, percent=CHANGE_PERCENT, seed=5)
        incr = _backup(plane, cpu, "bench-a", "incremental")
        res["incremental"] = {"ferry": incr, "dirty_bytes": sum(int(e["length"]) for e in changed),
                              "ratio": round(incr["seconds"] / full["seconds"], 3),
                              "ratio_data": round(incr["disk_seconds"] / max(full["disk_seconds"], 1e-9), 3)}

        print("bench-imageio: restore (client upload, then ferry restore)", file=sys.stderr)
        before = cpu.start()
        up = imageio_client.upload(sdk, lab.ca_file, raw, disk, "bench-a-upload")
        up_cpu = cpu.since(before, ferry=False)
        before = cpu.start()
        secs, out, span = plane.timed_json("restore", full["id"], "--disk", disk)
        rst_cpu = cpu.since(before, ferry=True)
        if out.get("state") != "succeeded":
            raise BenchError(f"restore {out.get('state')}: {out.get('error')}")
        new = plane.restored_disks(out["restore_id"])[disk]
        res["restore"] = {
            "client": {"seconds": round(up.seconds, 3), "data_seconds": round(up.data_seconds, 3),
                       "identical": same(raw, lab.volume_paths(up.disk_id)[-1]), **up_cpu},
            "ferry": {"seconds": round(secs, 3), "identical": same(raw, lab.volume_paths(new)[-1]), **rst_cpu,
                      "phases": plane.phases(out["restore_id"], span)},
            "ratio": round(secs / up.seconds, 3)}

        res["scale_out"] = scale_out(lab, plane, cpu, size, fill, work)
        res["targets"] = targets(res)
        return res
    finally:
        if sdk is not None:
            sdk.close()
        if plane is not None:
            plane.close()
        labclient.down(work / "lab")


def scale_out(lab: Any, plane: FerryPlane, cpu: Cpu, size: int, fill: float, work: Path) -> dict[str, Any]:
    """Two disks backed up full by one limited mover, then by two; each run into its own fresh store."""
    print("bench-imageio: scale-out (VM with two disks; one mover, then two, --workers 1 --threads 1)",
          file=sys.stderr)
    vm = lab.create_vm("bench-b", disks=[disk_spec(size, fill, 2), disk_spec(size, fill, 3)], start=False,
                       guest_agent=False)
    for d in vm["disks"]:
        for path in lab.volume_paths(d):
            warm(path)
    out: dict[str, Any] = {}
    for n in (1, 2):
        plane.stop_movers()
        plane.start_movers(n, "--workers", "1", "--threads", "1", store=work / f"store-scale-{n}")
        out[f"movers_{n}"] = _backup(plane, cpu, "bench-b", "full")
    plane.stop_movers()
    out["speedup"] = round(out["movers_1"]["seconds"] / out["movers_2"]["seconds"], 3)
    return out


def targets(res: dict[str, Any]) -> list[dict[str, Any]]:
    values = [res["full"]["ratio"], res["incremental"]["ratio"], res["restore"]["ratio"],
              res["scale_out"]["speedup"]]
    rows = []
    for (name, target, way), value in zip(TARGETS, values, strict=True):
        met = value <= target if way == "max" else value >= target
        rows.append({"figure": name, "value": value, "target": f"{'<=' if way == 'max' else '>='} {target}",
                     "met": met})
    return rows


def render(res: dict[str, Any]) -> str:
    """The table of times and ratios, then the targets."""
    f, i, r, s = res["full"], res["incremental"], res["restore"], res["scale_out"]
    mib = lambda n: f"{n / MIB:.1f}"  # noqa: E731
    def row(label: str, step: dict[str, Any], data: float | None, rd: str, st: str, note: str) -> list[str]:
        return [label, f"{step['seconds']:.2f}", "" if data is None else f"{data:.2f}",
                f"{step.get('cpu', 0):.1f}", f"{step.get('server_cpu', 0):.1f}", f"{step.get('machine_busy', 0):.0f}",
                rd, st, note]

    def same_word(step: dict[str, Any]) -> str:
        return "identical" if step["identical"] else "DIFFERENT"

    fc, ff, ic, rc, rf = f["client"], f["ferry"], i["ferry"], r["client"], r["ferry"]
    s1, s2 = s["movers_1"], s["movers_2"]
    rows = [
        row("full: client download (raw)", fc, fc["data_seconds"], "", "", ""),
        row("full: ferry backup", ff, ff["disk_seconds"], mib(ff["read"]), mib(ff["stored"]),
            f"{f['ratio']:.2f}x client"),
        row(f"incremental ({CHANGE_PERCENT:g}% written)", ic, ic["disk_seconds"], mib(ic["read"]),
            mib(ic["stored"]), f"{i['ratio']:.3f}x full"),
        row("restore: client upload", rc, rc["data_seconds"], "", "", same_word(rc)),
        row("restore: ferry restore --disk", rf, None, "", "", f"{r['ratio']:.2f}x client, {same_word(rf)}"),
        row("scale-out: 2 disks, 1 mover", s1, s1["disk_seconds"], mib(s1["read"]), mib(s1["stored"]), ""),
        row("scale-out: 2 disks, 2 movers", s2, s2["disk_seconds"], mib(s2["read"]), mib(s2["stored"]),
            f"{s['speedup']:.2f}x faster, {len(s2['movers'])} movers used"),
    ]
    head = ["step", "time s", "data s", "cpu s", "server cpu s", "busy %", "read MiB", "stored MiB",
            "ratio / result"]
    widths = [max(len(h), *(len(row[k]) for row in rows)) for k, h in enumerate(head)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(head, widths, strict=True)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    lines.append("\nwhere Ferry's time goes (s per control-plane state; exporting/uploading = the data):")
    for label, step in (("full", ff), ("incremental", ic), ("restore", rf), ("scale-out 1", s1), ("scale-out 2", s2)):
        if step.get("phases"):
            lines.append(f"  {label:<12} " + ", ".join(f"{k} {v:.2f}" for k, v in step["phases"].items()))
    lines.append("\ntargets:")
    for t in res["targets"]:
        lines.append(f"  {t['figure']:<32} {t['value']:>7.3f}  target {t['target']:<7} "
                     f"{'met' if t['met'] else 'MISSED'}")
    lines.append(f"  (data only, the mover's disk job against the client call: full {f['ratio_data']:.2f}x the client, "
                 f"incremental {i['ratio_data']:.3f}x the full)")
    lines.append("\ntime s: the whole step (engine calls included); data s: the client call alone, or the slowest "
                 "disk job of the mover(s);\ncpu s: CPU of the client, or of Ferry (movers, control plane, CLI); "
                 "server cpu s: CPU of the imageio daemons serving it;\nbusy %: all cores of the machine (every process) during the step")
    return "\n".join(lines)


def suite(ctx: Any, args: argparse.Namespace) -> dict[str, Any]:
    """The bench.run suite entry: ``(Context, args) -> dict`` (disk size from ``--imageio-size``, default 1G)."""
    size = images.parse_size(getattr(args, "imageio_size", None) or "1G")
    work = Path(ctx.workdir) / "imageio"
    work.mkdir(parents=True, exist_ok=True)
    res = run(size, getattr(args, "fill", 0.5), work)
    print(render(res))
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.imageio_bench", description=__doc__.splitlines()[0])
    p.add_argument("--size", default=os.environ.get("BENCH_IMAGEIO_SIZE", "1G"), help="size of each disk (default 1G)")
    p.add_argument("--fill", type=float, default=0.5, help="fraction of each disk filled with files")
    p.add_argument("--workdir", default=None, help="where the lab and stores go (default: a temporary directory)")
    p.add_argument("--json", metavar="FILE", help="also write every figure as JSON ('-': to stdout, no table)")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    from bench.run import machine

    work = Path(tempfile.mkdtemp(prefix="ferry-bench-imageio-", dir=args.workdir))
    try:
        mach = machine()
        res = run(images.parse_size(args.size), args.fill, work)
        mach["loadavg_end"] = os.getloadavg()
        res = {"machine": mach, **res}
    except FerryError as e:
        print(f"bench-imageio: error: {e}", file=sys.stderr)
        return e.exit_code
    finally:
        if args.keep:
            print(f"bench-imageio: kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    doc = json.dumps(res, indent=2, sort_keys=True, default=str) + "\n"
    if args.json == "-":
        sys.stdout.write(doc)
    else:
        m = res["machine"]
        print(f"machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB, {m['date']}, "
              f"load {m['loadavg_start'][0]:.1f} -> {m['loadavg_end'][0]:.1f}")
        print(f"disks: {res['disk_size'] / MIB:.0f} MiB qcow2, {res['fill']:.0%} filled with files\n")
        print(render(res))
        if args.json:
            Path(args.json).write_text(doc)
    ok = res["restore"]["client"]["identical"] and res["restore"]["ferry"]["identical"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

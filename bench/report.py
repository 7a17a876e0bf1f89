"""The benchmark's table and targets, from the results dict of ``bench.core.compare``."""

from __future__ import annotations

from typing import Any

MiB = 1024**2

# (key in each JSON row, header in the printed table)
COLUMNS: list[tuple[str, str]] = [
    ("tool", "tool"),
    ("backup_s", "backup s"),
    ("ferry_ratio_time", "ferry/it"),
    ("stored_mib", "stored MiB"),
    ("ferry_ratio_stored", "ferry/it"),
    ("peak_mib", "peak MiB"),
    ("backup2_s", "2nd full s"),
    ("backup2_ratio", "2nd/1st"),
    ("stored2_mib", "2nd new MiB"),
    ("changed_s", "--changed s"),
    ("changed_ratio", "chg/1st"),
    ("restore_s", "restore s"),
    ("restore_gbps", "GB/s"),
    ("durable_s", "+sync s"),
    ("sparse", "sparse"),
    ("identical", "identical"),
]


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or not b:
        return None
    return round(a / b, 3)


def rows(res: dict[str, Any], ferry: str = "ferry") -> list[dict[str, Any]]:
    """One row per tool (and one for the compression bound), every column present (None when not measured)."""
    tools: dict[str, Any] = res["tools"]
    fr = tools.get(ferry, {})
    f_time = fr.get("backup1", {}).get("seconds")
    f_stored = fr.get("backup1", {}).get("stored")
    out: list[dict[str, Any]] = []
    for name, t in tools.items():
        b1, rs = t.get("backup1", {}), t.get("restore", {})
        b2, ch = t.get("backup2", {}), t.get("backup2_changed", {})
        peaks = [s.get("peak_rss", 0) for s in (b1, b2, ch) if s]
        out.append({
            "tool": name,
            "backup_s": b1.get("seconds"),
            "ferry_ratio_time": _ratio(f_time, b1.get("seconds")),
            "stored_mib": round(b1["stored"] / MiB, 1) if "stored" in b1 else None,
            "ferry_ratio_stored": _ratio(f_stored, b1.get("stored")),
            "peak_mib": round(max(peaks) / MiB, 1) if peaks else None,
            "backup2_s": b2.get("seconds"),
            "backup2_ratio": _ratio(b2.get("seconds"), b1.get("seconds")),
            "stored2_mib": round(b2["stored_delta"] / MiB, 1) if "stored_delta" in b2 else None,
            "changed_s": ch.get("seconds"),
            "changed_ratio": _ratio(ch.get("seconds"), b1.get("seconds")),
            "restore_s": rs.get("seconds"),
            "restore_gbps": rs.get("rate_gbps"),
            "durable_s": rs.get("durable_seconds"),
            "sparse": rs.get("sparse"),
            "identical": rs.get("identical"),
        })
    if "bound" in res:
        bd = res["bound"]
        row = dict.fromkeys((k for k, _ in COLUMNS), None)
        row.update({
            "tool": f"zstd-1 bound ({bd['threads']} threads)",
            "backup_s": bd["seconds"],
            "ferry_ratio_time": _ratio(f_time, bd["seconds"]),
            # The bound stores nothing; its "stored" is the compressed size of the non-zero data.
            "stored_mib": round(bd["compressed"] / MiB, 1),
            "ferry_ratio_stored": _ratio(f_stored, bd["compressed"]),
        })
        out.append(row)
    return out


def targets(res: dict[str, Any], ferry: str = "ferry") -> list[dict[str, Any]]:
    """The issue's targets next to the measured figures (``ok`` None when a figure is missing)."""
    tools = res["tools"]
    fr = tools.get(ferry, {})

    def sec(tool: str, step: str = "backup1") -> float | None:
        v = tools.get(tool, {}).get(step, {}).get("seconds")
        return float(v) if v is not None else None

    f1 = sec(ferry)
    peak = max((fr.get(s, {}).get("peak_rss", 0) for s in ("backup1", "backup2", "backup2_changed")), default=0)
    rs = fr.get("restore", {})
    sp = res.get("sparse64", {})
    items: list[tuple[str, float | None, str, float]] = [
        ("full backup time / borg", _ratio(f1, sec("borg")), "<=", 1 / 3),
        ("full backup time / restic", _ratio(f1, sec("restic")), "<=", 1 / 6),
        ("full backup time / zstd-1 bound", _ratio(f1, res.get("bound", {}).get("seconds")), "<=", 1.5),
        ("stored bytes / borg", _ratio(fr.get("backup1", {}).get("stored"),
                                       tools.get("borg", {}).get("backup1", {}).get("stored")), "<=", 1.05),
        ("2nd full re-read (1% changed) / 1st", _ratio(sec(ferry, "backup2"), f1), "<=", 0.25),
        ("--changed backup / 1st", _ratio(sec(ferry, "backup2_changed"), f1), "<=", 0.05),
        ("restore GB/s (logical)", rs.get("rate_gbps"), ">=", 1.0),
        ("restore sparse and identical", None if not rs else float(bool(rs.get("sparse") and rs.get("identical"))),
         ">=", 1.0),
        ("peak memory MiB (image)", round(peak / MiB, 1) if peak else None, "<=", 300.0),
        ("peak memory MiB (64 GiB sparse)", round(sp["peak_rss"] / MiB, 1) if "peak_rss" in sp else None,
         "<=", 300.0),
    ]
    out = []
    for name, value, op, limit in items:
        ok = None if value is None else (value <= limit if op == "<=" else value >= limit)
        out.append({"target": name, "value": value, "op": op, "limit": round(limit, 3), "ok": ok})
    return out


def _cell(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "NO"
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}"
    return str(v)


def render(table: list[dict[str, Any]], columns: list[tuple[str, str]] = COLUMNS) -> str:
    """Plain fixed-width text (readable in a log, a terminal or RESULTS.md)."""
    cells = [[h for _, h in columns]] + [[_cell(r.get(k)) for k, _ in columns] for r in table]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True)))
             for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def render_targets(items: list[dict[str, Any]]) -> str:
    """The targets as text: figure, limit, met or not."""
    table = [{"target": t["target"], "value": t["value"], "limit": f"{t['op']} {t['limit']}",
              "met": {True: "yes", False: "NO", None: "-"}[t["ok"]]} for t in items]
    return render(table, [("target", "target"), ("value", "measured"), ("limit", "target"), ("met", "met")])

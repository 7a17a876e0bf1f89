"""``ferry demo-image``: the data-mover core end to end on a realistic disk image, in about a minute.

Builds an ext4 image filled with real files of this machine (``lab.images``), backs it up, changes ~1% of
its 64 KiB clusters as a guest would, backs it up twice more (only the changed extents, as ovirt-imageio's
dirty extents report them, and a full re-read), restores every backup, verifies each bit for bit against
the image it was taken from, prints a table, and removes everything it made. ``ferry demo`` is the
VM-level demo (control plane, NATS, movers and the lab).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any, cast

import blake3

from mover.errors import FerryError
from mover.progress import Progress, TerminalBar, human_size
from mover.store.api import StoreAPI

# 1 GiB half full: big enough that rates mean something, small enough to build, back up three times and
# restore three times well inside a minute on 2 cores.
DEFAULT_SIZE = "1G"
DEFAULT_FILL = 0.5
CHANGE_PERCENT = 1.0


@dataclass
class Row:
    step: str
    kind: str
    size: int
    read: int
    stored: int
    seconds: float
    ok: str = ""


def file_hash(path: str) -> str:
    """BLAKE3 of a whole file, threaded (holes read as zeros, as the disk would)."""
    h = blake3.blake3(max_threads=blake3.blake3.AUTO)
    h.update_mmap(path)
    return h.hexdigest()


def run(size: str = DEFAULT_SIZE, fill: float = DEFAULT_FILL, workdir: str | None = None,
        keep: bool = False, show_progress: bool | None = None) -> list[Row]:
    """Run the demo; return the table rows. Raises FerryError if a restore differs."""
    from lab.images import build_image, change_blocks
    from mover.pipeline import backup
    from mover.restore import restore
    from mover.sinks.file import FileSink
    from mover.sources.extents import parse_changed
    from mover.sources.file import FileSource
    from mover.store.repo import Store

    tmp = tempfile.mkdtemp(prefix="ferry-demo-", dir=workdir)
    rows: list[Row] = []

    def step(label: str, fn: Any) -> Any:
        progress = Progress()
        with TerminalBar(label, enabled=show_progress) as bar:
            progress.listen(bar.update)
            return fn(progress)

    try:
        image = os.path.join(tmp, "disk.img")
        t0 = time.monotonic()
        info = build_image(image, size, fill=fill, seed=1)
        print(f"image: {human_size(info.size)} ext4, {info.files} files, {human_size(info.data_bytes)} of data, "
              f"{human_size(info.allocated)} allocated ({time.monotonic() - t0:.1f}s"
              f"{', cached' if info.cached else ''})")
        hashes = {"v1": file_hash(image)}
        # Store narrows save_backup to its own Manifest class; every manifest it hands out is one.
        store = cast("StoreAPI", Store.open(os.path.join(tmp, "store"), create=True))
        try:
            backups: list[tuple[str, str]] = []  # (backup id, image version)

            def do_backup(label: str, version: str, **kw: Any) -> None:
                src = FileSource(image, changed=kw.pop("changed_list", None))
                try:
                    b = step(label, lambda p: backup(store, src, progress=p, **kw))
                finally:
                    src.close()
                s = b.stats
                rows.append(Row(label, b.kind, b.size, s["read"], s["stored"], s["seconds"]))
                backups.append((b.id, version))

            do_backup("backup full", "v1")
            extents = change_blocks(image, CHANGE_PERCENT, seed=2)
            with open(os.path.join(tmp, "changed.json"), "w") as f:
                json.dump(extents, f)  # what `ferry image backup --changed` would be given
            hashes["v2"] = file_hash(image)
            first = backups[0][0]
            do_backup("backup changed", "v2", base=first, changed=True,
                      changed_list=parse_changed(extents))
            do_backup("backup re-read", "v2", base=first)

            for n, (backup_id, version) in enumerate(backups, 1):
                out = os.path.join(tmp, f"restore-{n}.img")
                sink = FileSink(out)
                try:
                    st = step(f"restore {n}", lambda p, b=backup_id, s=sink: restore(store, b, s, progress=p))
                finally:
                    sink.close()
                same = file_hash(out) == hashes[version]
                allocated = os.stat(out).st_blocks * 512
                rows.append(Row(f"restore {n}", "file", st["size"], st["written"], allocated, st["seconds"],
                                "identical" if same else "DIFFERENT"))
                os.unlink(out)
                if not same:
                    raise FerryError(f"restore of backup {n} ({backup_id}) differs from the image it backed up")
            check = store.check(read_data=True)
        finally:
            store.close()
        rows.append(Row("check data", "store", 0, 0, _dir_size(os.path.join(tmp, "store")), 0,
                        "clean" if check.get("ok") else "PROBLEMS"))
        return rows
    finally:
        if keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def _dir_size(path: str) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            total += os.stat(os.path.join(root, name)).st_blocks * 512
    return total


def print_table(rows: list[Row]) -> None:
    """The demo's result table; narrow enough for an 80-column terminal."""
    from rich.console import Console
    from rich.table import Table

    size = next((r.size for r in rows if r.size), 0)
    table = Table(title=f"ferry demo-image: {human_size(size)} disk; back up, change 1%, back up again, restore, verify",
                  title_justify="left")
    for col in ("step", "read", "stored", "time", "rate", "result"):
        table.add_column(col, justify="left" if col in ("step", "result") else "right", no_wrap=True)
    for r in rows:
        rate = f"{human_size(r.size / r.seconds)}/s" if r.seconds > 0 and r.size else "-"
        table.add_row(r.step, human_size(r.read) if r.size else "-", human_size(r.stored),
                      f"{r.seconds:.2f}s" if r.seconds else "-", rate, r.ok)
    Console(width=None if sys.stdout.isatty() else 120).print(table)
    print("backup changed: reads only the extents listed as dirty (imageio's /extents?context=dirty);\n"
          "backup re-read: reads everything, stores only what changed; rate: disk size per second;\n"
          "read: bytes read (restores: written); stored: compressed bytes added to the store\n"
          "(restores: space the sparse file takes); check data: every block re-read and re-hashed")


def cmd_demo(args: argparse.Namespace) -> int:
    rows = run(size=args.size, fill=args.fill, workdir=args.dir, keep=args.keep)
    print_table(rows)
    bad = [r for r in rows if r.ok in ("DIFFERENT", "PROBLEMS")]
    return 1 if bad else 0


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add ``ferry demo-image``."""
    p = subparsers.add_parser(
        "demo-image", help="the data-mover core alone: back up an image, change, back up, restore, verify",
        description="Build a realistic ext4 disk image, back it up into a new store, change ~1%% of it, back "
                    "it up with only the changed extents and with a full re-read, restore every backup, "
                    "verify bit for bit, print a table and clean up.")
    p.add_argument("--size", default=DEFAULT_SIZE, help=f"image size (default {DEFAULT_SIZE})")
    p.add_argument("--fill", type=float, default=DEFAULT_FILL, help="fraction filled with files (default 0.5)")
    p.add_argument("--dir", help="where to put temporary files (default: the system temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the temporary files")
    p.set_defaults(func=cmd_demo)

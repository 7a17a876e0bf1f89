"""Low-level commands on a store: ``ferry image backup|restore|list|delete``, ``ferry prune|check|repair``.

These work on one disk image and one store directory, without the control plane (the VM-level commands
come with it). Every command takes ``--json`` for machine-readable output; otherwise it prints a table.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from datetime import UTC, datetime
from typing import Any, cast

from mover.errors import StoreCorrupt, StoreError, UsageError
from mover.progress import Progress, TerminalBar, human_size
from mover.store.api import BackupInfo, StoreAPI

STORE_ENV = "FERRY_STORE"  # default for --store, so a shell session can name its store once

_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3}


def parse_size(value: str) -> int:
    """``262144``, ``256K``, ``1M`` (binary units) as bytes."""
    v = value.strip().upper().removesuffix("IB").removesuffix("B")
    unit = v[-1:] if v[-1:] in _UNITS and v[-1:] else ""
    try:
        n = int(v[: len(v) - len(unit)] if unit else v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {value!r}") from None
    return n * _UNITS[unit]


def parse_block_size(value: str) -> int:
    """A ``--block-size``: a power of two the store accepts (checked here for a clear usage error)."""
    from mover.store.config import MAX_BLOCK_SIZE, MIN_BLOCK_SIZE

    n = parse_size(value)
    if n < MIN_BLOCK_SIZE or n > MAX_BLOCK_SIZE or n & (n - 1):
        raise argparse.ArgumentTypeError(
            f"{value!r} is not a power of two from {MIN_BLOCK_SIZE // 1024}K to {MAX_BLOCK_SIZE // 1024**2}M")
    return n


def parse_label(value: str) -> tuple[str, str]:
    key, sep, val = value.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"label must be KEY=VALUE, got {value!r}")
    return key, val


@contextmanager
def open_store(args: argparse.Namespace, create: bool = False) -> Iterator[StoreAPI]:
    """Open ``--store`` (created on a first backup); always closed."""
    from mover.store.repo import Store

    if not args.store:
        raise UsageError(f"no store: pass --store DIR or set {STORE_ENV}")
    if not getattr(args, "verbose", 0):
        # An expected failure is reported as one error line (and check prints its report); the store's own
        # warnings about the same damage would repeat it as log noise. ``-v`` shows them.
        logging.getLogger("mover.store").setLevel(logging.ERROR)
    if not create and not os.path.exists(os.path.join(args.store, "config.json")):
        raise StoreError("no store here (the first `ferry image backup` creates one)", path=args.store)
    kw: dict[str, Any] = {"create": create}
    if create and getattr(args, "block_size", None):
        kw["block_size"] = args.block_size
    store = Store.open(args.store, **kw)
    if create and getattr(args, "block_size", None) and store.block_size != args.block_size:
        store.close()
        raise UsageError(f"store {args.store} has {store.block_size}-byte blocks; --block-size only applies "
                         "to a new store")
    try:
        # Store narrows save_backup to its own Manifest class; every manifest it hands out is one.
        yield cast(StoreAPI, store)
    finally:
        store.close()


def _emit_json(obj: Any) -> None:
    json.dump(obj, sys.stdout, indent=2, sort_keys=True, default=str)
    sys.stdout.write("\n")


def _table(title: str, columns: list[str], rows: list[list[str]], header: bool = True) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, title_justify="left", show_header=header)
    for i, c in enumerate(columns):
        left = i == 0 or c in ("type", "source", "labels", "when", "")
        table.add_column(c, justify="left" if left else "right", no_wrap=c not in ("source", "labels"))
    for r in rows:
        table.add_row(*r)
    # Off a terminal rich assumes 80 columns and would wrap ids and sizes; a log or a pipe has room.
    Console(width=None if sys.stdout.isatty() else 200).print(table)


def _when(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=UTC).strftime("%Y-%m-%d %H:%M:%S")


def _rate(nbytes: float, secs: float) -> str:
    return f"{human_size(nbytes / secs)}/s" if secs > 0 else "-"


def info_dict(info: BackupInfo) -> dict[str, Any]:
    """A backup's metadata as JSON-able data."""
    return asdict(info)


# --- commands -----------------------------------------------------------------------------------------


def cmd_backup(args: argparse.Namespace) -> int:
    from mover.pipeline import backup
    from mover.sources import open_source
    from mover.sources.extents import load_changed

    if args.changed and not args.base:
        raise UsageError("--changed needs --base (the backup the changes are relative to)")
    changed = load_changed(args.changed) if args.changed else None
    source = open_source(args.source, changed=changed, direct=args.direct)
    try:
        with open_store(args, create=True) as store:
            progress = Progress()
            with TerminalBar(f"backup {os.path.basename(source.name)}", enabled=None if not args.json else False) as bar:
                progress.listen(bar.update)
                info = backup(store, source, base=args.base, changed=changed is not None,
                              labels=dict(args.label or []), progress=progress,
                              readers=args.readers, workers=args.workers)
    finally:
        source.close()
    if args.json:
        _emit_json(info_dict(info))
        return 0
    s = info.stats
    secs = s["seconds"]
    # One row per figure: fits an 80-column terminal, and reads like a receipt.
    rows = [
        ["backup", info.id],
        ["type", info.kind + (f" (base {info.base})" if info.base else "")],
        ["size", human_size(info.size)],
        ["read", human_size(s["read"])],
        ["zero", human_size(s["zero"])],
        ["unchanged (not read)", human_size(s.get("unchanged", 0))] if s.get("unchanged") else None,
        ["duplicate", human_size(s["duplicate"])],
        ["new", human_size(s["new"])],
        ["stored (compressed)", human_size(s["stored"])],
        ["time", f"{secs:.2f}s"],
        ["rate (of size)", _rate(info.size, secs)],
    ]
    _table("backup saved", ["", ""], [r for r in rows if r], header=False)
    return 0


def cmd_restore(args: argparse.Namespace) -> int:
    from mover.restore import restore
    from mover.sinks import open_sink

    with open_store(args) as store:
        info = store.backup(args.backup_id)  # NotFound before the destination is touched
        created = not os.path.exists(args.dest)
        sink = open_sink(args.dest, overwrite=args.force, fresh=args.fresh)
        try:
            progress = Progress(info.size)
            with TerminalBar(f"restore {args.backup_id}", enabled=None if not args.json else False) as bar:
                progress.listen(bar.update)
                stats = restore(store, args.backup_id, sink, workers=args.workers, progress=progress,
                                sync=not args.no_sync)
        except BaseException:
            sink.close()
            if created and os.path.isfile(args.dest):
                os.unlink(args.dest)  # a half-restored image must not pass for a good one
            raise
        sink.close()
    stats = {"backup": args.backup_id, "dest": args.dest, **stats}
    if args.json:
        _emit_json(stats)
        return 0
    _table(
        f"restore {args.backup_id} -> {args.dest}",
        ["size", "written", "zero", "time", "rate"],
        [[human_size(stats["size"]), human_size(stats["written"]), human_size(stats["zero"]),
          f"{stats['seconds']:.2f}s", _rate(stats["size"], stats["seconds"])]],
    )
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    with open_store(args) as store:
        infos = sorted(store.backups(), key=lambda b: b.created)
    if args.json:
        _emit_json([info_dict(i) for i in infos])
        return 0
    _table(
        f"backups in {args.store}",
        ["id", "when", "type", "size", "stored", "source", "labels"],
        [[i.id, _when(i.created), i.kind, human_size(i.size), human_size(i.stats.get("stored", 0)),
          i.source, " ".join(f"{k}={v}" for k, v in sorted(i.labels.items()))] for i in infos],
    )
    return 0


def cmd_delete(args: argparse.Namespace) -> int:
    with open_store(args) as store:
        for backup_id in args.backup_ids:
            store.backup(backup_id)  # every id must exist before any is deleted
        for backup_id in args.backup_ids:
            store.delete_backup(backup_id)
    if args.json:
        _emit_json({"deleted": args.backup_ids})
    else:
        print(f"deleted {len(args.backup_ids)} backup(s); run `ferry prune` to free their blocks")
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    with open_store(args) as store:
        result = store.prune()
    if args.json:
        _emit_json(result)
    else:
        _table(f"prune {args.store}", ["what", "count"], [[k.replace("_", " "), str(v)] for k, v in result.items()])
    return 0


def cmd_repair(args: argparse.Namespace) -> int:
    with open_store(args) as store:
        result = store.repair()  # type: ignore[attr-defined]
    if args.json:
        _emit_json(result)
    else:
        _table(f"repair {args.store}", ["what", "count"], [[k.replace("_", " "), str(v)] for k, v in result.items()])
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    with open_store(args) as store:
        report = store.check(read_data=args.read_data)
    problems = report.get("problems", [])
    ok = bool(report.get("ok")) and not problems
    if args.json:
        _emit_json(report)
        return 0 if ok else StoreCorrupt.exit_code
    what = "structure and data" if args.read_data else "structure"
    for w in report.get("warnings", []):
        print(f"warning: {w}")
    if ok:
        counts = report.get("counts", {})
        detail = ", ".join(f"{k} {v}" for k, v in counts.items()) if isinstance(counts, dict) else ""
        print(f"store {args.store}: {what} ok" + (f" ({detail})" if detail else ""))
        return 0
    # Details on stdout (a report), the verdict as the one error line on stderr.
    for p in problems[:20]:
        print(f"problem: {p.get('kind')} {p.get('object')}: {p.get('detail')}")
    if len(problems) > 20:
        print(f"... and {len(problems) - 20} more problems (use --json)")
    for d in report.get("damaged_blocks", [])[:20]:
        print(f"{d.get('state')} block {str(d.get('id'))[:16]} in pack {d.get('pack')}")
    broken = report.get("broken_backups", [])
    for b in broken:
        print(f"broken backup {b.get('id')}: {b.get('detail')}")
    found = [f"{len(problems)} structural problem(s)"] if problems else []
    for key in ("missing_blocks", "corrupt_blocks"):
        if report.get(key):
            found.append(f"{report[key]} {key.replace('_', ' ')}")
    ids = ", ".join(str(b.get("id")) for b in broken)
    raise StoreCorrupt(
        f"{', '.join(found) or 'check failed'}; broken backups: {ids or 'none'}",
        path=args.store,
    )


# --- parser -------------------------------------------------------------------------------------------


def _store_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--store", metavar="DIR", default=os.environ.get(STORE_ENV),
                   help=f"store directory (default: ${STORE_ENV})")
    p.add_argument("--json", action="store_true", help="machine-readable output on stdout")


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add ``image``, ``prune``, ``check`` and ``repair`` to the ``ferry`` parser."""
    image = subparsers.add_parser("image", help="back up and restore disk images (low level, one store)",
                                  description="Back up raw disk images and block devices into a store, and "
                                              "restore them. Every backup is a full restore point.")
    isub = image.add_subparsers(dest="image_command", metavar="COMMAND", required=True)

    p = isub.add_parser("backup", help="back up an image file or a block device",
                        description="Read SOURCE (a raw image file or a block device), skip zeros, store new "
                                    "blocks. With --base, blocks unchanged since that backup need no lookup; "
                                    "with --changed, only the listed ranges are read.")
    p.add_argument("source", metavar="SOURCE", help="raw image file, block device, or file:/device: URL")
    _store_arg(p)
    p.add_argument("--base", metavar="BACKUP_ID", help="earlier backup of the same disk (incremental)")
    p.add_argument("--changed", metavar="EXTENTS.json",
                   help="read only the dirty ranges of this list (the JSON of imageio's "
                        "/extents?context=dirty); needs --base")
    p.add_argument("--label", metavar="KEY=VALUE", action="append", type=parse_label,
                   help="metadata to keep with the backup (repeatable)")
    p.add_argument("--block-size", type=parse_block_size, metavar="N",
                   help="block size of a new store (e.g. 256K, from 64K to 4M); an existing store keeps its own")
    p.add_argument("--readers", type=int, metavar="N", help="parallel readers of the source")
    p.add_argument("--direct", action="store_true",
                   help="read a block device with O_DIRECT (bypass the page cache); ignored for files")
    p.add_argument("--workers", type=int, metavar="N", help="hash/compress threads (default: cores)")
    p.set_defaults(func=cmd_backup)

    p = isub.add_parser("restore", help="write a backup to an image file or a block device",
                        description="Write backup BACKUP_ID to DEST bit for bit. A file is created sparse "
                                    "(zeros are holes); a block device must be large enough.")
    p.add_argument("backup_id", metavar="BACKUP_ID")
    p.add_argument("dest", metavar="DEST", help="image file to create, or a block device")
    _store_arg(p)
    p.add_argument("--force", action="store_true", help="overwrite a non-empty DEST file")
    p.add_argument("--fresh", action="store_true",
                   help="DEST device already reads as zeros: skip zeroing (only for new disks)")
    p.add_argument("--workers", type=int, metavar="N", help="parallel fetch/write threads")
    p.add_argument("--no-sync", action="store_true", help="do not fsync DEST at the end")
    p.set_defaults(func=cmd_restore)

    p = isub.add_parser("list", help="list the backups in a store")
    _store_arg(p)
    p.set_defaults(func=cmd_list)

    p = isub.add_parser("delete", help="delete backups (their blocks go at the next prune)")
    p.add_argument("backup_ids", metavar="BACKUP_ID", nargs="+")
    _store_arg(p)
    p.set_defaults(func=cmd_delete)

    p = subparsers.add_parser("prune", help="free the blocks no backup references",
                              description="Drop blocks that no backup references; safe while other "
                                          "processes back up into the same store.")
    _store_arg(p)
    p.set_defaults(func=cmd_prune)

    p = subparsers.add_parser("repair", help="rebuild a damaged index from the packs",
                              description="Rebuild the index of packs that no valid index segment covers (after "
                                          "a truncated or damaged segment): packs describe their own records. "
                                          "Damaged segments are kept aside as evidence. Run `ferry check` after.")
    _store_arg(p)
    p.set_defaults(func=cmd_repair)

    p = subparsers.add_parser("check", help="verify a store (structure, or every block with --read-data)",
                              description="Check the store's structure: every block a backup references is "
                                          "indexed and its pack present. --read-data also re-reads, "
                                          "decompresses and re-hashes every block. Exits non-zero and names "
                                          "the broken backups when something is wrong.")
    _store_arg(p)
    p.add_argument("--read-data", action="store_true", help="re-read and re-hash every block")
    p.set_defaults(func=cmd_check)

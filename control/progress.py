"""Live progress of a flow in the terminal (per disk), and the summary table printed at the end."""

from __future__ import annotations

import sys
import time
from types import TracebackType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.live import Live
    from rich.table import Table

    from control.catalog import Catalog


class FlowView:
    """Renders the events of one flow: a live table on a terminal, one line per change otherwise."""

    def __init__(self, title: str, quiet: bool = False) -> None:
        self.title = title
        self.quiet = quiet
        self.tty = sys.stderr.isatty() and not quiet
        self.live: Live | None = None
        self._last_lines: dict[str, str] = {}
        self._state = ""

    def __enter__(self) -> FlowView:
        if self.tty:
            # rich only for a live table on a terminal: its import (~80 ms) is start-up time of every
            # `ferry backup`, and scripts (--json, or output to a file) never draw one.
            from rich.console import Console
            from rich.live import Live

            self.live = Live(self._table({}), console=Console(stderr=True), refresh_per_second=4,
                             transient=False)
            self.live.__enter__()
        return self

    def __exit__(self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None) -> None:
        if self.live is not None:
            self.live.__exit__(t, v, tb)

    def update(self, ev: dict[str, Any]) -> None:
        if self.quiet:
            return
        if self.live is not None:
            self.live.update(self._table(ev))
            return
        state = str(ev.get("state"))
        if state != self._state:
            self._state = state
            print(f"{self.title}: {state}" + (f" ({ev['error']})" if ev.get("error") else ""), file=sys.stderr)
        for did, d in (ev.get("disks") or {}).items():
            line = f"  disk {d.get('alias')}: {d.get('state')}"
            if self._last_lines.get(did) != line:
                self._last_lines[did] = line
                print(line, file=sys.stderr)

    def _table(self, ev: dict[str, Any]) -> Table:
        from rich.table import Table

        t = Table(title=f"{self.title}: {ev.get('state', 'starting')}", title_justify="left")
        for c in ("disk", "type", "state", "progress", "stored", "rate"):
            t.add_column(c)
        for d in (ev.get("disks") or {}).values():
            total = d.get("total") or 0
            pct = f"{100 * d.get('done', 0) / total:5.1f}%" if total else "-"
            t.add_row(str(d.get("alias")), str(d.get("kind", "")), str(d.get("state")), pct,
                      f"{d.get('stored', 0) / 2**20:.1f} MiB", f"{d.get('rate', 0) / 2**20:.0f} MiB/s")
        return t


def print_backup_summary(ev: dict[str, Any], catalog: Catalog) -> None:
    """One line per disk: type, bytes read, stored, time and rate (from the catalog when it is local)."""
    bid = ev.get("backup_id", "")
    try:
        b = catalog.backup(bid)
    except Exception:
        print(f"backup {bid} {ev.get('state')}" + (f": {ev.get('error')}" if ev.get("error") else ""))
        return
    secs = (b.finished or time.time()) - b.started
    print(f"backup {b.id} of {b.vm_name}: {b.state} ({b.mode}/{b.method}, {secs:.1f}s)"
          + (f": {b.error}" if b.error else ""))
    for w in b.stats.get("warnings") or []:
        print(f"  note: {w}")
    for d in b.disks:
        s = d.stats
        read = s.get("bytes_read", s.get("read", 0)) or 0
        stored = s.get("bytes_stored", s.get("stored", 0)) or 0
        dsecs = s.get("seconds", 0) or 0
        rate = read / dsecs / 2**20 if dsecs else 0.0
        print(f"  {d.alias:<16} {d.kind:<11} read {read / 2**20:9.1f} MiB  stored {stored / 2**20:9.1f} MiB  "
              f"{dsecs:6.1f}s  {rate:7.1f} MiB/s  {d.state}")

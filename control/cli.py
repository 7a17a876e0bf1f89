"""The ``ferry`` command line: one parser, subcommands registered by the modules that own them.

Expected failures (``FerryError``) print one line and exit with the error's code; never a traceback.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import logging
import os
import sys
from collections.abc import Sequence

from mover.errors import FerryError

# Modules that add subcommands: each has ``register(subparsers)`` and sets ``func`` on its parsers.
# ``lab.cli`` is imported only to offer ``ferry lab``; no control or mover code path uses the lab.
COMMAND_MODULES = (
    "mover.cli",
    "mover.commands",
    "control.commands",
    "control.demo",
    "lab.cli",
)


# Commands served by the mover's CLI alone: importing only it keeps ``ferry image ...`` starting in ~0.2 s
# instead of ~0.9 s (the control plane pulls in ovirtsdk4, nats and asyncio), which matters for short
# incremental backups (measured by helper H2 on this machine).
FAST_COMMANDS = {"image": "mover.cli", "prune": "mover.cli", "check": "mover.cli", "repair": "mover.cli"}
# The VM-level commands need only ``control.commands`` (which imports the engine SDK, the flows and rich only
# in the commands that use them): ``ferry backup`` and ``ferry restore``, NATS trigger clients, start with
# ~0.3 s of imports instead of ~0.6 s, a fixed cost of every VM backup (measured by helper h11).
FAST_COMMANDS.update(dict.fromkeys(("backup", "restore", "backups", "vms", "engine", "catalog"), "control.commands"))


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ferry",
        description="Backup and restore for oVirt, OLVM and RHV virtual machines.",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    first = next((a for a in (argv or []) if not a.startswith("-")), None)
    modules = (FAST_COMMANDS[first],) if first in FAST_COMMANDS else COMMAND_MODULES
    for name in modules:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name != name:
                raise
            continue
        module.register(sub)
    return parser


# Commands whose process may skip the interpreter's final garbage collections (see ``_quick_exit``).
QUICK_EXIT = frozenset({"backup", "restore"})


def main(argv: Sequence[str] | None = None) -> int:
    as_program = argv is None  # the console script or ``python -m control.cli``; tests pass argv
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        return _main(argv)
    finally:
        if as_program and next((a for a in argv if not a.startswith("-")), None) in QUICK_EXIT:
            _quick_exit()


def _quick_exit() -> None:
    """Let the process end without the interpreter's final garbage collections, which walk every object the
    imports made (nats, asyncio, ...): ~60 ms of every ``ferry backup``'s exit on this machine, ~10 ms
    after ``gc.freeze()`` (measured by helper h11). The command's work is done by then: its output printed
    (standard streams are still flushed at exit), its NATS connection closed, and nothing of it relies on a
    collection at exit (which Python does not promise anyway)."""
    gc.freeze()


def _main(argv: list[str]) -> int:
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    level = [logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)]
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        rc = args.func(args)
    except FerryError as e:
        print(f"ferry: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("ferry: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())

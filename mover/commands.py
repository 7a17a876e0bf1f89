"""``ferry mover``: run a mover process that takes jobs from NATS."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
from typing import Any

from mover import jobs
from mover.errors import UsageError

log = logging.getLogger(__name__)


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "mover",
        help="run a mover: take backup and restore jobs from NATS",
        description="Run a mover: a process that takes jobs of its capabilities from NATS JetStream and "
        "moves the data (source -> store, store -> sink). Movers never receive engine credentials.",
    )
    p.add_argument("--nats", default="nats://127.0.0.1:4222", metavar="URL",
                   help="NATS server URL(s), comma-separated (default: %(default)s)")
    p.add_argument("--nats-user", metavar="USER")
    p.add_argument("--nats-password-file", metavar="FILE", help="file holding the NATS password")
    p.add_argument("--nats-token-file", metavar="FILE", help="file holding a NATS token")
    p.add_argument("--nats-creds", metavar="FILE", help="NATS .creds file (JWT and nkey)")
    p.add_argument("--nats-ca", metavar="FILE", help="CA to verify the NATS server (enables TLS)")
    p.add_argument("--nats-cert", metavar="FILE", help="client certificate for NATS (mutual TLS)")
    p.add_argument("--nats-key", metavar="FILE", help="key of --nats-cert")
    p.add_argument("--store", metavar="DIR",
                   help="where this mover finds the store, when it is mounted elsewhere than the jobs say")
    p.add_argument("--capability", action="append", choices=list(jobs.CAPABILITIES), metavar="CAP",
                   help=f"take jobs of this kind ({', '.join(jobs.CAPABILITIES)}); repeat for several "
                   "(default: imageio and store)")
    p.add_argument("--proxy", metavar="VM_ID", help="this mover's proxy VM id (for --capability attach)")
    p.add_argument("--workers", type=int, default=1, metavar="N", help="jobs run at once (default: 1)")
    p.add_argument("--threads", type=int, metavar="N", help="pipeline threads per job (default: per core)")
    p.add_argument("--ack-wait", type=float, default=30.0, metavar="SEC",
                   help="seconds before a silent mover's job goes to another (default: %(default)s)")
    p.add_argument("--max-deliver", type=int, default=5, metavar="N",
                   help="deliveries of a job before it is dead-lettered (default: %(default)s)")
    p.add_argument("--backoff", type=float, default=1.0, metavar="SEC",
                   help="first retry delay after a retryable failure, doubled each time (default: %(default)s)")
    p.add_argument("--rate-limit", type=int, default=0, metavar="BYTES",
                   help="read at most BYTES per second per export job (default: unlimited)")
    p.set_defaults(func=run)


def _read_secret(path: str | None) -> str | None:
    if not path:
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().strip()
    except OSError as e:
        raise UsageError(f"cannot read {path}: {e.strerror}") from None


def options_from_args(args: argparse.Namespace) -> tuple[Any, Any]:
    """(BusOptions, WorkerOptions) from the command line."""
    from mover.bus import BusOptions
    from mover.worker import WorkerOptions

    caps = args.capability or [jobs.CAP_IMAGEIO, jobs.CAP_STORE]
    if jobs.CAP_ATTACH in caps and not args.proxy:
        raise UsageError("--capability attach needs --proxy VM_ID")
    if args.workers < 1 or (args.threads is not None and args.threads < 1):
        raise UsageError("--workers and --threads must be at least 1")
    if args.max_deliver < 1 or args.ack_wait <= 0:
        raise UsageError("--max-deliver must be at least 1 and --ack-wait positive")
    bus_opts = BusOptions(
        url=args.nats,
        user=args.nats_user,
        password=_read_secret(args.nats_password_file),
        token=_read_secret(args.nats_token_file),
        creds_file=args.nats_creds,
        tls_ca=args.nats_ca,
        tls_cert=args.nats_cert,
        tls_key=args.nats_key,
        name="ferry-mover",
    )
    worker_opts = WorkerOptions(
        capabilities=list(dict.fromkeys(caps)),
        proxy=args.proxy,
        slots=args.workers,
        threads=args.threads,
        ack_wait=args.ack_wait,
        max_deliver=args.max_deliver,
        backoff_base=args.backoff,
        rate_limit=args.rate_limit,
        store=args.store,
    )
    return bus_opts, worker_opts


def run(args: argparse.Namespace) -> int:
    from mover.worker import Worker

    bus_opts, worker_opts = options_from_args(args)
    worker = Worker(bus_opts, worker_opts)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, stop.set)
        await worker.run(stop)

    asyncio.run(main())
    log.info("Mover stopped jobs=%d abandoned=%d", worker.done, worker.abandoned)
    if worker.abandoned:
        # A job thread stuck in a blocking read is still running (its job was handed back): leave now rather
        # than let interpreter shutdown race a live daemon thread. Its unpublished writes are garbage for
        # prune, as after a kill; the store's locks are flocks the kernel drops with the process.
        logging.shutdown()
        os._exit(0)
    return 0

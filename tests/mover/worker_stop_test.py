"""SIGTERM stops ``ferry mover`` promptly, idle or in the middle of a job, and hands the job back.

Real processes as in ``worker_test``: nats-server, the imageio daemon, qemu-nbd, movers as subprocesses.
A hung host is a real one: the qemu-nbd behind the ticket is SIGSTOPped, so the mover's ranged GET blocks
in the daemon. The exit bounds are loose behaviour checks (a mover used to take its fetch timeout, or a
reader's 60 s I/O timeout), not benchmarks.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from worker_test import Env, MiB, bus_for, export_job, first_progress, restore_and_compare, store_backups

# Generous: the mover stops in well under 2 s; CI machines are slow and shared.
EXIT_BOUND = 8.0


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    e = Env(tmp_path)
    try:
        yield e
    finally:
        for n in e.nbds:  # a stopped qemu-nbd would hold its own SIGTERM until killed
            if n.proc.poll() is None:
                os.kill(n.proc.pid, signal.SIGCONT)
        e.close()


def sigterm_and_time(proc: subprocess.Popen[bytes]) -> float:
    start = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        pytest.fail("the mover did not exit within 30 s of SIGTERM")
    return time.monotonic() - start


def test_idle_mover_exits_at_once(env: Env) -> None:
    proc = env.mover()

    async def main() -> None:
        bus = await bus_for(env)
        try:
            job = export_job(env)
            await bus.publish_job(job)
            assert (await bus.wait_result(job.job_id, timeout=30)).ok
        finally:
            await bus.close()

    asyncio.run(main())
    time.sleep(3)  # some uptime: fetches have come and gone
    took = sigterm_and_time(proc)
    assert proc.returncode == 0, env.mover_log(0)
    assert took < EXIT_BOUND, f"exit took {took:.1f}s"
    assert "Mover stopped jobs=1" in env.mover_log(0)


def test_sigterm_with_a_hung_source_hands_the_job_back(env: Env) -> None:
    first = env.mover("--rate-limit", str(2 * MiB))  # seconds of reading: well inside the export at SIGTERM

    async def main() -> None:
        bus = await bus_for(env)
        try:
            job = export_job(env)
            progress = asyncio.create_task(first_progress(bus, job.job_id, timeout=20))
            await bus.publish_job(job)
            await progress
            nbd = env.nbds[0].proc
            os.kill(nbd.pid, signal.SIGSTOP)  # the host hangs: reads block in the imageio daemon
            try:
                await asyncio.sleep(0.5)
                took = await asyncio.to_thread(sigterm_and_time, first)
            finally:
                os.kill(nbd.pid, signal.SIGCONT)
            log = env.mover_log(0)
            assert first.returncode == 0, log
            assert took < EXIT_BOUND, f"exit took {took:.1f}s"
            assert "Job cancelled" in log and "abandoned=1" in log, log
            # Handed back with a nak: the next mover takes it at once (not after ack_wait) and finishes it.
            env.mover()
            res = await bus.wait_result(job.job_id, timeout=60)
            assert res.ok and res.attempt == 2, res
            assert str(first.pid) not in res.mover
            assert len(store_backups(env)) == 1  # the abandoned run published nothing
            await restore_and_compare(env, bus, res.store_backup_id or "")
        finally:
            await bus.close()

    asyncio.run(main())

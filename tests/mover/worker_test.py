"""Movers as separate processes (``ferry mover``) against real NATS, the real imageio daemon and qemu-nbd.

Each test starts its own nats-server, imageio daemon and qemu-nbd exports, and kills every mover it started,
even on failure. Short ack_wait and backoff keep redelivery tests to seconds.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from imageio_env import ImageioDaemon, QemuNbd, free_port, make_image, qemu_img, qemu_io, raw_content

from control.natsd import NatsServer
from mover import jobs
from mover.bus import Bus, BusOptions, connect

MiB = 1 << 20
SIZE = 16 * MiB
FERRY = str(Path(sys.executable).parent / "ferry")
# Every MiB its own pattern, so a block restored at the wrong offset shows; two zero MiBs stay holes.
WRITES = [(i * MiB, MiB, 0x20 + i) for i in range(16) if i not in (5, 6)]


class Env:
    """One test's world: NATS, imageio, a source disk, a store, and the movers started."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.nats = NatsServer(tmp / "nats")
        self.nats.start()
        self.imageio = ImageioDaemon(tmp / "imageio")
        self.store = str(tmp / "store")
        self.disk = tmp / "disk.qcow2"
        make_image(self.disk, SIZE, WRITES)
        self.nbds: list[QemuNbd] = []
        self.movers: list[subprocess.Popen[bytes]] = []

    def export_source(self, bitmap: str | None = None) -> dict[str, Any]:
        """A read ticket on the disk; with ``bitmap``, one serving the dirty extents since that checkpoint."""
        nbd = QemuNbd(self.disk, self.tmp / f"src-{len(self.nbds)}.sock", bitmap=bitmap)
        self.nbds.append(nbd)
        url = self.imageio.add_ticket(nbd.url, SIZE, ["read"], dirty=bitmap is not None)
        return {"type": "imageio", "transfer_url": url, "proxy_url": None, "ca_pem": self.imageio.ca_pem,
                "size": SIZE, "format": "raw", "dirty": bitmap is not None}  # fmt: skip

    def restore_sink(self, target: Path) -> dict[str, Any]:
        make_image(target, SIZE, [(0, SIZE, 0x99)])  # old data everywhere: zeros must really be written
        nbd = QemuNbd(target, self.tmp / f"dst-{len(self.nbds)}.sock", read_only=False)
        self.nbds.append(nbd)
        url = self.imageio.add_ticket(nbd.url, SIZE, ["write"])
        return {"type": "imageio", "transfer_url": url, "proxy_url": None, "ca_pem": self.imageio.ca_pem,
                "size": SIZE, "format": "raw"}  # fmt: skip

    def mover(self, *extra: str) -> subprocess.Popen[bytes]:
        log = open(self.tmp / f"mover-{len(self.movers)}.log", "wb")
        proc = subprocess.Popen(
            [FERRY, "-vv", "mover", "--nats", self.nats.url, "--ack-wait", "2", "--max-deliver", "3",
             "--backoff", "0.2", "--threads", "2", *extra],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
        )  # fmt: skip
        log.close()
        self.movers.append(proc)
        return proc

    def mover_log(self, n: int) -> str:
        return (self.tmp / f"mover-{n}.log").read_text(errors="replace")

    def close_exports(self) -> None:
        for n in self.nbds:
            n.close()
        self.nbds.clear()

    def close(self) -> None:
        for p in self.movers:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        for n in self.nbds:
            n.close()
        self.imageio.close()
        self.nats.stop()


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    e = Env(tmp_path)
    try:
        yield e
    finally:
        e.close()


def export_job(env: Env, **kw: Any) -> jobs.ExportJob:
    args: dict[str, Any] = {"job_id": "x" + uuid.uuid4().hex[:12], "backup_id": "b1", "disk_id": "d1",
                            "store": "file://" + env.store, "source": env.export_source(), "labels": {"vm": "vm1"}}  # fmt: skip
    return jobs.ExportJob(**(args | kw))


async def bus_for(env: Env) -> Bus:
    bus = await connect(BusOptions(url=env.nats.url))
    await bus.ensure_streams()
    return bus


async def first_progress(bus: Bus, job_id: str, timeout: float = 10) -> jobs.JobProgress:
    got: asyncio.Queue[jobs.JobProgress] = asyncio.Queue()

    async def cb(msg: Any) -> None:
        await got.put(jobs.JobProgress.from_json(msg.data))

    sub = await bus.nc.subscribe(jobs.progress_subject(job_id), cb=cb)
    try:
        return await asyncio.wait_for(got.get(), timeout)
    finally:
        await sub.unsubscribe()


async def restore_and_compare(env: Env, bus: Bus, store_backup_id: str) -> None:
    target = env.tmp / f"restored-{uuid.uuid4().hex[:6]}.qcow2"
    job = jobs.RestoreJob("r" + uuid.uuid4().hex[:12], "rs1", "d1", env.store, store_backup_id,
                          env.restore_sink(target))  # fmt: skip
    await bus.publish_job(job)
    res = await bus.wait_result(job.job_id, timeout=30)
    assert res.ok, res.error
    assert res.stats["zero_bytes"] >= 2 * MiB and res.stats["put_bytes"] <= SIZE - 2 * MiB
    assert raw_content(target) == raw_content(env.disk)


def store_backups(env: Env) -> list[Any]:
    from mover.store.repo import Store

    with Store.open(env.store) as store:
        return list(store.backups())


def test_export_restore_and_idempotence(env: Env) -> None:
    env.mover()

    async def main() -> None:
        bus = await bus_for(env)
        try:
            job = export_job(env)
            progress = asyncio.create_task(first_progress(bus, job.job_id))
            assert await bus.publish_job(job)
            res = await bus.wait_result(job.job_id, timeout=30)
            assert res.ok and res.kind == "export" and res.store_backup_id and res.attempt == 1
            assert res.stats["read"] == SIZE - 2 * MiB  # the zero extents were not read
            assert res.stats["source"].endswith("...") and job.source["transfer_url"] not in res.stats["source"]
            p = await progress
            assert p.total == SIZE and 0 < p.done <= SIZE
            # The same job again with another Msg-Id (as after the dedup window): acknowledged, not redone.
            await bus.js.publish(jobs.job_subject("imageio"), job.to_json(), headers={jobs.HDR_MSG_ID: "again"})
            await asyncio.sleep(1.5)
            info = await bus.js.stream_info(jobs.STREAM_JOBS)
            assert info.state.messages == 0
            results = await bus.js.stream_info(jobs.STREAM_EVENTS, subjects_filter=jobs.result_subject(job.job_id))
            assert results.state.subjects == {jobs.result_subject(job.job_id): 1}  # reported once
            assert len(store_backups(env)) == 1  # stored once
            assert store_backups(env)[0].labels["job_id"] == job.job_id
            await restore_and_compare(env, bus, res.store_backup_id or "")
        finally:
            await bus.close()

    asyncio.run(main())


def test_incremental_reads_only_dirty_extents(env: Env) -> None:
    env.mover()

    async def main() -> None:
        bus = await bus_for(env)
        try:
            full = export_job(env)
            await bus.publish_job(full)
            res = await bus.wait_result(full.job_id, timeout=30)
            assert res.ok
            env.close_exports()  # the transfer ends (and releases the image's lock)
            # The checkpoint of the full backup, then the guest writes 64 KiB in two places and zeroes one.
            qemu_img("bitmap", "--add", str(env.disk), "ckpt1")
            qemu_io(env.disk, "qcow2", f"write -P 0x77 {3 * MiB} 65536", f"write -P 0x78 {10 * MiB + 4096} 4096",
                    f"write -z {12 * MiB} 262144")  # fmt: skip
            inc = export_job(env, source=env.export_source(bitmap="ckpt1"), base=res.store_backup_id, changed=True)
            await bus.publish_job(inc)
            res2 = await bus.wait_result(inc.job_id, timeout=30)
            assert res2.ok, res2.error
            block = 256 * 1024  # the store's default block size: reads are whole blocks around dirty ranges
            # Three dirty blocks of 64: the two written, and the zeroed one (the pipeline reads dirty zero
            # extents too; they come back as zeros and store nothing).
            assert 0 < res2.stats["read"] <= 3 * block
            assert res2.store_backup_id != res.store_backup_id
            info = next(b for b in store_backups(env) if b.id == res2.store_backup_id)
            assert info.kind == "incremental" and info.base == res.store_backup_id
            # The incremental restores on its own to the disk as it is now.
            await restore_and_compare(env, bus, res2.store_backup_id or "")
        finally:
            await bus.close()

    asyncio.run(main())


def test_two_movers_share_jobs(env: Env) -> None:
    env.mover("--rate-limit", str(16 * MiB))
    env.mover("--rate-limit", str(16 * MiB))

    async def main() -> None:
        bus = await bus_for(env)
        try:
            # Give both movers time to bind to the shared consumer.
            await asyncio.sleep(1.5)
            batch = [export_job(env, disk_id=f"d{i}") for i in range(4)]
            for job in batch:
                await bus.publish_job(job)
            results = [await bus.wait_result(job.job_id, timeout=60) for job in batch]
            assert all(r.ok for r in results)
            assert len({r.mover for r in results}) == 2  # both movers took jobs
            assert len(store_backups(env)) == 4
        finally:
            await bus.close()

    asyncio.run(main())


def test_sigkill_mid_export_is_redelivered(env: Env) -> None:
    first = env.mover("--rate-limit", str(2 * MiB))  # ~7 s of reading: killed well before the end

    async def main() -> None:
        bus = await bus_for(env)
        try:
            job = export_job(env)
            progress = asyncio.create_task(first_progress(bus, job.job_id, timeout=20))
            await bus.publish_job(job)
            await progress  # the first mover is in the middle of the export
            os.killpg(first.pid, signal.SIGKILL)
            first.wait()
            env.mover()
            res = await bus.wait_result(job.job_id, timeout=60)
            assert res.ok and res.attempt == 2
            assert str(first.pid) not in res.mover
            assert len(store_backups(env)) == 1
            await restore_and_compare(env, bus, res.store_backup_id or "")
        finally:
            await bus.close()

    asyncio.run(main())


def test_nats_restart_mid_job(env: Env) -> None:
    env.mover("--rate-limit", str(4 * MiB))

    async def main() -> None:
        bus = await bus_for(env)
        job = export_job(env)
        try:
            progress = asyncio.create_task(first_progress(bus, job.job_id, timeout=20))
            await bus.publish_job(job)
            await progress
        finally:
            await bus.close()
        env.nats.restart()
        bus = await bus_for(env)
        try:
            res = await bus.wait_result(job.job_id, timeout=60)
            assert res.ok and res.attempt == 1  # the same run finished: no redelivery was needed
            assert len(store_backups(env)) == 1
            # The mover's pull loop survived the restart: it takes the next job too.
            again = export_job(env, disk_id="d2")
            await bus.publish_job(again)
            assert (await bus.wait_result(again.job_id, timeout=30)).ok
        finally:
            await bus.close()

    asyncio.run(main())
    assert "NATS reconnected" in env.mover_log(0) or "reconnected" in env.mover_log(0).lower()


def test_malformed_and_permanent_errors_dead_letter(env: Env) -> None:
    env.mover()

    async def main() -> None:
        bus = await bus_for(env)
        try:
            # Not a job at all: dead letter with the reason; no result (no job id to report on).
            await bus.js.publish(jobs.job_subject("imageio"), b"\x00garbage", headers={jobs.HDR_MSG_ID: "g1"})
            # A job with an id but a bad field: dead letter and a failed result.
            bad = export_job(env).to_dict() | {"job_id": "bad1"}
            bad["source"] = dict(bad["source"], size=-1)
            await bus.js.publish(jobs.job_subject("imageio"), jobs.json.dumps(bad).encode())
            res = await bus.wait_result("bad1", timeout=20)
            assert not res.ok and not res.retryable and "size must be positive" in (res.error or "")
            # A restore of a backup the store does not have: permanent, one delivery.
            missing = jobs.RestoreJob("miss1", "rs", "d1", env.store, "no-such-backup",
                                      env.restore_sink(env.tmp / "t.qcow2"))  # fmt: skip
            from mover.store.repo import Store

            Store.open(env.store, create=True).close()
            await bus.publish_job(missing)
            res = await bus.wait_result("miss1", timeout=20)
            assert not res.ok and res.attempt == 1 and "not found" in (res.error or "")
            dead = await bus.js.stream_info(jobs.STREAM_EVENTS, subjects_filter="ferry.dead.>")
            assert sum((dead.state.subjects or {}).values()) == 3
            first = await bus.js.get_msg(jobs.STREAM_EVENTS, subject="ferry.dead.imageio", seq=1, next=True)
            assert first.headers is not None and "not JSON" in first.headers[jobs.HDR_DEAD_REASON]
            # term() follows the result: the work queue empties right after.
            for _ in range(50):
                if (await bus.js.stream_info(jobs.STREAM_JOBS)).state.messages == 0:
                    break
                await asyncio.sleep(0.1)
            assert (await bus.js.stream_info(jobs.STREAM_JOBS)).state.messages == 0
        finally:
            await bus.close()

    asyncio.run(main())


def test_retryable_error_backs_off_then_dead_letters(env: Env) -> None:
    env.mover()

    async def main() -> None:
        bus = await bus_for(env)
        try:
            src = env.export_source() | {"transfer_url": f"https://127.0.0.1:{free_port()}/images/t"}
            job = export_job(env, source=src)
            t0 = time.monotonic()
            await bus.publish_job(job)
            res = await bus.wait_result(job.job_id, timeout=30)
            # Three deliveries with backoff 0.2 s then 0.4 s between them.
            assert time.monotonic() - t0 >= 0.6
            assert not res.ok and res.retryable and res.attempt == 3
            assert "cannot connect" in (res.error or "") and "gave up after 3 deliveries" in (res.error or "")
            dead = await bus.js.get_last_msg(jobs.STREAM_EVENTS, "ferry.dead.imageio")
            assert dead.headers is not None and dead.headers[jobs.HDR_DELIVERIES] == "3"
        finally:
            await bus.close()

    asyncio.run(main())


def test_overlapping_runs_keep_one_backup(tmp_path: Path) -> None:
    # Two runs of one job that overlapped (a mover cut off from NATS long enough for a redelivery) both
    # saved a backup: each keeps the oldest, so they agree and only one stays.
    from mover.store.api import BackupInfo
    from mover.store.repo import Store
    from mover.worker import _first_run_wins

    with Store.open(str(tmp_path / "store"), create=True) as store:
        saved = []
        for n in range(2):
            m = store.new_manifest(MiB)
            info = BackupInfo(id="", size=MiB, block_size=store.block_size, created=1000.0 + n,
                              labels={"job_id": "j1"})  # fmt: skip
            saved.append(store.save_backup(info, m))
        assert _first_run_wins(store, "j1", saved[1]).id == saved[0].id
        assert _first_run_wins(store, "j1", saved[0]).id == saved[0].id
        assert [b.id for b in store.backups()] == [saved[0].id]


def test_sigterm_hands_the_job_back(env: Env) -> None:
    first = env.mover("--rate-limit", str(2 * MiB))

    async def main() -> None:
        bus = await bus_for(env)
        try:
            job = export_job(env)
            progress = asyncio.create_task(first_progress(bus, job.job_id, timeout=20))
            await bus.publish_job(job)
            await progress
            t0 = time.monotonic()
            first.send_signal(signal.SIGTERM)
            assert await asyncio.to_thread(first.wait, 15) == 0  # stops promptly, cleanly
            assert time.monotonic() - t0 < 5
            env.mover()
            res = await bus.wait_result(job.job_id, timeout=30)
            assert res.ok and res.attempt == 2 and str(first.pid) not in res.mover
        finally:
            await bus.close()

    asyncio.run(main())
    assert "Job cancelled" in env.mover_log(0)


def test_command_line_errors() -> None:
    from control.cli import main

    assert main(["mover", "--capability", "attach"]) == 2  # needs --proxy: one line, usage exit code
    assert main(["mover", "--workers", "0"]) == 2

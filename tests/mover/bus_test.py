"""The NATS bus against a real nats-server: streams, de-duplication, shared consumers, results, dead letters."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from control.natsd import NatsServer
from mover import jobs
from mover.bus import Bus, BusError, BusOptions, connect, deliveries


@pytest.fixture
def natsd(tmp_path: Path) -> Iterator[NatsServer]:
    srv = NatsServer(tmp_path / "nats")
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


def job(job_id: str) -> jobs.CheckJob:
    return jobs.CheckJob(job_id, "/tmp/store")


async def _bus(url: str) -> Bus:
    bus = await connect(BusOptions(url=url))
    await bus.ensure_streams()
    return bus


def test_streams_dedup_and_shared_consumer(natsd: NatsServer) -> None:
    async def main() -> None:
        bus = await _bus(natsd.url)
        other = await _bus(natsd.url)  # a second process ensuring the same streams: no error, no change
        try:
            info = await bus.js.stream_info(jobs.STREAM_JOBS)
            assert str(getattr(info.config.retention, "value", info.config.retention)) == "workqueue"
            assert await bus.publish_job(job("a")) is True
            assert await bus.publish_job(job("a")) is False  # same Nats-Msg-Id: dropped by the server
            assert await bus.publish_job(job("b")) is True
            subject = jobs.job_subject("store")
            s1 = await bus.job_consumer(subject, ack_wait=1, max_deliver=2)
            s2 = await other.job_consumer(subject, ack_wait=1, max_deliver=2)
            m1 = (await s1.fetch(1, timeout=2))[0]
            m2 = (await s2.fetch(1, timeout=2))[0]
            # One consumer shared: the two subscribers got different jobs.
            assert {jobs.parse_job(m1.data).job_id, jobs.parse_job(m2.data).job_id} == {"a", "b"}
            assert deliveries(m1) == 1
            await m1.ack_sync()
            # m2 not acked: redelivered after ack_wait, with the delivery count up.
            again = (await s1.fetch(1, timeout=3))[0]
            assert again.data == m2.data and deliveries(again) == 2
            await again.ack_sync()
            info = await bus.js.stream_info(jobs.STREAM_JOBS)
            assert info.state.messages == 0  # work queue: acked jobs are gone
        finally:
            await other.close()
            await bus.close()

    asyncio.run(main())


def test_results_and_dead_letters(natsd: NatsServer) -> None:
    async def main() -> None:
        bus = await _bus(natsd.url)
        try:
            res = jobs.JobResult("j1", "check", True, stats={"ok": 1})
            waiter = asyncio.create_task(bus.wait_result("j1", timeout=5))
            await asyncio.sleep(0.1)
            await bus.publish_result(res)
            assert await waiter == res
            await bus.publish_result(res)  # reported twice: stored once
            info = await bus.js.stream_info(jobs.STREAM_EVENTS, subjects_filter="ferry.events.result.>")
            assert info.state.messages == 1
            # A result published before anyone waits is still found.
            assert await bus.wait_result("j1", timeout=1) == res
            with pytest.raises(BusError, match="no result for job j2"):
                await bus.wait_result("j2", timeout=0.3)
            # Dead letters keep the job and say why.
            await bus.nc.publish("ferry.jobs.store", b"{broken")
            sub = await bus.job_consumer("ferry.jobs.store")
            msg = (await sub.fetch(1, timeout=2))[0]
            await bus.dead_letter(msg, "malformed job: not JSON")
            await msg.term()
            dead = await bus.js.get_last_msg(jobs.STREAM_EVENTS, "ferry.dead.store")
            assert dead.data == b"{broken"
            assert dead.headers is not None and dead.headers[jobs.HDR_DEAD_REASON] == "malformed job: not JSON"
            assert dead.headers[jobs.HDR_DEAD_SUBJECT] == "ferry.jobs.store"
        finally:
            await bus.close()

    asyncio.run(main())


def test_connect_refused_is_one_line(tmp_path: Path) -> None:
    from control.natsd import free_port

    async def main() -> None:
        with pytest.raises(BusError, match="cannot connect") as e:
            await connect(BusOptions(url=f"nats://127.0.0.1:{free_port()}", connect_timeout=1, connect_attempts=2))
        assert "\n" not in str(e.value)

    asyncio.run(main())

"""The mover process: takes jobs from NATS for its capabilities and runs them through the pipeline.

Delivery rules (the job API is in ``mover.jobs``):
- one durable pull consumer per capability subject, shared by every mover, so movers split the jobs;
- explicit ack only after the result is published; ``in_progress()`` every ack_wait/3 while a job runs, so
  a live mover keeps its job and a killed one loses it after ack_wait (then another mover redoes it);
- malformed jobs and permanent errors: dead letter, failed result, ``term()``;
- retryable errors: ``nak(delay)`` with exponential backoff, up to ``max_deliver`` deliveries, then the same
  as a permanent error;
- idempotent: a job whose result was published, or whose backup is already in the store (labelled with
  the job id), is acknowledged (and its result re-published) without doing the work again.
NATS going away in the middle of a job does not stop the job: the client reconnects, heartbeats resume,
and publishing the result and the ack are retried until they go through.
A stop (SIGTERM) does not wait for anything slow: fetches are cancelled, running jobs get ``STOP_GRACE`` to
end and are then ``nak()``ed for another mover, their threads (daemon threads) left to die with the process.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import nats.errors
from nats.aio.msg import Msg

from mover import bus as _bus
from mover import jobs
from mover.errors import Cancelled, FerryError
from mover.progress import Progress
from mover.sources.base import Reader

log = logging.getLogger(__name__)

T = TypeVar("T")

# Backoff of retryable failures: 1 s, 2 s, 4 s ... capped. Short enough for a host that blips, long enough
# not to hammer one that is down; max_deliver bounds the total.
BACKOFF_BASE = 1.0
BACKOFF_MAX = 60.0
# How long one fetch waits for a job before it asks again (a stop does not wait for it: the fetch is cancelled).
FETCH_TIMEOUT = 2.0
# On a stop (SIGTERM), how long a running job gets to notice the cancel and end by itself (the pipeline polls
# every 0.1 s) before its message is nak'ed anyway and the mover exits without waiting for it: a reader
# blocked on a hung host would otherwise hold the exit for its whole I/O timeout (60 s).
STOP_GRACE = 1.0
# While stopping, how long NATS calls (result, ack) are retried: an unanswered job is redelivered and finds
# its result or its backup, so a mover asked to stop does not wait long for a NATS that is away.
STOP_NATS_WAIT = 2.0


@dataclass
class WorkerOptions:
    """What a mover takes and how it runs jobs."""

    capabilities: list[str] = field(default_factory=lambda: [jobs.CAP_IMAGEIO, jobs.CAP_STORE])
    proxy: str | None = None  # this mover's proxy VM id, for attach jobs
    slots: int = 1  # jobs run at once
    threads: int | None = None  # pipeline worker threads per job (None: the pipeline's default)
    ack_wait: float = _bus.ACK_WAIT
    max_deliver: int = _bus.MAX_DELIVER
    backoff_base: float = BACKOFF_BASE
    rate_limit: int = 0  # bytes/s read per export job (0: unlimited); spares a busy host or link
    progress_interval: float = 1.0
    store: str | None = None  # where this mover finds the store, overriding the job's (a different mount)
    name: str = field(default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}")

    def subjects(self) -> list[str]:
        out = []
        for cap in self.capabilities:
            out.append(jobs.job_subject(cap, self.proxy if cap == jobs.CAP_ATTACH else None))
        return out


# --- running one job (in a thread) -------------------------------------------------------------------------


def _open_store(job: jobs.Job, opts: WorkerOptions, create: bool = False) -> Any:
    from mover.store.repo import Store

    return Store.open(opts.store or jobs.store_path(getattr(job, "store", "")), create=create)


def _find_done(store: Any, job_id: str) -> Any:
    """The backup a previous run of this job saved, if any (the store is the truth for exports)."""
    for info in store.backups():
        if info.labels.get("job_id") == job_id:
            return info
    return None


def run_job(job: jobs.AnyJob, opts: WorkerOptions, progress: Progress, cancel: threading.Event) -> jobs.JobResult:
    """Do the work of one job; raise FerryError on failure. Runs in a worker thread."""
    if isinstance(job, jobs.ExportJob):
        return _export(job, opts, progress, cancel)
    if isinstance(job, jobs.RestoreJob):
        return _restore(job, opts, progress, cancel)
    if isinstance(job, jobs.CheckJob):
        with _open_store(job, opts) as store:
            report = store.check(read_data=job.read_data)
        return jobs.JobResult(job.job_id, job.KIND, True, stats=report)
    with _open_store(job, opts) as store:
        for backup_id in job.delete:
            with contextlib.suppress(FerryError):  # already deleted by an earlier run of this job
                store.delete_backup(backup_id)
        counts = store.prune()
    return jobs.JobResult(job.job_id, job.KIND, True, stats=dict(counts))


def _open_source(job: jobs.ExportJob) -> Any:
    if job.source["type"] == "imageio":
        from mover.sources.imageio import open_imageio

        return open_imageio(job.source)
    raise FerryError(f"source type {job.source['type']!r} is not supported by this mover")


def _open_sink(job: jobs.RestoreJob) -> Any:
    if job.sink["type"] == "imageio":
        from mover.sinks.imageio import ImageioSink

        return ImageioSink(job.sink)
    raise FerryError(f"sink type {job.sink['type']!r} is not supported by this mover")


def _export(job: jobs.ExportJob, opts: WorkerOptions, progress: Progress, cancel: threading.Event) -> jobs.JobResult:
    from mover import pipeline

    with _open_store(job, opts, create=True) as store:
        done = _find_done(store, job.job_id)
        if done is not None:
            log.info("Job already done job=%s backup=%s", job.job_id, done.id)
            return jobs.JobResult(job.job_id, job.KIND, True, store_backup_id=done.id, stats=done.stats)
        source = _open_source(job)
        if opts.rate_limit:
            source = RateLimited(source, opts.rate_limit, cancel)
        try:
            labels = dict(job.labels) | {"job_id": job.job_id, "backup_id": job.backup_id, "disk_id": job.disk_id}
            info = pipeline.backup(store, source, base=job.base, changed=job.changed, labels=labels,
                                   progress=progress, workers=opts.threads, cancel=cancel)  # fmt: skip
        finally:
            source.close()
        info = _first_run_wins(store, job.job_id, info)
    # Which URL served the data (transfer or proxy, ticket cut short): the control plane shows it.
    stats = dict(info.stats) | {"source": source.name}
    return jobs.JobResult(job.job_id, job.KIND, True, store_backup_id=info.id, stats=stats)


def _first_run_wins(store: Any, job_id: str, mine: Any) -> Any:
    """Keep one backup per job when two runs overlapped (a redelivery while the first mover was cut off).

    Every run keeps the oldest backup labelled with the job id and deletes its own if it is not that one,
    so all runs report the same backup; the blocks they share are deduplicated, the rest go at the next prune.
    """
    runs = [i for i in store.backups() if i.labels.get("job_id") == job_id]
    if not runs:
        return mine
    first = min(runs, key=lambda i: (i.created, i.id))
    if first.id != mine.id:
        log.warning("Job ran twice job=%s keeping=%s dropping=%s", job_id, first.id, mine.id)
        with contextlib.suppress(FerryError):
            store.delete_backup(mine.id)
    return first


def _restore(job: jobs.RestoreJob, opts: WorkerOptions, progress: Progress, cancel: threading.Event) -> jobs.JobResult:
    from mover.restore import restore

    with _open_store(job, opts) as store:
        store.backup(job.store_backup_id)  # NotFound before touching the target disk
        sink = _open_sink(job)
        try:
            stats = restore(store, job.store_backup_id, sink, workers=opts.threads, progress=progress, cancel=cancel)
            stats = dict(stats) | {k: v for k, v in getattr(sink, "stats", {}).items()}
        finally:
            sink.close()
    return jobs.JobResult(job.job_id, job.KIND, True, store_backup_id=job.store_backup_id, stats=stats)


class RateLimited:
    """A source whose readers together read at most ``rate`` bytes per second."""

    def __init__(self, source: Any, rate: int, cancel: threading.Event | None = None) -> None:
        self._source = source
        self._rate = rate
        self._cancel = cancel or threading.Event()
        self._lock = threading.Lock()
        self._next = time.monotonic()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._source, name)

    @property
    def name(self) -> str:
        return str(self._source.name)

    @property
    def size(self) -> int:
        return int(self._source.size)

    @property
    def max_readers(self) -> int:
        return int(self._source.max_readers)

    def extents(self, context: str = "zero") -> Any:
        return self._source.extents(context)

    def reader(self) -> Reader:
        return _LimitedReader(self, self._source.reader())

    def wait(self, n: int) -> None:
        with self._lock:
            now = time.monotonic()
            start = max(self._next, now)
            self._next = start + n / self._rate
        # Sleep on the cancel event: readers queued on the limiter must not delay a cancel.
        if start > now and self._cancel.wait(start - now):
            raise Cancelled("cancel requested")

    def close(self) -> None:
        self._source.close()


class _LimitedReader:
    def __init__(self, limiter: RateLimited, reader: Reader) -> None:
        self._limiter = limiter
        self._reader = reader

    def readinto(self, offset: int, buf: memoryview) -> int:
        n = self._reader.readinto(offset, buf)
        self._limiter.wait(n)
        return n

    def close(self) -> None:
        self._reader.close()


# --- the NATS side ---------------------------------------------------------------------------------------


class Worker:
    """A mover: ``await Worker(bus_options, options).run(stop)`` until ``stop`` is set."""

    def __init__(self, bus_options: _bus.BusOptions, options: WorkerOptions) -> None:
        self.bus_options = bus_options
        self.options = options
        self.bus: _bus.Bus | None = None
        self.cancel = threading.Event()
        self.stop = asyncio.Event()
        self.done = 0  # jobs finished (any outcome), for tests and logs
        self.abandoned = 0  # job threads still running when their job was handed back at a stop

    async def run(self, stop: asyncio.Event | None = None) -> None:
        if stop is not None:
            self.stop = stop
        self.bus = await _bus.connect(self.bus_options)
        try:
            await self.bus.ensure_streams()
            slots = []
            for subject in self.options.subjects():
                for n in range(self.options.slots):
                    sub = await self.bus.job_consumer(subject, self.options.ack_wait, self.options.max_deliver)
                    slots.append(asyncio.create_task(self._slot(sub, subject, n)))
            log.info("Mover ready name=%s subjects=%s slots=%d", self.options.name, self.options.subjects(),
                     self.options.slots)  # fmt: skip
            await self.stop.wait()
            log.info("Mover stopping name=%s", self.options.name)
            self.cancel.set()  # running jobs stop; their messages are nak'ed for another mover
            # Slots end within STOP_GRACE plus one nak: fetches are cancelled, jobs handed back (see _run).
            await asyncio.gather(*slots, return_exceptions=True)
        finally:
            await self.bus.close()

    async def _slot(self, sub: Any, subject: str, n: int) -> None:
        stopped: asyncio.Future[Any] = asyncio.ensure_future(self.stop.wait())
        try:
            while not self.stop.is_set():
                msgs = await self._fetch(sub, stopped, subject, n)
                for i, msg in enumerate(msgs):
                    if self.stop.is_set():
                        # Fetched as the stop came: hand back at once rather than start it and cancel it.
                        for m in msgs[i:]:
                            with contextlib.suppress(Exception):
                                await m.nak()
                        break
                    try:
                        await self.handle(msg)
                    except Exception:  # never let one job kill the slot; the job is redelivered after ack_wait
                        log.exception("Job handling failed subject=%s", subject)
        finally:
            stopped.cancel()

    async def _fetch(self, sub: Any, stopped: asyncio.Future[Any], subject: str, n: int) -> list[Msg]:
        """One job from the pull consumer, or none on a timeout, an error or a stop (which does not wait).

        A fetch cancelled by a stop leaves its pull request on the server until it expires; a job the server
        sends to it then goes unacknowledged and is redelivered after ack_wait, as for a mover that died.
        """
        fetch = asyncio.ensure_future(sub.fetch(1, timeout=FETCH_TIMEOUT))
        await asyncio.wait({fetch, stopped}, return_when=asyncio.FIRST_COMPLETED)
        if not fetch.done():
            fetch.cancel()
            with contextlib.suppress(BaseException):
                await fetch
            return []
        try:
            return list(fetch.result())
        except (nats.errors.TimeoutError, TimeoutError):
            return []
        except Exception as e:  # disconnected, consumer gone during a NATS restart: wait and retry
            log.debug("Fetch failed subject=%s slot=%d error=%r", subject, n, e)
            await asyncio.wait({stopped}, timeout=0.5)
            return []

    async def handle(self, msg: Msg) -> None:
        """Run one delivered job to its end: ack, nak or term (never leaves it unanswered)."""
        assert self.bus is not None
        n = _bus.deliveries(msg)
        try:
            job = jobs.parse_job(msg.data)
            want = jobs.job_subject(job.capability, self.options.proxy if job.capability == jobs.CAP_ATTACH else None)
            if want != msg.subject:
                raise jobs.MalformedMessage(f"a {job.KIND} job for {want} was published on {msg.subject}", what="job")
        except jobs.MalformedMessage as e:
            log.warning("Malformed job subject=%s error=%s", msg.subject, e)
            job_id = jobs.job_id_of(msg.data)
            await self._give_up(msg, job_id, "unknown", str(e))
            return
        log.info("Job start job=%s kind=%s delivery=%d mover=%s", job.job_id, job.KIND, n, self.options.name)
        if n > self.options.max_deliver:
            # Its earlier runs all ended without an answer (their movers died): stop trying.
            await self._give_up(msg, job.job_id, job.KIND, f"no run finished in {n - 1} deliveries")
            return
        earlier = await self._retry(lambda: self.bus.last_result(job.job_id), "read result")  # type: ignore[union-attr]
        if earlier is not None:
            log.info("Job already reported job=%s ok=%s", job.job_id, earlier.ok)
            await self._retry(lambda: msg.ack_sync(timeout=5), "ack", limit=self.options.ack_wait * 2)
            self.done += 1
            return
        try:
            result = await self._run(msg, job)
        except Cancelled as e:
            log.info("Job cancelled job=%s: %s", job.job_id, e)
            with contextlib.suppress(Exception):
                await msg.nak()
            return
        except FerryError as e:
            await self._failed(msg, job, str(e), e.retryable)
            return
        except Exception as e:  # a bug or an unexpected OS error: retry a bounded number of times
            log.exception("Job crashed job=%s", job.job_id)
            await self._failed(msg, job, f"{type(e).__name__}: {e}", True)
            return
        result.mover = self.options.name
        result.attempt = n
        await self._retry(lambda: self.bus.publish_result(result), "publish result")  # type: ignore[union-attr]
        await self._retry(lambda: msg.ack_sync(timeout=5), "ack", limit=self.options.ack_wait * 2)
        self.done += 1
        log.info("Job done job=%s kind=%s backup=%s", job.job_id, job.KIND, result.store_backup_id)

    async def _run(self, msg: Msg, job: jobs.AnyJob) -> jobs.JobResult:
        loop = asyncio.get_running_loop()
        last = [0.0]

        def on_progress(snap: dict[str, Any]) -> None:
            # Called from pipeline threads; publish from the loop, at most once per interval.
            now = time.monotonic()
            if now - last[0] < self.options.progress_interval and snap.get("done", 0) < snap.get("total", 0):
                return
            last[0] = now
            p = jobs.JobProgress(job.job_id, int(snap.get("done", 0)), int(snap.get("total", 0)),
                                 int(snap.get("stored", 0)), float(snap.get("rate", 0)))  # fmt: skip
            loop.call_soon_threadsafe(lambda: asyncio.ensure_future(self._progress(p)))

        progress = Progress(listener=on_progress, interval=min(0.5, self.options.progress_interval))
        beat = asyncio.create_task(self._heartbeat(msg))
        try:
            return await self._in_thread(job, progress)
        finally:
            beat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await beat

    async def _in_thread(self, job: jobs.AnyJob, progress: Progress) -> jobs.JobResult:
        """Run the job in a daemon thread; on a stop, wait STOP_GRACE for it, then raise ``Cancelled``.

        Not ``asyncio.to_thread``: the default executor's threads are joined when the loop and the
        interpreter shut down, so a job stuck in a blocking read would hold the exit. A thread left behind
        here dies with the process; what it wrote is unpublished, as after a kill (the store's rule).
        """
        loop = asyncio.get_running_loop()
        done: asyncio.Future[jobs.JobResult] = loop.create_future()

        def settle(result: jobs.JobResult | None, error: BaseException | None) -> None:
            if done.done():
                return
            if error is not None:
                done.set_exception(error)
            else:
                done.set_result(result)  # type: ignore[arg-type]

        def work() -> None:
            result: jobs.JobResult | None = None
            error: BaseException | None = None
            try:
                result = run_job(job, self.options, progress, self.cancel)
            except BaseException as e:
                error = e
            with contextlib.suppress(RuntimeError):  # the loop is closed: the job was handed back already
                loop.call_soon_threadsafe(settle, result, error)

        threading.Thread(target=work, name=f"job-{job.job_id}", daemon=True).start()
        stopped: asyncio.Future[Any] = asyncio.ensure_future(self.stop.wait())
        either: set[asyncio.Future[Any]] = {done, stopped}
        try:
            await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
            if not done.done():
                await asyncio.wait({done}, timeout=STOP_GRACE)
            if not done.done():
                self.abandoned += 1
                done.cancel()  # its late result, if any, is dropped by settle
                raise Cancelled(f"mover stopping, job still running after {STOP_GRACE:.0f}s")
            return done.result()
        finally:
            stopped.cancel()

    async def _progress(self, p: jobs.JobProgress) -> None:
        with contextlib.suppress(Exception):
            await self.bus.publish_progress(p)  # type: ignore[union-attr]

    async def _heartbeat(self, msg: Msg) -> None:
        period = max(0.2, self.options.ack_wait / 3)
        while True:
            await asyncio.sleep(period)
            try:
                await msg.in_progress()
            except Exception as e:  # disconnected: the next beat after the reconnect counts
                log.debug("Heartbeat failed error=%r", e)

    async def _failed(self, msg: Msg, job: jobs.AnyJob, error: str, retryable: bool) -> None:
        n = _bus.deliveries(msg)
        if retryable and n < self.options.max_deliver:
            delay = min(BACKOFF_MAX, self.options.backoff_base * 2 ** (n - 1))
            log.warning("Job failed, will retry job=%s delivery=%d delay=%.1f error=%s", job.job_id, n, delay, error)
            await self._retry(lambda: msg.nak(delay=delay), "nak", limit=self.options.ack_wait)
            return
        reason = error if not retryable else f"{error} (gave up after {n} deliveries)"
        await self._give_up(msg, job.job_id, job.KIND, reason, retryable)

    async def _give_up(self, msg: Msg, job_id: str | None, kind: str, reason: str, retryable: bool = False) -> None:
        """Dead-letter the message, publish a failed result, and term() it."""
        assert self.bus is not None
        log.error("Job given up job=%s subject=%s error=%s", job_id, msg.subject, reason)
        await self._retry(lambda: self.bus.dead_letter(msg, reason, job_id), "dead letter")  # type: ignore[union-attr]
        if job_id:
            res = jobs.JobResult(job_id, kind, False, error=reason, retryable=retryable, mover=self.options.name,
                                 attempt=_bus.deliveries(msg))  # fmt: skip
            await self._retry(lambda: self.bus.publish_result(res), "publish result")  # type: ignore[union-attr]
        await self._retry(msg.term, "term", limit=self.options.ack_wait)
        self.done += 1

    async def _retry(self, fn: Callable[[], Awaitable[T]], what: str, limit: float | None = None) -> T | None:
        """Run ``fn`` until it succeeds: NATS may be restarting; the client reconnects underneath.

        ``limit``: give up (return None) after that many seconds; an ack that cannot land in time is moot,
        because the job is redelivered and the next run finds its result.
        """
        delay = 0.2
        deadline = None if limit is None else time.monotonic() + limit
        while True:
            try:
                return await fn()
            except Exception as e:
                if isinstance(e, FerryError) and not e.retryable:
                    raise
                if self.stop.is_set() and deadline is None:
                    # Shutting down: wait a little for NATS, not forever (an unanswered job is redelivered).
                    deadline = time.monotonic() + STOP_NATS_WAIT
                if deadline is not None and time.monotonic() + delay > deadline:
                    log.warning("NATS %s failed, giving up: %r", what, e)
                    return None
                log.warning("NATS %s failed, retrying in %.1fs: %r", what, delay, e)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

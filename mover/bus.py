"""NATS JetStream for Ferry: connect, ensure the streams, publish jobs and events, consume jobs.

The only module of the mover side that imports ``nats``. The control plane uses it too (it may import
``mover``), so the stream settings live in one place. Everything is asyncio; the worker runs data work in
threads and keeps the event loop for NATS.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from dataclasses import dataclass
from typing import Any

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext, api

from mover import jobs
from mover.errors import FerryError

log = logging.getLogger(__name__)

# JetStream drops a re-published job with the same Nats-Msg-Id within this window. Two minutes is the
# server default; a control plane that crashes and re-publishes its jobs on restart does so within it.
DUPLICATE_WINDOW = 120.0
# Events are an audit trail and a result mailbox: a week covers any backup window and a long weekend.
EVENTS_MAX_AGE = 7 * 24 * 3600.0
# A job not acknowledged (nor heartbeat with in_progress) within this is given to another mover. The worker
# heartbeats every ack_wait/3, so this only bounds how long a killed mover holds a job.
ACK_WAIT = 30.0
# Deliveries of one job before it goes to the dead-letter subject (crashes and retryable errors count).
MAX_DELIVER = 5


class BusError(FerryError):
    msg = "NATS {self.url}: {self.reason}"
    exit_code = 7
    retryable = True
    url = ""


@dataclass
class BusOptions:
    """How to reach NATS. ``url`` may list several servers separated by commas."""

    url: str = "nats://127.0.0.1:4222"
    user: str | None = None
    password: str | None = None
    token: str | None = None
    creds_file: str | None = None  # a NATS .creds file (JWT + nkey seed)
    tls_ca: str | None = None  # CA file to verify the server; enables TLS
    tls_cert: str | None = None  # client certificate (mutual TLS)
    tls_key: str | None = None
    name: str = "ferry"
    connect_timeout: float = 5.0
    reconnect_wait: float = 0.5
    max_reconnect: int = -1  # once connected, keep trying: a NATS restart must not kill a mover mid-job
    connect_attempts: int = 10  # at start: a mover started just before its NATS server waits for it a while

    @property
    def servers(self) -> list[str]:
        return [u.strip() for u in self.url.split(",") if u.strip()]

    def tls_context(self) -> ssl.SSLContext | None:
        if not (self.tls_ca or self.tls_cert or any(u.startswith("tls://") for u in self.servers)):
            return None
        ctx = ssl.create_default_context(cafile=self.tls_ca)
        if self.tls_cert:
            ctx.load_cert_chain(self.tls_cert, self.tls_key)
        return ctx


class Bus:
    """A NATS connection with its JetStream context and Ferry's helpers."""

    def __init__(self, nc: Client, options: BusOptions) -> None:
        self.nc = nc
        self.js: JetStreamContext = nc.jetstream(timeout=10.0)
        self.options = options

    @property
    def url(self) -> str:
        return ",".join(self.options.servers)

    # --- streams and consumers --------------------------------------------------------------------------

    async def ensure_streams(self) -> None:
        """Create FERRY_JOBS (work queue) and FERRY_EVENTS (limits) if missing; leave existing ones alone."""
        await self._ensure_stream(
            api.StreamConfig(
                name=jobs.STREAM_JOBS,
                subjects=jobs.JOBS_SUBJECTS,
                retention=api.RetentionPolicy.WORK_QUEUE,
                storage=api.StorageType.FILE,
                duplicate_window=DUPLICATE_WINDOW,
            )
        )
        await self._ensure_stream(
            api.StreamConfig(
                name=jobs.STREAM_EVENTS,
                subjects=jobs.EVENTS_SUBJECTS,
                retention=api.RetentionPolicy.LIMITS,
                storage=api.StorageType.FILE,
                max_age=EVENTS_MAX_AGE,
                duplicate_window=DUPLICATE_WINDOW,
            )
        )

    async def _ensure_stream(self, config: api.StreamConfig) -> None:
        try:
            await self.js.stream_info(config.name or "")
            return
        except nats.js.errors.NotFoundError:
            pass
        try:
            await self.js.add_stream(config)
            log.info("Created stream name=%s subjects=%s", config.name, config.subjects)
        except nats.js.errors.BadRequestError as e:
            # Another process created it between our look and our add: fine if it exists now.
            try:
                await self.js.stream_info(config.name or "")
            except nats.js.errors.NotFoundError:
                raise BusError(f"cannot create stream {config.name}: {e.description}", url=self.url) from None

    async def job_consumer(
        self, subject: str, ack_wait: float = ACK_WAIT, max_deliver: int = MAX_DELIVER
    ) -> JetStreamContext.PullSubscription:
        """Bind to (creating if needed) the durable pull consumer shared by every mover of ``subject``.

        The server redelivers up to ``max_deliver + 1`` times: the worker dead-letters a job itself when
        it fails on its ``max_deliver``-th delivery, and the extra delivery catches a job whose last run died
        with its mover (it is dead-lettered at once instead of staying in the stream forever).
        """
        config = api.ConsumerConfig(
            durable_name=jobs.consumer_name(subject),
            ack_policy=api.AckPolicy.EXPLICIT,
            ack_wait=ack_wait,
            max_deliver=max_deliver + 1,
            filter_subject=subject,
            max_ack_pending=-1,
        )
        return await self.js.pull_subscribe(
            subject, durable=jobs.consumer_name(subject), stream=jobs.STREAM_JOBS, config=config
        )

    # --- publishing -----------------------------------------------------------------------------------------

    async def publish_job(self, job: jobs.Job, subject: str | None = None) -> bool:
        """Publish a job with ``Nats-Msg-Id: job_id``; return False when the server dropped it as a duplicate."""
        subject = subject or jobs.job_subject(getattr(job, "capability", jobs.CAP_STORE))
        ack = await self.js.publish(subject, job.to_json(), headers={jobs.HDR_MSG_ID: job.job_id})
        return not ack.duplicate

    async def publish_event(self, subject: str, data: bytes, msg_id: str | None = None) -> None:
        """Publish to FERRY_EVENTS and wait for the stream's ack (results, dead letters, flow events)."""
        headers = {jobs.HDR_MSG_ID: msg_id} if msg_id else None
        await self.js.publish(subject, data, headers=headers)

    async def publish_result(self, result: jobs.JobResult) -> None:
        # The Msg-Id makes a result reported twice (a redelivered job that finds its work done) land once
        # within the duplicate window.
        await self.publish_event(
            jobs.result_subject(result.job_id), result.to_json(), msg_id=f"result-{result.job_id}"
        )

    async def publish_progress(self, progress: jobs.JobProgress) -> None:
        """Fire and forget: progress is advisory, so no stream ack is awaited."""
        await self.nc.publish(jobs.progress_subject(progress.job_id), progress.to_json())

    async def dead_letter(self, msg: Msg, reason: str, job_id: str | None = None) -> None:
        """Copy a job to its dead-letter subject with the reason in headers."""
        headers = {
            jobs.HDR_DEAD_REASON: reason[:500].replace("\n", " "),
            jobs.HDR_DEAD_SUBJECT: msg.subject,
            jobs.HDR_DELIVERIES: str(_deliveries(msg)),
        }
        if job_id:
            headers[jobs.HDR_MSG_ID] = f"dead-{job_id}"
        await self.js.publish(jobs.dead_subject(msg.subject), msg.data, headers=headers)

    # --- reading results ------------------------------------------------------------------------------------

    async def last_result(self, job_id: str) -> jobs.JobResult | None:
        """The result already published for ``job_id``, if any."""
        try:
            raw = await self.js.get_last_msg(jobs.STREAM_EVENTS, jobs.result_subject(job_id))
        except nats.js.errors.NotFoundError:
            return None
        try:
            return jobs.JobResult.from_json(raw.data or b"")
        except jobs.MalformedMessage as e:
            # Not a result we can trust: as if there were none, so the job runs (and reports) again.
            log.warning("Ignoring malformed result job=%s error=%s", job_id, e)
            return None

    async def wait_result(self, job_id: str, timeout: float | None = None) -> jobs.JobResult:
        """Wait for the result of ``job_id`` (also finds one published before the call)."""
        got: asyncio.Future[jobs.JobResult] = asyncio.get_running_loop().create_future()

        async def on_msg(msg: Msg) -> None:
            if not got.done():
                try:
                    got.set_result(jobs.JobResult.from_json(msg.data))
                except jobs.MalformedMessage as e:
                    got.set_exception(e)

        sub = await self.nc.subscribe(jobs.result_subject(job_id), cb=on_msg)
        try:
            earlier = await self.last_result(job_id)
            if earlier is not None:
                return earlier
            return await asyncio.wait_for(got, timeout)
        except TimeoutError:
            raise BusError(f"no result for job {job_id} after {timeout}s", url=self.url) from None
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    async def close(self) -> None:
        """Flush what was published, then close (no drain: pull subscriptions can hold a drain for its
        whole timeout, and every message we handle is answered before we get here)."""
        with contextlib.suppress(Exception):
            await self.nc.flush(timeout=2)
        with contextlib.suppress(Exception):
            await self.nc.close()


def _deliveries(msg: Msg) -> int:
    try:
        return int(msg.metadata.num_delivered)
    except Exception:  # a core NATS message (no JetStream metadata): delivered once
        return 1


def deliveries(msg: Msg) -> int:
    """How many times JetStream has delivered ``msg`` (1 on the first delivery)."""
    return _deliveries(msg)


async def connect(options: BusOptions, **callbacks: Any) -> Bus:
    """Connect to NATS (reconnecting forever by default); ``BusError`` with one line when it cannot."""

    errors: list[Exception] = []

    async def on_error(e: Exception) -> None:
        errors.append(e)
        log.warning("NATS error url=%s error=%s", options.url, e)

    async def on_disconnect() -> None:
        log.warning("NATS disconnected url=%s", options.url)

    async def on_reconnect() -> None:
        log.info("NATS reconnected url=%s", options.url)

    kw: dict[str, Any] = {
        "servers": options.servers,
        "name": options.name,
        "connect_timeout": options.connect_timeout,
        "reconnect_time_wait": options.reconnect_wait,
        # Bounded for the first connection (nats-py otherwise retries it forever), unbounded afterwards.
        "max_reconnect_attempts": max(1, options.connect_attempts),
        "error_cb": callbacks.get("error_cb", on_error),
        "disconnected_cb": callbacks.get("disconnected_cb", on_disconnect),
        "reconnected_cb": callbacks.get("reconnected_cb", on_reconnect),
        "user": options.user,
        "password": options.password,
        "token": options.token,
        "tls": options.tls_context(),
        # Ping more often than the default 2 minutes, so a dead server is noticed within seconds.
        "ping_interval": 5,
        "max_outstanding_pings": 3,
    }
    if options.creds_file:
        kw["user_credentials"] = options.creds_file
    try:
        nc = await nats.connect(allow_reconnect=True, **kw)
    except (OSError, nats.errors.Error, TimeoutError) as e:
        # "no servers available" says little: the last error seen while trying says why (refused, auth, TLS).
        # Prefer what the server said (authorization, TLS) over the socket error that followed it.
        said = [x for x in errors if isinstance(x, nats.errors.Error) and not isinstance(x, nats.errors.NoServersError)]
        cause = (said or errors or [e])[-1]
        raise BusError(f"cannot connect: {cause or type(cause).__name__}", url=options.url) from None
    nc.options["max_reconnect_attempts"] = options.max_reconnect
    return Bus(nc, options)

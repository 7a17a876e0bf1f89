"""The client side of the control plane's triggers: what ``ferry backup`` and ``ferry restore`` use.

Kept apart from ``control.service`` so that the CLI, a NATS trigger client, does not import the engine SDK
(ovirtsdk4, pycurl), the flows or the catalog's writers to send one request and follow events: importing
``control.service`` costs ~0.3 s of start-up, this module only ``mover.bus`` (nats) and ``mover.jobs``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable
from typing import Any

from control.config import Config
from control.errors import FerryError, UsageError
from mover import bus as mbus
from mover import jobs

log = logging.getLogger(__name__)

# Seconds between two looks at the events stream while following a flow (covers an event missed during a
# NATS reconnect); live events end the wait at once.
WATCH_POLL = 2.0


def bus_options(cfg: Config, url: str, name: str) -> mbus.BusOptions:
    """The NATS connection options of ``cfg`` (credentials, TLS) for ``url``, under client name ``name``."""
    o = cfg.nats.options()
    return mbus.BusOptions(url=url, name=name, user=o.get("user"), password=o.get("password"),
                           token=o.get("token"), creds_file=o.get("creds"), tls_ca=o.get("tls_ca"),
                           tls_cert=o.get("tls_cert"), tls_key=o.get("tls_key"))


async def client_bus(cfg: Config, url: str) -> mbus.Bus:
    """A NATS connection for a CLI command: quiet about its own disconnect at exit."""

    async def quiet() -> None:
        log.debug("NATS disconnected (client)")

    return await mbus.connect(bus_options(cfg, url, "ferry-cli"), disconnected_cb=quiet)


async def request(bus: mbus.Bus, subject: str, data: dict[str, Any], timeout: float = 30.0) -> dict[str, Any]:
    """Request-reply on a trigger; one clear error when no control plane answers."""
    try:
        msg = await bus.nc.request(subject, json.dumps(data).encode(), timeout=timeout)
    except Exception as e:
        if "no responders" in str(e).lower() or type(e).__name__ in ("NoRespondersError", "TimeoutError"):
            raise UsageError(f"no control plane answered on {subject} (is `ferry up` or `ferry control` "
                             "running?)") from None
        raise
    reply = json.loads(msg.data)
    if not isinstance(reply, dict):
        raise UsageError(f"bad reply on {subject}: {msg.data[:80]!r}")
    if reply.get("error"):
        raise RemoteError(str(reply["error"]), exit_code=int(reply.get("exit_code") or 1))
    return reply


class RemoteError(FerryError):
    """An error the control plane answered with (already one line, with its exit code)."""


async def watch(bus: mbus.Bus, subject: str, on_event: Callable[[dict[str, Any]], None],
                until: tuple[str, ...] = ("succeeded", "failed"), timeout: float | None = None) -> dict[str, Any]:
    """Follow the events of one flow until its state is in ``until``; return the last event."""
    last: dict[str, Any] = {}
    changed = asyncio.Event()

    async def cb(msg: Any) -> None:
        nonlocal last
        try:
            ev = json.loads(msg.data)
        except ValueError:
            return
        if ev.get("time", 0) >= last.get("time", 0):
            last = ev
            on_event(ev)
            changed.set()

    sub = await bus.nc.subscribe(subject, cb=cb)
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        while last.get("state") not in until:
            if deadline is not None and time.monotonic() > deadline:
                raise UsageError(f"gave up waiting on {subject} after {timeout:.0f}s (state {last.get('state')})")
            try:
                m = await bus.js.get_last_msg(jobs.STREAM_EVENTS, subject)
                await cb(m)
            except Exception:
                pass  # not published yet, or NATS restarting
            changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), timeout=WATCH_POLL)
        return last
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()

"""The embedded nats-server: starts with JetStream, keeps its data and port across a restart, stops clean."""

from __future__ import annotations

import asyncio
from pathlib import Path

import nats
import pytest

from control.natsd import NatsServer, NatsServerError


async def _publish_and_count(url: str, publish: bool) -> int:
    nc = await nats.connect(url, connect_timeout=2, allow_reconnect=False)
    try:
        js = nc.jetstream()
        await js.add_stream(name="T", subjects=["t.>"])
        if publish:
            await js.publish("t.x", b"hello")
        info = await js.stream_info("T")
        return int(info.state.messages)
    finally:
        await nc.close()


def test_start_restart_stop(tmp_path: Path) -> None:
    srv = NatsServer(tmp_path / "nats")
    srv.start()
    try:
        assert srv.healthy()
        pid = srv.proc.pid if srv.proc else 0
        assert asyncio.run(_publish_and_count(srv.url, True)) == 1
        url = srv.url
        srv.restart()
        assert srv.url == url
        assert srv.proc is not None and srv.proc.pid != pid
        # JetStream data lives in the data directory: the message survived the restart.
        assert asyncio.run(_publish_and_count(srv.url, False)) == 1
    finally:
        srv.stop()
    assert not srv.running()
    assert not srv.healthy()
    assert (tmp_path / "nats" / "jetstream").is_dir()


def test_port_in_use_is_clear_error(tmp_path: Path) -> None:
    with NatsServer(tmp_path / "a") as first:
        second = NatsServer(tmp_path / "b", port=first.port)
        with pytest.raises(NatsServerError, match="nats-server"):
            second.start()
        assert not second.running()

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


def test_auth_and_tls(tmp_path: Path) -> None:
    from lab.pki import CA
    from mover.bus import BusError, BusOptions, connect

    ca = CA.create(tmp_path / "ca")
    cert, key = ca.issue("nats", tmp_path / "tls")
    with NatsServer(tmp_path / "n", user="ferry", password="s3cret", tls_cert=str(cert), tls_key=str(key)) as srv:
        assert srv.url.startswith("tls://")

        async def main() -> None:
            ok = BusOptions(url=srv.url, user="ferry", password="s3cret", tls_ca=str(ca.cert_path))
            bus = await connect(ok)
            await bus.ensure_streams()
            await bus.close()
            with pytest.raises(BusError, match="cannot connect") as e:
                await connect(BusOptions(url=srv.url, user="ferry", password="wrong", tls_ca=str(ca.cert_path),
                                         connect_attempts=1))  # fmt: skip
            assert "Authorization" in str(e.value) and "\n" not in str(e.value) and "wrong" not in str(e.value)

        asyncio.run(main())

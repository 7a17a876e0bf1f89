"""Restore into a disk through ovirt-imageio: PUT data ranges, PATCH zero, PATCH flush.

Zeros are never sent: zero blocks, and 64 KiB zero pieces inside data blocks, become ``PATCH {"op":"zero"}``
ranges, merged and sent in few requests at ``flush()`` (a new disk on block storage may hold old data, so
zeros must be written, but only as ranges). Writes use a pool of connections, as many as the server's
``max_writers``; each PUT asks ``flush=n`` and one ``PATCH {"op":"flush"}`` at the end makes everything
durable, as ovirt-imageio's own client does.
"""

from __future__ import annotations

import http.client
import json
import logging
import queue
import threading
from collections.abc import Callable
from typing import Any

from mover.errors import SinkError
from mover.sources.imageio import MAX_CONNECTIONS, TIMEOUT, open_endpoint, redact

log = logging.getLogger(__name__)

# Zero pieces smaller than this inside a data block are sent as data: 64 KiB is the qcow2 cluster size, so
# a smaller PATCH saves no space on the target, only bytes on the wire.
ZERO_GRANULE = 64 * 1024
_ZEROS = bytes(ZERO_GRANULE)
# One PATCH zero may cover this much: qemu-nbd zeroes large ranges fast, but imageio splits requests at
# 2 GiB and a hung request should not hold a whole disk.
MAX_ZERO = 1 << 30


def _sink_error(err: Exception) -> SinkError:
    """Re-type the shared HTTP helpers' SourceError as a SinkError (same message, same retryability)."""
    if isinstance(err, SinkError):
        return err
    out = SinkError(getattr(err, "reason", str(err)), path=getattr(err, "path", ""))
    out.retryable = bool(getattr(err, "retryable", False))
    return out


class ImageioSink:
    """A disk behind an imageio ticket opened for writing (``ops: ["write"]``)."""

    def __init__(self, spec: dict[str, Any], max_connections: int = MAX_CONNECTIONS, timeout: float = TIMEOUT):
        if spec.get("format", "raw") != "raw":
            raise SinkError("the mover writes raw transfers only (format=raw)", path=redact(spec["transfer_url"]))
        urls = [spec["transfer_url"]] + ([spec["proxy_url"]] if spec.get("proxy_url") else [])
        try:
            self._ep, con, opts = open_endpoint(urls, spec.get("ca_pem"), timeout)
        except Exception as e:
            raise _sink_error(e) from None
        self._size = int(spec["size"])
        self._can_zero = bool(opts.get("zero"))
        self._can_flush = bool(opts.get("flush"))
        self._max_writers = max(1, min(int(opts.get("max_writers", 1)), max_connections))
        self._pool: queue.LifoQueue[http.client.HTTPConnection] = queue.LifoQueue()
        self._pool.put(con)
        self._lock = threading.Lock()
        self._zeros: list[tuple[int, int]] = []
        self.stats = {"put_bytes": 0, "put_requests": 0, "zero_bytes": 0, "zero_requests": 0}
        log.info("Open imageio sink url=%s size=%d max_writers=%d", self._ep.name, self._size, self._max_writers)

    @property
    def name(self) -> str:
        return self._ep.name

    @property
    def max_writers(self) -> int:
        return self._max_writers

    def truncate(self, size: int) -> None:
        """Disks are created by the engine at their size: check it fits."""
        if size > self._size:
            raise SinkError(f"backup is {size} bytes, the disk only {self._size}", path=self.name)

    def write(self, offset: int, data: bytes | memoryview) -> None:
        """PUT the non-zero parts of ``data`` at ``offset``; zero pieces become zero ranges."""
        view = memoryview(data).cast("B")
        n = len(view)
        if offset + n > self._size:
            raise SinkError(f"write of {n} bytes at {offset} beyond the disk's {self._size}", path=self.name)
        pos = 0
        while pos < n:
            start = pos
            while start < n and _is_zero(view[start : start + ZERO_GRANULE]):
                start += ZERO_GRANULE
            start = min(start, n)
            if start > pos:
                self.zero(offset + pos, start - pos)
            end = start
            while end < n and not _is_zero(view[end : end + ZERO_GRANULE]):
                end += ZERO_GRANULE
            end = min(end, n)
            if end > start:
                self._put(offset + start, view[start:end])
            pos = end

    def zero(self, offset: int, length: int) -> None:
        """Remember a zero range; ranges are merged and sent as PATCH zero by ``flush()``."""
        if length <= 0:
            return
        with self._lock:
            self._zeros.append((offset, length))

    def flush(self) -> None:
        """Send the pending zero ranges, then PATCH flush."""
        with self._lock:
            ranges, self._zeros = _merge(self._zeros), []
        for start, length in ranges:
            done = 0
            while done < length:
                step = min(MAX_ZERO, length - done)
                self._zero_now(start + done, step)
                done += step
        if self._can_flush:
            self._patch({"op": "flush"})

    def close(self) -> None:
        while True:
            try:
                self._pool.get_nowait().close()
            except queue.Empty:
                break

    # --- requests ------------------------------------------------------------------------------------------

    def _zero_now(self, offset: int, length: int) -> None:
        if self._can_zero:
            self._patch({"op": "zero", "offset": offset, "size": length, "flush": False})
            self.stats["zero_requests"] += 1
            self.stats["zero_bytes"] += length
            return
        # An old server without PATCH zero: the only way left is sending zeros (rare; imageio >= 1.5 has it).
        buf = memoryview(bytes(min(length, 8 << 20)))
        done = 0
        while done < length:
            step = min(len(buf), length - done)
            self._put(offset + done, buf[:step])
            done += step

    def _get_con(self) -> http.client.HTTPConnection:
        try:
            return self._pool.get_nowait()
        except queue.Empty:
            pass
        try:
            return self._ep.connect()
        except OSError as e:
            raise SinkError(f"connect: {e.strerror or e}", path=self.name, retryable=True) from None

    def _put(self, offset: int, view: memoryview) -> None:
        length = len(view)

        def send(con: http.client.HTTPConnection) -> None:
            con.putrequest("PUT", self._ep.path + ("?flush=n" if self._can_flush else ""))
            con.putheader("Content-Length", str(length))
            con.putheader("Content-Type", "application/octet-stream")
            con.putheader("Content-Range", f"bytes {offset}-{offset + length - 1}/*")
            con.endheaders()
            try:
                con.send(view)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the server closed early; its answer says why

        self._request(f"PUT at offset {offset}", send)
        with self._lock:
            self.stats["put_requests"] += 1
            self.stats["put_bytes"] += length

    def _patch(self, msg: dict[str, Any]) -> None:
        self._request(f"PATCH {msg['op']}", lambda con: con.request(
            "PATCH", self._ep.path, body=json.dumps(msg).encode(), headers={"Content-Type": "application/json"}))

    def _request(self, what: str, send: Callable[[http.client.HTTPConnection], None]) -> None:
        """``send`` one request on a pooled connection and check its answer is 200.

        A connection that failed in any way is closed, not pooled: its state is unknown. Connection errors
        are retryable, HTTP errors when the server answered 5xx."""
        con = self._get_con()
        try:
            send(con)
            res = con.getresponse()
            body = res.read()
            if res.status != http.client.OK:
                raise self._http_error(what, res.status, body)
        except (OSError, http.client.HTTPException) as e:
            con.close()
            raise SinkError(f"{what}: {e}", path=self.name, retryable=True) from None
        except BaseException:
            con.close()
            raise
        self._pool.put(con)

    def _http_error(self, what: str, status: int, body: bytes) -> SinkError:
        text = body[:300].decode("utf-8", errors="replace").strip().replace("\n", " ")
        return SinkError(f"{what}: HTTP {status} {text}", path=self.name, retryable=status >= 500, status=status)


def _is_zero(view: memoryview) -> bool:
    return view == _ZEROS[: len(view)]


def _merge(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sort and join touching or overlapping ranges."""
    out: list[tuple[int, int]] = []
    for start, length in sorted(ranges):
        if out and start <= out[-1][0] + out[-1][1]:
            prev_start, prev_len = out[-1]
            out[-1] = (prev_start, max(prev_len, start + length - prev_start))
        else:
            out.append((start, length))
    return out


def open_imageio(spec: dict[str, Any], **options: Any) -> ImageioSink:
    """Open an imageio sink from a restore job's sink description."""
    return ImageioSink(spec, **options)

"""What the engine drives on the lab's "hypervisors": storage domains, imageio daemons, the proxy VM.

The lab process (lab/daemon.py) builds one :class:`Backend` from the infrastructure modules (lab/storage.py,
lab/imageio.py, lab/sshd.py, lab/proxyvm.py) and hands it to the engine. It outlives an engine restart, as
hosts and their daemons outlive a real engine's restart.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger("lab.engine.backend")


@dataclass
class HostRuntime:
    """One hypervisor: its imageio daemon and sshd."""

    id: str
    name: str
    imageio: Any  # lab.imageio.ImageioDaemon
    sshd: Any  # lab.sshd.Sshd
    reachable: bool = True


@dataclass
class Backend:
    """The lab's live resources, keyed by the engine's ids."""

    dir: Path
    domains: dict[str, Any] = field(default_factory=dict)  # sd id -> lab.storage.Domain
    hosts: dict[str, HostRuntime] = field(default_factory=dict)
    proxy: Any = None  # lab.imageio.ImageioDaemon in the engine-proxy role
    proxyvm: Any = None  # lab.proxyvm.ProxyVM
    exports: dict[str, Any] = field(default_factory=dict)  # key -> lab.imageio.NbdExport
    rhev_root: Path | None = None  # stands for /rhev/data-center on the hosts
    lock: threading.RLock = field(default_factory=threading.RLock)

    def export(self, key: str, image: Path, fmt: str, read_only: bool, bitmap: str | None = None,
               backing: bool = True) -> str:
        """Start qemu-nbd for ``image`` under ``key``; returns its nbd: URL."""
        from lab.imageio import NbdExport

        with self.lock:
            self.unexport(key)
            exp = NbdExport(image, fmt, read_only=read_only, bitmap=bitmap, backing=backing)
            self.exports[key] = exp
            return str(exp.url)

    def unexport(self, key: str) -> None:
        with self.lock:
            exp = self.exports.pop(key, None)
        if exp is not None:
            try:
                exp.stop()
            except Exception as e:
                log.warning("Stopping export failed key=%s error=%s", key[:8], e)

    def close(self) -> None:
        for key in list(self.exports):
            self.unexport(key)

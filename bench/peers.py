"""The tools compared: Ferry's ``image`` CLI and its peers borg, restic and ``qemu-img convert -c``.

Each tool keeps its repository under its own directory, backs up one image file (``backup`` returns a
measured command and remembers the backup's name), restores a named backup to a file, and reports what its
repository occupies on disk. Every command runs under ``measure.run`` (wall time, peak RSS).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from bench.measure import BenchError, Measured, du, run

RESTIC_PASSWORD = "ferry-bench"  # a throwaway repository; restic insists on a password


class Tool:
    """A backup tool under test. Subclasses implement ``_init``, ``_backup`` and ``_restore``."""

    name = "tool"
    incremental = False  # True when the tool can read only the changed ranges (Ferry with --changed)

    def __init__(self, workdir: Path) -> None:
        self.dir = workdir / self.name
        self.repo = self.dir / "repo"
        self.logs = self.dir / "logs"
        self.backups: list[str] = []

    def setup(self) -> None:
        """Start from an empty repository."""
        shutil.rmtree(self.dir, ignore_errors=True)
        self.dir.mkdir(parents=True)
        self._init()

    def backup(self, image: Path, base: str | None = None, changed: Path | None = None) -> Measured:
        """Back up ``image``; ``base``/``changed`` only for tools that use them. Records the backup's name."""
        m, name = self._backup(image, base, changed)
        self.backups.append(name)
        return m

    def restore(self, backup: str, dest: Path) -> Measured:
        """Restore ``backup`` as the file ``dest`` (which must not exist)."""
        return self._restore(backup, dest)

    def stored(self) -> int:
        """Bytes the repository occupies on disk."""
        return du(self.repo)

    def _run(self, argv: list[str], cwd: Path | None = None, env: dict[str, str] | None = None) -> Measured:
        return run(argv, cwd=cwd, env=env, logdir=self.logs).check()

    def _init(self) -> None:
        raise NotImplementedError

    def _backup(self, image: Path, base: str | None, changed: Path | None) -> tuple[Measured, str]:
        raise NotImplementedError

    def _restore(self, backup: str, dest: Path) -> Measured:
        raise NotImplementedError


class Ferry(Tool):
    """``ferry image backup|restore --json`` into a local store."""

    name = "ferry"
    incremental = True

    def __init__(self, workdir: Path, block_size: int | None = None, name: str | None = None) -> None:
        if name or block_size:
            self.name = name or f"ferry-{block_size // 1024 if block_size else 0}K"
        super().__init__(workdir)
        self.block_size = block_size
        self.exe = str(Path(sys.executable).parent / "ferry")

    def _init(self) -> None:
        # The store is created by the first backup (so that --block-size applies).
        pass

    def _backup(self, image: Path, base: str | None, changed: Path | None) -> tuple[Measured, str]:
        argv = [self.exe, "image", "backup", str(image), "--store", str(self.repo), "--json"]
        if base:
            argv += ["--base", base]
        if changed:
            argv += ["--changed", str(changed)]
        if self.block_size and not self.backups:
            argv += ["--block-size", str(self.block_size)]
        m = self._run(argv)
        return m, _backup_id(m.stdout)

    def _restore(self, backup: str, dest: Path) -> Measured:
        return self._run([self.exe, "image", "restore", backup, str(dest), "--store", str(self.repo), "--json"])


class Borg(Tool):
    """``borg create --compression zstd,1`` into an unencrypted repository; ``borg extract --sparse``."""

    name = "borg"

    def _env(self) -> dict[str, str]:
        return {
            "BORG_BASE_DIR": str(self.dir / "home"),  # its cache and security dirs stay in the workdir
            "BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK": "yes",
            "BORG_RELOCATED_REPO_ACCESS_IS_OK": "yes",
            "BORG_PASSPHRASE": "",
        }

    def _init(self) -> None:
        self._run(["borg", "init", "-e", "none", str(self.repo)], env=self._env())

    def _backup(self, image: Path, base: str | None, changed: Path | None) -> tuple[Measured, str]:
        name = f"b{len(self.backups) + 1}"
        # A relative path, so extract recreates just the file name in the target directory.
        m = self._run(
            ["borg", "create", "--compression", "zstd,1", f"{self.repo}::{name}", image.name],
            cwd=image.parent, env=self._env(),
        )
        return m, name

    def _restore(self, backup: str, dest: Path) -> Measured:
        target = dest.parent / f".{self.name}-extract"
        target.mkdir(parents=True)
        m = self._run(["borg", "extract", "--sparse", f"{self.repo}::{backup}"], cwd=target, env=self._env())
        _move_single_file(target, dest)
        return m


class Restic(Tool):
    """``restic backup`` (repository v2, zstd auto compression) and ``restic restore``."""

    name = "restic"

    def _env(self) -> dict[str, str]:
        return {
            "RESTIC_PASSWORD": RESTIC_PASSWORD,
            "RESTIC_REPOSITORY": str(self.repo),
            "RESTIC_CACHE_DIR": str(self.dir / "cache"),
        }

    def _init(self) -> None:
        self._run(["restic", "init"], env=self._env())

    def _backup(self, image: Path, base: str | None, changed: Path | None) -> tuple[Measured, str]:
        m = self._run(["restic", "backup", "--json", "--host", "bench", image.name], cwd=image.parent,
                      env=self._env())
        snap = ""
        for line in m.stdout.splitlines():
            if '"summary"' in line:
                snap = json.loads(line).get("snapshot_id", "")
        if not snap:
            raise BenchError("restic backup printed no snapshot id")
        return m, snap

    def _restore(self, backup: str, dest: Path) -> Measured:
        target = dest.parent / f".{self.name}-restore"
        m = self._run(["restic", "restore", backup, "--target", str(target)], env=self._env())
        _move_single_file(target, dest)
        return m


class QemuImg(Tool):
    """``qemu-img convert -c -O qcow2`` (a compressed copy; every backup is a full copy) and back to raw."""

    name = "qemu-img"

    def _init(self) -> None:
        self.repo.mkdir(parents=True)

    def _backup(self, image: Path, base: str | None, changed: Path | None) -> tuple[Measured, str]:
        out = self.repo / f"b{len(self.backups) + 1}.qcow2"
        m = self._run(["qemu-img", "convert", "-c", "-f", "raw", "-O", "qcow2", str(image), str(out)])
        return m, out.name

    def _restore(self, backup: str, dest: Path) -> Measured:
        return self._run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(self.repo / backup), str(dest)])


PEERS: tuple[type[Tool], ...] = (Borg, Restic, QemuImg)


def _backup_id(stdout: str) -> str:
    """The backup id in ``ferry image backup --json`` output (an object with ``id``, maybe nested)."""
    try:
        doc = json.loads(stdout)
    except json.JSONDecodeError:
        raise BenchError("ferry image backup --json printed no JSON") from None
    for obj in (doc, doc.get("backup") if isinstance(doc, dict) else None):
        if isinstance(obj, dict):
            for key in ("id", "backup_id"):
                if isinstance(obj.get(key), str):
                    return str(obj[key])
    raise BenchError("ferry image backup --json has no backup id")


def _move_single_file(target: Path, dest: Path) -> None:
    """Tools restore into a directory tree; move the one regular file they wrote to ``dest``."""
    files = [p for p in target.rglob("*") if p.is_file()]
    if len(files) != 1:
        raise BenchError(f"expected one restored file under {target}, found {len(files)}")
    files[0].rename(dest)
    shutil.rmtree(target)

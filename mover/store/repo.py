"""``Store``: the content-addressed store on a local directory (implements ``mover.store.api.StoreAPI``).

Directory layout (docs/store-format.md):
    config.json  key  locks/  tmp/  packs/<xx>/<name>.pack  index/<name>.idx  backups/<id>/{info.json,manifest}
"""

from __future__ import annotations

import array
import contextlib
import json
import logging
import os
import secrets
import shutil
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict
from typing import Any

import zstandard

from mover import kernels
from mover.errors import NotFound, StoreCorrupt, StoreError
from mover.store import config as cfg
from mover.store import files, fsutil, index, lock, objects, pack
from mover.store import manifest as mf
from mover.store.api import ZERO_ID, BackupInfo
from mover.store.writer import Writer

log = logging.getLogger(__name__)

BACKUP_DIR = "backups"
INFO_FILE = "info.json"
SUBDIRS = (lock.LOCK_DIR, fsutil.TMP_DIR, pack.PACK_DIR, index.INDEX_DIR, BACKUP_DIR)
CREATE_WAIT = 10.0  # how long open(create=True) waits for another process that is creating the store
RECORD_SIZE = pack.RECORD.size
SCRATCH_STEP = 1 << 20  # read buffers grow in these steps
SPAN_MAX = 16 << 20  # largest single read of adjacent records (bounded by the caller's run anyway)
LOCK_WAIT = 600.0  # a backup waits this long for a running prune before giving up with StoreLocked


class Store:
    """A store on a local directory. Thread-safe; one instance per process is enough."""

    def __init__(self, path: str, config: cfg.StoreConfig, key: bytes) -> None:
        self.path = path
        self.config = config
        self.block_size = config.block_size
        self._key = key
        self.index = index.Index(path)
        self._store_lock = lock.FileLock(path, lock.STORE_LOCK)
        self._holds = 0  # backups in flight in this process (manifests from new_manifest, open writers)
        self._lock = threading.Lock()
        self._packs = files.PackFiles(path)
        self._local = threading.local()

    # --- opening ------------------------------------------------------------------------------------

    @classmethod
    def init(cls, path: str, block_size: int = cfg.DEFAULT_BLOCK_SIZE, hash: str = cfg.DEFAULT_HASH,
             zstd_level: int = cfg.DEFAULT_ZSTD_LEVEL, pack_size: int = cfg.DEFAULT_PACK_SIZE) -> Store:
        """Create a new store in ``path`` (empty or missing) and open it."""
        path = os.path.abspath(path)
        if os.path.exists(os.path.join(path, cfg.CONFIG_FILE)):
            raise StoreError("a store already exists here", path=path, exists=True)
        config = cfg.StoreConfig(block_size=block_size, hash=hash, zstd_level=zstd_level, pack_size=pack_size)
        config.validate(path)
        try:
            os.makedirs(path, exist_ok=True)
            for d in SUBDIRS:
                os.makedirs(os.path.join(path, d), exist_ok=True)
        except OSError as e:
            raise fsutil.store_error(e, path, "cannot create the store") from e
        try:
            # the key first, created exclusively: of several processes creating this store one wins,
            # and the others must not write a config (their key would not be the store's)
            cfg.new_key(path, hash)
            cfg.save(path, config)  # last: a directory without config.json is not a store yet
        except FileExistsError:
            raise StoreError("a store already exists here (or another process is creating it)",
                             path=path, exists=True) from None
        fsutil.fsync_dir(path)
        log.info("Created store path=%s block_size=%d hash=%s", path, block_size, hash)
        return cls.open(path)

    @classmethod
    def open(cls, path: str, create: bool = False, **init_args: Any) -> Store:
        """Open the store in ``path``; with ``create``, make one there first if there is none."""
        path = os.path.abspath(path)
        config_path = os.path.join(path, cfg.CONFIG_FILE)
        if create and not os.path.exists(config_path):
            try:
                return cls.init(path, **init_args)
            except StoreError as e:
                if not getattr(e, "exists", False):
                    raise
                # another process won the race to create it: wait for it to finish (config comes last)
                deadline = time.monotonic() + CREATE_WAIT
                while not os.path.exists(config_path) and time.monotonic() < deadline:
                    time.sleep(0.05)
        config = cfg.load(path)
        key = cfg.load_key(path, config.hash)
        for d in SUBDIRS:
            if not os.path.isdir(os.path.join(path, d)):
                raise StoreCorrupt(f"directory {d}/ is missing", path=path)
        return cls(path, config, key)

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Release the store lock and every descriptor."""
        with self._lock:
            self._packs.close()
            self._holds = 0
        self._store_lock.release()
        self.index.close()

    # --- block ids and blocks -----------------------------------------------------------------------

    def block_id(self, data: bytes | bytearray | memoryview) -> bytes:
        """The keyed id of one block (``ZERO_ID`` is never returned for data: zeros are the caller's test)."""
        return kernels.block_ids(self.config.hash, self._key, data, max(len(data), 1))

    def block_ids(self, data: bytes | bytearray | memoryview, zero: bytes | bytearray | None = None) -> list[bytes]:
        """Ids of the consecutive blocks of ``data``; ``ZERO_ID`` where ``zero[i]`` is set."""
        raw = kernels.block_ids(self.config.hash, self._key, data, self.block_size, zero)
        return [raw[i : i + 32] for i in range(0, len(raw), 32)]

    def refresh(self) -> None:
        """See what other processes did: new and removed index segments, deleted packs."""
        self.index.refresh()
        self._packs.sweep()

    def has_many(self, ids: bytes | bytearray | memoryview) -> bytearray:
        """One flag per 32-byte id of ``ids`` (1: ``ZERO_ID`` or in the store), by one GIL-free call per segment."""
        found = bytearray()
        index.count_missing(self.index.segments, ids, found=found)
        return found

    def has(self, block_id: bytes) -> bool:
        return block_id == ZERO_ID or self.index.find(block_id) is not None

    def _decompressor(self) -> zstandard.ZstdDecompressor:
        d = getattr(self._local, "dctx", None)
        if d is None:
            d = self._local.dctx = zstandard.ZstdDecompressor()
        return d

    def read_entry(self, entry: index.Entry, verify: bool = True) -> bytes:
        """Read, decompress and (with ``verify``) re-hash one block; ``StoreCorrupt`` on any mismatch."""
        path = pack.pack_path(self.path, entry.pack)
        try:
            with self._packs.use(entry.pack) as fd:
                bid, raw_len, flags, stored = pack.read_record(fd, entry.offset, entry.stored_len, path, self.path)
        except FileNotFoundError:
            raise StoreCorrupt(f"pack {entry.pack} is missing (block {entry.id.hex()[:16]})", path=self.path) from None
        if bid != entry.id or raw_len != entry.raw_len:
            raise StoreCorrupt(f"pack {entry.pack} offset {entry.offset} holds another block", path=self.path)
        if flags & pack.FLAG_ZSTD:
            try:
                data = self._decompressor().decompress(stored, max_output_size=raw_len)
            except zstandard.ZstdError as e:
                raise StoreCorrupt(f"block {bid.hex()[:16]} in pack {entry.pack} does not decompress: {e}",
                                   path=self.path) from e
        else:
            data = stored
        if len(data) != raw_len:
            raise StoreCorrupt(f"block {bid.hex()[:16]} in pack {entry.pack} has the wrong length", path=self.path)
        if verify and self.block_id(data) != bid:
            raise StoreCorrupt(f"block {bid.hex()[:16]} in pack {entry.pack} fails its hash", path=self.path)
        return data

    def read_block(self, block_id: bytes, verify: bool = True) -> bytes:
        """Raw content of a block (decompressed and, unless ``verify=False``, re-hashed).

        Falls back to another copy if the first is damaged, and re-lists the index once if the block or
        its pack is gone (another process published it, or a prune moved it, since we last looked).
        """
        err: StoreCorrupt | None = None
        first = self.index.lookup(block_id)  # the common case: one search, one read
        if first is not None:
            try:
                return self.read_entry(first, verify)
            except StoreCorrupt as e:
                err = e
        for attempt in range(2):
            if attempt:
                self.refresh()
            for entry in self.index.find_all(block_id):
                if entry == first and not attempt:
                    continue
                try:
                    return self.read_entry(entry, verify)
                except StoreCorrupt as e:
                    err = e
        if err is not None:
            raise err
        raise StoreCorrupt(f"block {block_id.hex()[:16]} is missing", path=self.path)

    def read_into(self, ids: Sequence[bytes], out: memoryview, verify: bool = True) -> list[int]:
        """Read the blocks ``ids`` into ``out``, block ``k`` at ``k * block_size``; return their raw lengths.

        The fast path of restore: records sorted by pack and offset, adjacent ones read with one ``preadv``
        into a reused per-thread buffer, checked (header; xxh32 only without ``verify``), decompressed by one
        GIL-free ``unpack_records`` call straight into ``out`` and, with ``verify``, re-hashed with the store
        key. A block that fails any step is read again by ``read_block`` (other copies, index re-listed), so
        errors and fallbacks are exactly those of ``read_block``. ``out`` must hold ``len(ids)`` blocks.
        """
        bs = self.block_size
        if len(out) < len(ids) * bs:
            raise ValueError("out is smaller than the blocks asked for")
        lengths = [0] * len(ids)
        entries: list[tuple[str, int, int]] = []  # (pack, offset, k) in read order
        found: dict[int, index.Entry] = {}
        slow: set[int] = set()
        for k, bid in enumerate(ids):
            e = self.index.lookup(bid)
            if e is None or e.raw_len > bs:
                slow.add(k)
            else:
                found[k] = e
                entries.append((e.pack, e.offset, k))
        entries.sort()
        plan = array.array("q")
        scratch = self._scratch(sum(RECORD_SIZE + found[k].stored_len for _, _, k in entries))
        at = 0
        i = 0
        while i < len(entries):
            # one span: records of one pack that follow each other on disk (a backup writes runs so)
            name, offset, _ = entries[i]
            j, end = i + 1, offset + RECORD_SIZE + found[entries[i][2]].stored_len
            while j < len(entries) and entries[j][0] == name and entries[j][1] == end and end - offset < SPAN_MAX:
                end += RECORD_SIZE + found[entries[j][2]].stored_len
                j += 1
            span = scratch[at : at + end - offset]
            if not self._read_span(name, offset, span):
                slow.update(k for _, _, k in entries[i:j])
            else:
                pos = at
                for _, _, k in entries[i:j]:
                    e = found[k]
                    # With the keyed re-hash to come, the xxh32 adds nothing (any change to the stored bytes
                    # that survives decompression changes the data, and the hash sees it) and costs a pass
                    # over the stored bytes with the GIL held: it is checked without ``verify`` only. A
                    # block failing the hash is read again by read_entry, which names the failed check.
                    flags = pack.check_record(scratch, pos, e.id, e.stored_len, e.raw_len, crc=not verify)
                    if flags >= 0:
                        plan.extend((pos + RECORD_SIZE, e.stored_len, k * bs, e.raw_len, flags))
                    else:
                        slow.add(k)
                    pos += RECORD_SIZE + e.stored_len
            at += end - offset
            i = j
        rows = memoryview(plan)
        while len(rows):
            bad = kernels.unpack_records(scratch, rows, out, self._dctx())
            done = len(rows) // kernels.PLAN_COLS if bad < 0 else bad
            for r in range(done):
                k = rows[r * kernels.PLAN_COLS + 2] // bs
                lengths[k] = found[k].raw_len
                if verify and self.block_id(out[k * bs : k * bs + lengths[k]]) != ids[k]:
                    slow.add(k)
            if bad < 0:
                break
            slow.add(rows[bad * kernels.PLAN_COLS + 2] // bs)
            rows = rows[(bad + 1) * kernels.PLAN_COLS :]
        for k in sorted(slow):
            data = self.read_block(ids[k], verify)  # raises the one-line StoreCorrupt if no copy is good
            if len(data) > bs:
                raise StoreCorrupt(f"block {ids[k].hex()[:16]} has {len(data)} bytes, more than a block",
                                   path=self.path)
            out[k * bs : k * bs + len(data)] = data
            lengths[k] = len(data)
        return lengths

    def _dctx(self) -> object:
        """This thread's libzstd context (its window buffers allocated once, not per batch)."""
        d = getattr(self._local, "zctx", None)
        if d is None:
            d = self._local.zctx = kernels.new_dctx()
        return d

    def _scratch(self, size: int) -> memoryview:
        """This thread's read buffer, grown to ``size`` (reused: no allocation and page faults per read)."""
        buf: bytearray | None = getattr(self._local, "scratch", None)
        if buf is None or len(buf) < size:
            # Grown in whole MiB, at least doubling: runs differ in size by a few bytes, and each new
            # allocation costs its page faults and zero-fill again.
            grown = max(size, 2 * len(buf) if buf is not None else 0)
            buf = self._local.scratch = bytearray(-(-grown // SCRATCH_STEP) * SCRATCH_STEP)
        return memoryview(buf)

    def _read_span(self, name: str, offset: int, span: memoryview) -> bool:
        """Fill ``span`` from pack ``name`` at ``offset``; False if the pack is gone, short or unreadable."""
        try:
            with self._packs.use(name) as fd:
                done = 0
                while done < len(span):
                    n = os.preadv(fd, [span[done:]], offset + done)
                    if n <= 0:
                        return False
                    done += n
        except OSError:
            return False  # the slow path re-reads these blocks and reports the error in one line
        return True

    def writer(self) -> Writer:
        """A block writer; from its first block until commit or abort it holds the shared store lock."""
        return Writer(self)

    def hold(self) -> None:
        """Count one more backup in flight; the first takes the shared store lock, so prune waits.

        Prune takes the lock exclusively on its own descriptor, so it also waits for holds of its own process.
        """
        with self._lock:
            if self._holds == 0:
                self._store_lock.acquire(exclusive=False, timeout=LOCK_WAIT, busy="a prune is running")
            self._holds += 1

    def unhold(self) -> None:
        """Count one backup in flight less; the last releases the shared store lock."""
        with self._lock:
            if self._holds <= 0:
                return
            self._holds -= 1
            if self._holds == 0:
                self._store_lock.release()

    # --- manifests and backups ----------------------------------------------------------------------

    def new_manifest(self, size: int, base: str | None = None) -> mf.Manifest:
        """An all-zero manifest for ``size`` bytes, or a copy-on-write copy of backup ``base``'s."""
        # The new manifest is a backup in flight until saved or closed: it holds the store lock, so no
        # prune deletes a block it names (its base's, or one a writer deduplicated against) meanwhile.
        self.hold()
        try:
            if base is None:
                m = mf.Manifest(size, self.block_size)
            else:
                m = self.load_manifest(base)
                if m.block_size != self.block_size:
                    m.close()
                    raise StoreCorrupt(f"backup {base} has block size {m.block_size}, store {self.block_size}",
                                       path=self.path)
                if m.size != size:
                    r = mf.resized(m, size)
                    m.close()
                    m = r
        except BaseException:
            self.unhold()
            raise
        m.on_release = self.unhold
        return m

    def _backup_dir(self, backup_id: str) -> str:
        if not backup_id or "/" in backup_id or backup_id.startswith("."):
            raise NotFound(kind="backup", name=backup_id)
        return os.path.join(self.path, BACKUP_DIR, backup_id)

    def save_backup(self, info: BackupInfo, manifest: mf.Manifest) -> BackupInfo:  # type: ignore[override]
        """Write manifest and metadata atomically, after checking every block it names is in the store.

        Once saved, the manifest no longer holds the store lock (its blocks are referenced by a backup).
        """
        self.hold()  # a manifest not from new_manifest is protected while it is checked and written
        try:
            return self._save_backup(info, manifest)
        finally:
            self.unhold()

    def _save_backup(self, info: BackupInfo, manifest: mf.Manifest) -> BackupInfo:
        if manifest.block_size != self.block_size:
            raise StoreError(f"manifest block size {manifest.block_size} != store {self.block_size}", path=self.path)
        missing = self.missing_blocks(manifest)
        if missing:
            raise StoreError(f"backup not saved: {missing} block(s) it names are not in the store "
                             "(commit the writer first)", path=self.path)
        backup_id = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + secrets.token_hex(4)
        info.id = backup_id
        info.size = manifest.size
        info.block_size = manifest.block_size
        tmp = fsutil.tmp_path(self.path, ".backup")
        final = self._backup_dir(backup_id)
        try:
            os.mkdir(tmp)
            mf.write(self.path, os.path.join(tmp, mf.MANIFEST_FILE), manifest)
            data = json.dumps(asdict(info), indent=2, sort_keys=True).encode() + b"\n"
            fsutil.write_file(self.path, os.path.join(tmp, INFO_FILE), data)
            fsutil.fsync_dir(tmp)
            os.rename(tmp, final)
            fsutil.fsync_dir(os.path.dirname(final))
        except BaseException as e:
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(e, OSError):
                raise fsutil.store_error(e, self.path, f"cannot save backup {backup_id}") from e
            raise
        manifest.release()
        log.info("Saved backup id=%s size=%d blocks=%d", backup_id, manifest.size, manifest.count)
        return info

    def missing_blocks(self, manifest: mf.Manifest) -> int:
        """How many non-zero entries of ``manifest`` the index does not hold (after a refresh).

        One GIL-free ``mark_found`` call per segment and 1 MiB slice of the manifest, not a Python loop
        over every id (4.6x faster; docs/store-format.md, "Manifests").
        """
        self.index.refresh()
        return sum(index.count_missing(self.index.segments, chunk) for chunk in manifest.chunks())

    def load_manifest(self, backup_id: str) -> mf.Manifest:
        path = os.path.join(self._backup_dir(backup_id), mf.MANIFEST_FILE)
        try:
            return mf.load(self.path, path)
        except FileNotFoundError:
            if os.path.isdir(self._backup_dir(backup_id)):
                raise StoreCorrupt(f"backup {backup_id} has no manifest", path=self.path) from None
            raise NotFound(kind="backup", name=backup_id) from None

    def backup(self, backup_id: str) -> BackupInfo:
        path = os.path.join(self._backup_dir(backup_id), INFO_FILE)
        try:
            with open(path, "rb") as f:
                raw = json.load(f)
        except FileNotFoundError:
            raise NotFound(kind="backup", name=backup_id) from None
        except (OSError, ValueError) as e:
            raise StoreCorrupt(f"backup {backup_id}: cannot read {INFO_FILE}: {e}", path=self.path) from e
        known = set(BackupInfo.__dataclass_fields__)
        return BackupInfo(**{k: v for k, v in raw.items() if k in known})

    def backup_ids(self) -> list[str]:
        return sorted(d for d in os.listdir(os.path.join(self.path, BACKUP_DIR)) if not d.startswith("."))

    def backups(self) -> Iterator[BackupInfo]:
        """Every backup, oldest first."""
        infos = []
        for b in self.backup_ids():
            with contextlib.suppress(NotFound):
                infos.append(self.backup(b))
        yield from sorted(infos, key=lambda i: (i.created, i.id))

    def delete_backup(self, backup_id: str) -> None:
        """Remove a backup's manifest and metadata (its blocks go at the next prune)."""
        final = self._backup_dir(backup_id)
        if not os.path.isdir(final):
            raise NotFound(kind="backup", name=backup_id)
        trash = fsutil.tmp_path(self.path, ".deleted")
        try:
            os.rename(final, trash)  # atomic: the backup is either listed whole or gone
            fsutil.fsync_dir(os.path.dirname(final))
        except OSError as e:
            raise fsutil.store_error(e, self.path, f"cannot delete backup {backup_id}") from e
        shutil.rmtree(trash, ignore_errors=True)
        log.info("Deleted backup id=%s", backup_id)

    # --- small named objects (VM records, OVF) ---------------------------------------------------------

    def put_object(self, kind: str, name: str, data: bytes) -> None:
        """Store ``data`` as object ``kind/name`` (atomically; replaces an older one)."""
        self.hold()  # prune clears tmp/, where the object is written before its rename
        try:
            objects.put(self.path, kind, name, data)
        finally:
            self.unhold()

    def get_object(self, kind: str, name: str) -> bytes:
        """The bytes of object ``kind/name`` (``NotFound`` if there is none)."""
        return objects.get(self.path, kind, name)

    def object_names(self, kind: str) -> list[str]:
        return objects.names(self.path, kind)

    def delete_object(self, kind: str, name: str) -> None:
        objects.delete(self.path, kind, name)

    # --- maintenance --------------------------------------------------------------------------------

    def prune(self, wait: float = 60.0) -> dict[str, int]:
        """Drop blocks no backup references; waits up to ``wait`` s for running backups. Returns counts."""
        from mover.store import prune as pruning

        return pruning.prune(self, wait=wait)

    def repair(self, wait: float = 60.0) -> dict[str, int]:
        """Rebuild the index of packs that no valid segment covers (see ``mover.store.repair``)."""
        from mover.store import repair as repairing

        return repairing.repair(self, wait=wait)

    def check(self, read_data: bool = False) -> dict[str, Any]:
        """Structured report of problems (see ``mover.store.check``)."""
        from mover.store import check as checking

        return checking.check(self, read_data=read_data)

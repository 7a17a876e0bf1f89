"""The mover job API: NATS subjects, stream names and message schemas.

The control plane imports this module to publish jobs and read results; movers import it to consume them.
It imports neither ``nats`` nor anything of ``control/``: messages are plain dataclasses that serialize to
JSON (``to_json``) and are validated when read (``from_json`` raises ``MalformedMessage`` with one clear
line on anything unexpected, so a mover can ``term()`` a bad job instead of retrying it forever).

Subjects::

    ferry.jobs.imageio | ferry.jobs.ssh | ferry.jobs.attach.<proxy_vm_id> | ferry.jobs.store   (FERRY_JOBS)
    ferry.events.result.<job_id> | ferry.events.progress.<job_id>                              (FERRY_EVENTS)
    ferry.events.snapshot.<vm_id> | ferry.events.export.<vm_id> | ferry.events.backup.<backup_id>
    ferry.dead.<capability>[.<proxy>]   dead letters: the job's JSON, with the reason in headers
    ferry.trigger.backup | ferry.trigger.restore                                                (request-reply)

Every job is published with header ``Nats-Msg-Id: <job_id>`` so a re-publish within the stream's duplicate
window is dropped by the server. Block data never travels over NATS: jobs carry URLs, tickets and store
locations.
"""

from __future__ import annotations

import json
import re
import types
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any, ClassVar, TypeVar, Union
from urllib.parse import urlparse

from mover.errors import FerryError

# --- streams and subjects ------------------------------------------------------------------------------

STREAM_JOBS = "FERRY_JOBS"  # work-queue retention: a job is gone from the stream once a mover acks it
STREAM_EVENTS = "FERRY_EVENTS"  # limits retention: results, progress, control-plane events, dead letters

JOBS_PREFIX = "ferry.jobs"
EVENTS_PREFIX = "ferry.events"
DEAD_PREFIX = "ferry.dead"

JOBS_SUBJECTS = [f"{JOBS_PREFIX}.>"]
# Dead letters share the events stream: they are few, and one stream keeps the audit trail in one place.
EVENTS_SUBJECTS = [f"{EVENTS_PREFIX}.>", f"{DEAD_PREFIX}.>"]

TRIGGER_BACKUP = "ferry.trigger.backup"
TRIGGER_RESTORE = "ferry.trigger.restore"

HDR_MSG_ID = "Nats-Msg-Id"  # JetStream de-duplication header; always the job id for jobs
HDR_DEAD_REASON = "Ferry-Dead-Reason"  # on dead letters: why the job was given up (one line)
HDR_DEAD_SUBJECT = "Ferry-Dead-Subject"  # on dead letters: the subject the job came from
HDR_DELIVERIES = "Ferry-Deliveries"  # on dead letters: how many times it was delivered

CAP_IMAGEIO = "imageio"
CAP_SSH = "ssh"
CAP_ATTACH = "attach"
CAP_STORE = "store"
CAPABILITIES = (CAP_IMAGEIO, CAP_SSH, CAP_ATTACH, CAP_STORE)

# Ids travel inside subjects, so they must be one subject token: no dots, wildcards or spaces.
_TOKEN = re.compile(r"^[A-Za-z0-9_-]{1,128}$")


class MalformedMessage(FerryError):
    """A message that does not match its schema: permanent, retrying cannot help."""

    msg = "malformed {self.what}: {self.reason}"
    exit_code = 2
    what = "message"


def check_token(value: str, what: str = "id") -> str:
    """Return ``value`` if it can be one NATS subject token, else raise ``MalformedMessage``."""
    if not isinstance(value, str) or not _TOKEN.match(value):
        raise MalformedMessage(f"{what} {value!r} must be 1-128 characters of [A-Za-z0-9_-]", what=what)
    return value


def job_subject(capability: str, proxy: str | None = None) -> str:
    """The subject of jobs for ``capability``; ``attach`` jobs go to one proxy VM (``proxy`` = its id)."""
    if capability not in CAPABILITIES:
        raise MalformedMessage(f"unknown capability {capability!r} (known: {', '.join(CAPABILITIES)})")
    if capability == CAP_ATTACH:
        if not proxy:
            raise MalformedMessage("attach jobs need the proxy VM id")
        return f"{JOBS_PREFIX}.{CAP_ATTACH}.{check_token(proxy, 'proxy VM id')}"
    if proxy:
        raise MalformedMessage(f"{capability} jobs take no proxy VM id")
    return f"{JOBS_PREFIX}.{capability}"


def dead_subject(subject: str) -> str:
    """The dead-letter subject of a job subject: ``ferry.jobs.X`` -> ``ferry.dead.X``."""
    if not subject.startswith(JOBS_PREFIX + "."):
        raise MalformedMessage(f"{subject!r} is not a job subject")
    return DEAD_PREFIX + subject[len(JOBS_PREFIX) :]


def consumer_name(subject: str) -> str:
    """The durable consumer shared by every mover that takes jobs of ``subject``.

    One consumer per capability subject, shared, so several movers split the jobs of one backup.
    """
    return "mover-" + subject[len(JOBS_PREFIX) + 1 :].replace(".", "-")


def result_subject(job_id: str) -> str:
    return f"{EVENTS_PREFIX}.result.{check_token(job_id, 'job_id')}"


def progress_subject(job_id: str) -> str:
    return f"{EVENTS_PREFIX}.progress.{check_token(job_id, 'job_id')}"


def snapshot_subject(vm_id: str) -> str:
    return f"{EVENTS_PREFIX}.snapshot.{check_token(vm_id, 'vm_id')}"


def export_subject(vm_id: str) -> str:
    return f"{EVENTS_PREFIX}.export.{check_token(vm_id, 'vm_id')}"


def backup_subject(backup_id: str) -> str:
    return f"{EVENTS_PREFIX}.backup.{check_token(backup_id, 'backup_id')}"


def store_path(store: str) -> str:
    """The local directory of a store URL (``file:///path``) or plain path."""
    if store.startswith("file://"):
        path = urlparse(store).path
    elif "://" in store:
        raise MalformedMessage(f"store {store!r}: only local stores (file:///path or a path) are supported")
    else:
        path = store
    if not path:
        raise MalformedMessage("store path is empty")
    return path


# --- schema checking --------------------------------------------------------------------------------------

M = TypeVar("M", bound="Message")


def _check(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against a type hint (the few shapes messages use); return it (ints widened to float)."""
    if tp is Any:
        return value
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        errors = []
        for arg in typing.get_args(tp):
            try:
                return _check(value, arg, where)
            except MalformedMessage as e:
                errors.append(e)
        raise MalformedMessage(f"{where}: {value!r} is not {_name(tp)}")
    if tp is type(None):
        if value is not None:
            raise MalformedMessage(f"{where}: expected null, got {value!r}")
        return value
    if origin is dict or tp is dict:
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise MalformedMessage(f"{where}: expected an object, got {_short(value)}")
        return value
    if origin is list or tp is list:
        if not isinstance(value, list):
            raise MalformedMessage(f"{where}: expected a list, got {_short(value)}")
        (item,) = typing.get_args(tp) or (Any,)
        return [_check(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise MalformedMessage(f"{where}: expected true or false, got {_short(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise MalformedMessage(f"{where}: expected an integer, got {_short(value)}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise MalformedMessage(f"{where}: expected a number, got {_short(value)}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise MalformedMessage(f"{where}: expected a string, got {_short(value)}")
        return value
    raise TypeError(f"unsupported type hint {tp!r}")  # a bug in a schema, not bad input


def _name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _short(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, (bytes, bytearray)) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


@dataclass
class Message:
    """Base of every message: JSON in and out, checked against the dataclass's type hints."""

    KIND: ClassVar[str] = ""

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        if self.KIND:
            data["kind"] = self.KIND
        return data

    def to_json(self) -> bytes:
        return json.dumps(self.to_dict(), separators=(",", ":"), sort_keys=True).encode()

    @classmethod
    def from_dict(cls: type[M], data: Any) -> M:
        what = cls.__name__
        if not isinstance(data, dict):
            raise MalformedMessage(f"expected a JSON object, got {_short(data)}", what=what)
        data = dict(data)
        if cls.KIND:  # a message whose kind is implied by its class (JobResult's ``kind`` is a field)
            kind = data.pop("kind", cls.KIND)
            if kind != cls.KIND:
                raise MalformedMessage(f"kind is {kind!r}, expected {cls.KIND!r}", what=what)
        hints = typing.get_type_hints(cls)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise MalformedMessage(f"unknown field(s) {', '.join(unknown)}", what=what)
        values: dict[str, Any] = {}
        for f in fields(cls):
            if f.name not in data:
                if f.default is MISSING and f.default_factory is MISSING:
                    raise MalformedMessage(f"missing field {f.name!r}", what=what)
                continue
            try:
                values[f.name] = _check(data[f.name], hints[f.name], f.name)
            except MalformedMessage as e:
                raise MalformedMessage(e.reason, what=what) from None
        msg = cls(**values)
        try:
            msg.validate()
        except MalformedMessage as e:
            raise MalformedMessage(e.reason, what=what) from None
        return msg

    @classmethod
    def from_json(cls: type[M], raw: bytes | str) -> M:
        return cls.from_dict(_loads(raw, cls.__name__))

    def validate(self) -> None:
        """Checks beyond types; raise ``MalformedMessage``."""


def _loads(raw: bytes | str, what: str) -> Any:
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise MalformedMessage(f"not JSON ({e})", what=what) from None


# --- sources and sinks described in jobs ----------------------------------------------------------------


def _check_url(value: Any, key: str) -> None:
    if not isinstance(value, str) or urlparse(value).scheme not in ("https", "http") or not urlparse(value).netloc:
        raise MalformedMessage(f"{key} must be an http(s) URL, got {_short(value)}")


def check_imageio(spec: dict[str, Any], where: str) -> None:
    """Validate an imageio source or sink description (see ``ExportJob``)."""
    required = {"transfer_url": str, "ca_pem": str, "size": int, "format": str}
    for key, tp in required.items():
        if key not in spec:
            raise MalformedMessage(f"{where} needs {key!r}")
        _check(spec[key], tp, f"{where}.{key}")
    _check_url(spec["transfer_url"], f"{where}.transfer_url")
    if spec.get("proxy_url") is not None:
        _check_url(spec["proxy_url"], f"{where}.proxy_url")
    if spec["size"] <= 0:
        raise MalformedMessage(f"{where}.size must be positive, got {spec['size']}")
    if spec["format"] not in ("raw", "cow"):
        raise MalformedMessage(f"{where}.format must be 'raw' or 'cow', got {spec['format']!r}")
    for flag in ("dirty", "shallow"):
        if flag in spec:
            _check(spec[flag], bool, f"{where}.{flag}")
    if spec.get("dirty") and spec.get("shallow"):
        raise MalformedMessage(f"{where}: dirty and shallow exclude each other")
    allowed = {"type", "transfer_url", "proxy_url", "ca_pem", "size", "format", "dirty", "shallow", "name"}
    unknown = sorted(set(spec) - allowed)
    if unknown:
        raise MalformedMessage(f"{where}: unknown field(s) {', '.join(unknown)}")


# Per type of source/sink: its validator. The ssh and attach modes add theirs here.
SOURCE_TYPES: dict[str, typing.Callable[[dict[str, Any], str], None]] = {"imageio": check_imageio}
SINK_TYPES: dict[str, typing.Callable[[dict[str, Any], str], None]] = {"imageio": check_imageio}

# The capability a mover needs to run a source or sink of each type.
TYPE_CAPABILITY = {"imageio": CAP_IMAGEIO, "ssh": CAP_SSH, "device": CAP_ATTACH}


def _check_spec(spec: dict[str, Any], registry: dict[str, Any], where: str) -> None:
    kind = spec.get("type")
    if kind not in registry:
        raise MalformedMessage(f"{where}.type {kind!r} is not one of {', '.join(sorted(registry))}")
    registry[kind](spec, where)


# --- jobs -----------------------------------------------------------------------------------------------


@dataclass
class Job(Message):
    """Common part of all jobs."""

    job_id: str

    def validate(self) -> None:
        check_token(self.job_id, "job_id")
        if hasattr(self, "store"):
            store_path(self.store)


@dataclass
class ExportJob(Job):
    """Back up one disk: read ``source``, store it as a new backup in ``store``.

    source (imageio): ``{"type": "imageio", "transfer_url": "https://host:54322/images/<ticket>",
    "proxy_url": "https://engine:54323/images/<ticket>" | None, "ca_pem": "-----BEGIN CERTIFICATE...",
    "size": <virtual size>, "format": "raw" | "cow", "dirty": <read only dirty extents>,
    "shallow": <the transfer serves one qcow2 layer (snapshot method): read only the clusters it holds>}``.
    The mover reads raw transfers only (guest data); "cow" is refused with a clear error.
    ``base``: the store backup id the incremental builds on (None: full). ``changed``: the control plane
    asks for changed data only (with ``dirty`` extents or, in other modes, a list of layers).
    ``labels`` are stored with the backup; the mover adds ``job_id`` so a redelivered job finds its result.
    """

    KIND: ClassVar[str] = "export"

    backup_id: str
    disk_id: str
    store: str
    source: dict[str, Any]
    base: str | None = None
    changed: bool = False
    labels: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        super().validate()
        check_token(self.backup_id, "backup_id")
        check_token(self.disk_id, "disk_id")
        _check_spec(self.source, SOURCE_TYPES, "source")
        for flag in ("dirty", "shallow"):
            if self.source.get(flag) and not self.base:
                raise MalformedMessage(f"source.{flag} needs a base backup")

    @property
    def capability(self) -> str:
        return TYPE_CAPABILITY[self.source["type"]]


@dataclass
class RestoreJob(Job):
    """Write store backup ``store_backup_id`` of one disk to ``sink`` (same shapes as an export's source)."""

    KIND: ClassVar[str] = "restore"

    restore_id: str
    disk_id: str
    store: str
    store_backup_id: str
    sink: dict[str, Any]

    def validate(self) -> None:
        super().validate()
        check_token(self.restore_id, "restore_id")
        check_token(self.disk_id, "disk_id")
        if not self.store_backup_id:
            raise MalformedMessage("store_backup_id is empty")
        _check_spec(self.sink, SINK_TYPES, "sink")

    @property
    def capability(self) -> str:
        return TYPE_CAPABILITY[self.sink["type"]]


@dataclass
class CheckJob(Job):
    """Check a store (``read_data``: re-read and re-hash every block). Goes to ``ferry.jobs.store``."""

    KIND: ClassVar[str] = "check"

    store: str
    read_data: bool = False

    capability: ClassVar[str] = CAP_STORE


@dataclass
class PruneJob(Job):
    """Delete store backups ``delete`` (may be empty), then drop unreferenced blocks."""

    KIND: ClassVar[str] = "prune"

    store: str
    delete: list[str] = field(default_factory=list)

    capability: ClassVar[str] = CAP_STORE


JOB_TYPES: dict[str, type[Job]] = {c.KIND: c for c in (ExportJob, RestoreJob, CheckJob, PruneJob)}
AnyJob = ExportJob | RestoreJob | CheckJob | PruneJob


def parse_job(raw: bytes | str) -> AnyJob:
    """Decode any job by its ``kind``; ``MalformedMessage`` on anything else."""
    data = _loads(raw, "job")
    if not isinstance(data, dict):
        raise MalformedMessage(f"expected a JSON object, got {_short(data)}", what="job")
    kind = data.get("kind")
    cls = JOB_TYPES.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise MalformedMessage(f"kind {kind!r} is not one of {', '.join(JOB_TYPES)}", what="job")
    return typing.cast(AnyJob, cls.from_dict(data))


def job_id_of(raw: bytes | str) -> str | None:
    """Best-effort job id of a message that may be malformed (to report a failed result for it)."""
    try:
        data = json.loads(raw)
        job_id = data.get("job_id") if isinstance(data, dict) else None
        return check_token(job_id, "job_id") if isinstance(job_id, str) else None
    except (ValueError, UnicodeDecodeError, MalformedMessage):
        return None


# --- what movers publish --------------------------------------------------------------------------------


@dataclass
class JobResult(Message):
    """The one outcome of a job, on ``result_subject(job_id)``.

    ``store_backup_id``: the backup written (export) or read (restore). ``stats``: bytes read, stored, zero,
    duplicate, seconds, ... ``error``: one line when not ok; ``retryable`` says whether re-running can help.
    """

    job_id: str
    kind: str  # the job's kind: export, restore, check, prune (or "unknown" for a malformed job)
    ok: bool
    store_backup_id: str | None = None
    stats: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    retryable: bool = False
    mover: str = ""  # which mover ran it (host:pid), for the audit trail
    attempt: int = 1  # delivery count of the run that produced this result

    def validate(self) -> None:
        check_token(self.job_id, "job_id")
        if not self.ok and not self.error:
            raise MalformedMessage("a failed result needs an error")


@dataclass
class JobProgress(Message):
    """Throttled progress of a running job (about once a second) on ``progress_subject(job_id)``.

    ``done``/``total``: bytes of the disk processed / to process; ``stored``: bytes written to the store
    (compressed, new blocks only); ``rate``: bytes per second over the run so far.
    """

    KIND: ClassVar[str] = "progress"

    job_id: str
    done: int
    total: int
    stored: int = 0
    rate: float = 0.0

    def validate(self) -> None:
        check_token(self.job_id, "job_id")
        if self.done < 0 or self.total < 0 or self.stored < 0:
            raise MalformedMessage("done, total and stored must not be negative")


# --- triggers (request-reply) ------------------------------------------------------------------------------


@dataclass
class BackupTrigger(Message):
    """Request on ``ferry.trigger.backup``: back up a VM; the reply is ``{"backup_id"}`` or ``{"error"}``."""

    vm: str
    mode: str = "imageio"
    type: str = "incremental"  # "full" | "incremental" (incremental falls back to full when it cannot be one)

    def validate(self) -> None:
        if not self.vm:
            raise MalformedMessage("vm is empty")
        if self.mode not in ("imageio", "ssh", "attach"):
            raise MalformedMessage(f"mode {self.mode!r} is not one of imageio, ssh, attach")
        if self.type not in ("full", "incremental"):
            raise MalformedMessage(f"type {self.type!r} is not one of full, incremental")


@dataclass
class RestoreTrigger(Message):
    """Request on ``ferry.trigger.restore``; the reply is ``{"restore_id"}`` or ``{"error"}``."""

    backup_id: str
    name: str | None = None
    cluster: str | None = None
    storage_domain: str | None = None
    disks: list[str] = field(default_factory=list)  # empty: every disk
    start: bool = False

    def validate(self) -> None:
        if not self.backup_id:
            raise MalformedMessage("backup_id is empty")

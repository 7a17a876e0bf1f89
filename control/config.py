"""Where Ferry keeps its state, and how the control plane reaches NATS.

The data directory holds the catalog (``catalog.sqlite``), the embedded NATS server's JetStream directory
(``nats/``), the default store (``store/``) and secrets the user hands over (``secrets/``, mode 0700). It is
per user (XDG: ``$XDG_DATA_HOME/ferry`` or ``~/.local/share/ferry``) unless ``--data-dir``, ``FERRY_DATA_DIR``
or the config file (``$XDG_CONFIG_HOME/ferry/config.json``, or ``config.json`` in the data directory) says
otherwise.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from control.errors import UsageError

CONFIG_NAME = "config.json"


def default_data_dir() -> Path:
    """The per-user data directory (XDG base directory spec)."""
    env = os.environ.get("FERRY_DATA_DIR")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(xdg) / "ferry"


def user_config_file() -> Path:
    xdg = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(xdg) / "ferry" / CONFIG_NAME


@dataclass
class NatsConfig:
    """How to reach NATS: ``url`` None means the embedded server in the data directory."""

    url: str | None = None
    user: str | None = None
    password_file: str | None = None  # a path, so the password never sits in the config file itself
    creds_file: str | None = None  # NATS .creds (JWT + nkey)
    token_file: str | None = None
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None

    def options(self) -> dict[str, Any]:
        """Keyword arguments for ``mover.bus.connect`` (secrets read from their files now)."""
        opts: dict[str, Any] = {}
        if self.user:
            opts["user"] = self.user
        if self.password_file:
            opts["password"] = _read_secret(self.password_file)
        if self.token_file:
            opts["token"] = _read_secret(self.token_file)
        if self.creds_file:
            opts["creds"] = self.creds_file
        if self.tls_ca:
            opts["tls_ca"] = self.tls_ca
        if self.tls_cert:
            opts["tls_cert"] = self.tls_cert
        if self.tls_key:
            opts["tls_key"] = self.tls_key
        return opts


@dataclass
class Config:
    """Resolved configuration of one ``ferry`` invocation."""

    data_dir: Path
    store: str = ""  # store URL or path; empty means <data_dir>/store
    nats: NatsConfig = field(default_factory=NatsConfig)
    # Seconds a flow waits for one disk job; a mover sends heartbeats, so this bounds a stuck job, not a slow one.
    job_timeout: float = 6 * 3600.0
    # Seconds to wait for one engine entity (snapshot ok, transfer ready, backup ready); real engines take
    # minutes on a loaded storage domain, so the default is generous; tests lower it.
    engine_timeout: float = 600.0
    # Application consistency: shell commands run by the control plane before and after the point in time
    # of a VM's backup (quiesce a database, say), per VM name or "*". Only from the configuration file, never
    # from a trigger message: whoever can publish on NATS must not be able to run commands here.
    hooks: dict[str, dict[str, str]] = field(default_factory=dict)

    def hooks_for(self, vm_name: str) -> dict[str, str]:
        return dict(self.hooks.get(vm_name) or self.hooks.get("*") or {})

    @property
    def catalog_path(self) -> Path:
        return self.data_dir / "catalog.sqlite"

    @property
    def nats_dir(self) -> Path:
        return self.data_dir / "nats"

    @property
    def secrets_dir(self) -> Path:
        return self.data_dir / "secrets"

    @property
    def store_url(self) -> str:
        return self.store or str(self.data_dir / "store")

    def ensure(self) -> None:
        """Create the data directory (private to the user: it holds engine passwords)."""
        self.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.secrets_dir.mkdir(exist_ok=True, mode=0o700)
        os.chmod(self.secrets_dir, 0o700)


def _read_secret(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError as e:
        raise UsageError(f"cannot read secret file {path}: {e.strerror}") from None


def _load_json(path: Path) -> dict[str, Any]:
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        raise UsageError(f"bad config file {path}: {e}") from None
    if not isinstance(data, dict):
        raise UsageError(f"bad config file {path}: not a JSON object")
    return data


def load(data_dir: str | os.PathLike[str] | None = None, config_file: str | None = None,
         nats_url: str | None = None, store: str | None = None) -> Config:
    """Resolve the configuration: command-line values, then config files, then defaults."""
    user_conf = _load_json(Path(config_file)) if config_file else _load_json(user_config_file())
    if data_dir is None and user_conf.get("data_dir"):
        data_dir = os.path.expanduser(str(user_conf["data_dir"]))
    root = Path(data_dir) if data_dir is not None else default_data_dir()
    conf = {**_load_json(root / CONFIG_NAME), **user_conf} if not config_file else user_conf
    nats_conf = conf.get("nats") or {}
    if not isinstance(nats_conf, dict):
        raise UsageError("bad config: 'nats' must be an object")
    known = set(NatsConfig.__dataclass_fields__)
    unknown = set(nats_conf) - known
    if unknown:
        raise UsageError(f"bad config: unknown nats settings {sorted(unknown)}")
    nats = NatsConfig(**nats_conf)
    if nats_url:
        nats.url = nats_url
    cfg = Config(data_dir=root.absolute(), store=store or str(conf.get("store") or ""), nats=nats)
    hooks = conf.get("hooks") or {}
    if not isinstance(hooks, dict) or not all(
            isinstance(h, dict) and set(h) <= {"pre", "post"} and all(isinstance(v, str) for v in h.values())
            for h in hooks.values()):
        raise UsageError('bad config: "hooks" maps VM names to {"pre": "command", "post": "command"}')
    cfg.hooks = hooks
    for key in ("job_timeout", "engine_timeout"):
        if key in conf:
            setattr(cfg, key, float(conf[key]))
    return cfg

"""Configuration: per-user data dir (XDG), overrides by flag, env and config file, bad files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from control import config
from control.errors import UsageError


def test_default_is_xdg_data_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FERRY_DATA_DIR", raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "conf"))
    cfg = config.load()
    assert cfg.data_dir == tmp_path / "xdg" / "ferry"
    assert cfg.catalog_path == cfg.data_dir / "catalog.sqlite"
    assert cfg.store_url == str(cfg.data_dir / "store")
    assert cfg.nats.url is None  # embedded


def test_flag_beats_config_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "conf"))
    (tmp_path / "conf" / "ferry").mkdir(parents=True)
    (tmp_path / "conf" / "ferry" / "config.json").write_text(json.dumps(
        {"data_dir": str(tmp_path / "fromfile"), "store": "/srv/store",
         "nats": {"url": "nats://n:4222", "user": "u", "password_file": str(tmp_path / "pw")}}))
    (tmp_path / "pw").write_text("p\n")
    cfg = config.load()
    assert cfg.data_dir == tmp_path / "fromfile"
    assert cfg.store_url == "/srv/store"
    assert cfg.nats.options() == {"user": "u", "password": "p"}
    cfg = config.load(data_dir=tmp_path / "flag", nats_url="nats://other:1")
    assert cfg.data_dir == tmp_path / "flag" and cfg.nats.url == "nats://other:1"


def test_bad_config_is_one_line_error(tmp_path: Path) -> None:
    bad = tmp_path / "c.json"
    bad.write_text("{not json")
    with pytest.raises(UsageError, match="bad config file"):
        config.load(config_file=str(bad))
    bad.write_text(json.dumps({"nats": {"colour": "blue"}}))
    with pytest.raises(UsageError, match="unknown nats settings"):
        config.load(config_file=str(bad))


def test_ensure_makes_private_dirs(tmp_path: Path) -> None:
    cfg = config.load(data_dir=tmp_path / "d")
    cfg.ensure()
    assert (cfg.secrets_dir.stat().st_mode & 0o777) == 0o700


def test_hooks_per_vm_or_default(tmp_path: Path) -> None:
    f = tmp_path / "c.json"
    f.write_text(json.dumps({"hooks": {"db": {"pre": "a", "post": "b"}, "*": {"pre": "c"}}}))
    cfg = config.load(config_file=str(f))
    assert cfg.hooks_for("db") == {"pre": "a", "post": "b"}
    assert cfg.hooks_for("web") == {"pre": "c"}
    f.write_text(json.dumps({"hooks": {"db": {"pre": 1}}}))
    with pytest.raises(UsageError, match="hooks"):
        config.load(config_file=str(f))

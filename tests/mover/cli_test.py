"""``ferry image backup|restore|list|delete``, ``ferry prune``, ``ferry check`` end to end.

Most cases call the CLI's ``main()`` in-process (the same parser, commands and error mapping, without paying
the interpreter start for every command); a few run the real ``ferry`` executable, and
``badinput_test.py`` runs every bad input through it.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

MiB = 1024 * 1024
FERRY = [str(Path(sys.executable).parent / "ferry")]


def ferry(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run ``ferry ARGS`` in-process; with ``check``, fail the test (showing stderr) on a non-zero exit."""
    from control.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main(list(args))
        except SystemExit as e:  # argparse errors and --help
            rc = int(e.code or 0)
    p = subprocess.CompletedProcess(["ferry", *args], rc, out.getvalue(), err.getvalue())
    if check and p.returncode != 0:
        pytest.fail(f"ferry {' '.join(args)} exited {p.returncode}: {p.stderr}")
    return p


def ferry_json(*args: str) -> Any:
    return json.loads(ferry(*args, "--json").stdout)


def one_line_error(p: subprocess.CompletedProcess[str]) -> str:
    """The single ``ferry: error:`` line of a failed command (no traceback, nothing else)."""
    assert p.returncode != 0
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, p.stderr
    assert lines[0].startswith("ferry: error: "), p.stderr
    return lines[0]


def sha(path: str | Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def make_image(path: Path, size: int, seed: int) -> None:
    """Random data in the first half, text in a middle stretch, a hole at the end."""
    rnd = hashlib.shake_256(seed.to_bytes(4, "little")).digest(size // 2)
    with open(path, "wb") as f:
        f.truncate(size)
        f.write(rnd)
        f.write(b"log line %d\n" * (size // 64))


def test_round_trip(tmp_path: Path) -> None:
    store = str(tmp_path / "store")
    img = tmp_path / "disk.img"
    make_image(img, 16 * MiB, seed=1)
    b1 = ferry_json("image", "backup", str(img), "--store", store, "--block-size", "128K",
                    "--label", "vm=web", "--label", "disk=0")
    assert b1["block_size"] == 128 * 1024 and b1["labels"] == {"vm": "web", "disk": "0"}
    assert b1["kind"] == "full" and b1["stats"]["zero"] > 0
    with open(img, "r+b") as f:
        f.seek(MiB)
        f.write(os.urandom(65536))
    changed = tmp_path / "changed.json"
    changed.write_text(json.dumps([{"start": MiB, "length": 65536, "dirty": True, "zero": False}]))
    b2 = ferry_json("image", "backup", str(img), "--store", store, "--base", b1["id"], "--changed", str(changed))
    assert b2["kind"] == "incremental" and b2["base"] == b1["id"]
    assert b2["stats"]["read"] == 128 * 1024  # one block re-read, no more

    listed = ferry_json("image", "list", "--store", store)
    assert [b["id"] for b in listed] == [b1["id"], b2["id"]]
    out = tmp_path / "out.img"
    r = ferry_json("image", "restore", b2["id"], str(out), "--store", store)
    assert r["size"] == 16 * MiB
    assert sha(out) == sha(img)

    # human output: a table with the id
    p = ferry("image", "list", "--store", store)
    assert b1["id"] in p.stdout and "incremental" in p.stdout
    assert "ok" in ferry("check", "--store", store, "--read-data").stdout

    ferry("image", "delete", b1["id"], "--store", store)
    assert [b["id"] for b in ferry_json("image", "list", "--store", store)] == [b2["id"]]
    pr = ferry_json("prune", "--store", store)
    assert isinstance(pr, dict)
    out.unlink()
    ferry("image", "restore", b2["id"], str(out), "--store", store)  # still whole after prune
    assert sha(out) == sha(img)
    assert ferry_json("check", "--store", store, "--read-data")["ok"] is True


def test_store_env_default(tmp_path: Path) -> None:
    img = tmp_path / "disk.img"
    make_image(img, 2 * MiB, seed=2)
    env = dict(os.environ, FERRY_STORE=str(tmp_path / "store"))
    p = subprocess.run([*FERRY, "image", "backup", str(img), "--json"], capture_output=True, text=True, env=env,
                       timeout=60)
    assert p.returncode == 0, p.stderr
    assert (tmp_path / "store" / "config.json").exists()


USAGE_ERRORS = [
    (["image", "restore", "nosuchbackup", "OUT"], 5, "backup nosuchbackup not found"),
    (["image", "delete", "nosuchbackup"], 5, "not found"),
    (["image", "backup", "IMG", "--changed", "CHANGED"], 2, "--changed needs --base"),
    (["image", "backup", "IMG", "--base", "nosuch"], 5, "backup nosuch not found"),
    (["image", "backup", "IMG", "--base", "BASE", "--changed", "BADJSON"], 2, "not valid JSON"),
    (["image", "backup", "IMG", "--block-size", "1M"], 2, "--block-size only applies to a new store"),
]


def test_usage_errors(tmp_path: Path) -> None:
    store = str(tmp_path / "store")
    img = tmp_path / "disk.img"
    make_image(img, 2 * MiB, seed=3)
    base = ferry_json("image", "backup", str(img), "--store", store)["id"]
    changed = tmp_path / "c.json"
    changed.write_text("[]")
    bad = tmp_path / "bad.json"
    bad.write_text("[{")
    subst = {"IMG": str(img), "OUT": str(tmp_path / "out.img"), "CHANGED": str(changed), "BASE": base,
             "BADJSON": str(bad)}
    for args, code, text in USAGE_ERRORS:
        p = ferry(*[subst.get(a, a) for a in args], "--store", store, check=False)
        assert p.returncode == code, (args, p.stderr)
        assert text in one_line_error(p)
    assert [b["id"] for b in ferry_json("image", "list", "--store", store)] == [base]  # nothing added


def test_no_store(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "FERRY_STORE"}
    p = subprocess.run([*FERRY, "image", "list"], capture_output=True, text=True, env=env, timeout=60)
    assert p.returncode == 2
    assert "--store" in one_line_error(p)
    p = ferry("check", "--store", str(tmp_path / "nothing"), check=False)
    assert p.returncode == 4 and "no store here" in one_line_error(p)
    assert not (tmp_path / "nothing").exists()  # commands other than backup never create a store


def test_restore_does_not_clobber(tmp_path: Path) -> None:
    store = str(tmp_path / "store")
    img = tmp_path / "disk.img"
    make_image(img, 2 * MiB, seed=4)
    b = ferry_json("image", "backup", str(img), "--store", store)
    precious = tmp_path / "precious.img"
    precious.write_bytes(b"important")
    p = ferry("image", "restore", b["id"], str(precious), "--store", store, check=False)
    assert "--force" in one_line_error(p)
    assert precious.read_bytes() == b"important"
    ferry("image", "restore", b["id"], str(precious), "--store", store, "--force")
    assert sha(precious) == sha(img)


def test_help_texts(capsys: pytest.CaptureFixture[str]) -> None:
    from control.cli import main

    for cmd in (["image", "backup"], ["image", "restore"], ["image", "list"], ["image", "delete"], ["prune"],
                ["check"]):
        with pytest.raises(SystemExit) as exc:
            main([*cmd, "--help"])
        assert exc.value.code == 0
        out = capsys.readouterr().out
        assert "--store" in out and "--json" in out
        if cmd == ["image", "backup"]:
            assert "--changed" in out and "--base" in out


def test_block_devices(tmp_path: Path) -> None:
    """A loop device backed up with O_DIRECT and restored onto another loop device holding junk."""
    src_img, dst_img, small_img = tmp_path / "src.img", tmp_path / "dst.img", tmp_path / "small.img"
    make_image(src_img, 8 * MiB, seed=5)
    dst_img.write_bytes(os.urandom(8 * MiB))
    small_img.write_bytes(os.urandom(4 * MiB))
    devs: list[str] = []
    try:
        for f in (src_img, dst_img, small_img):
            devs.append(subprocess.run(["losetup", "-f", "--show", str(f)], check=True, capture_output=True,
                                       text=True).stdout.strip())
        store = str(tmp_path / "store")
        b = ferry_json("image", "backup", devs[0], "--direct", "--store", store)
        assert b["source"] == devs[0] and b["stats"]["read"] == 8 * MiB and b["stats"]["zero"] > 0
        ferry("image", "restore", b["id"], devs[1], "--store", store)
        assert sha(devs[1]) == sha(src_img)
        before = sha(devs[2])
        p = ferry("image", "restore", b["id"], devs[2], "--store", store, check=False)
        assert p.returncode == 3 and "device holds 4194304 bytes" in one_line_error(p)
        assert sha(devs[2]) == before  # refused before writing anything
    finally:
        for d in devs:
            subprocess.run(["losetup", "-d", d], check=False)

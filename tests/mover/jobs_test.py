"""The job API: subjects, round trips, and clear errors on malformed messages."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mover import jobs
from mover.jobs import ExportJob, JobProgress, JobResult, MalformedMessage, RestoreJob, parse_job

SOURCE = {"type": "imageio", "transfer_url": "https://host:54322/images/abc", "proxy_url": None,
          "ca_pem": "-----BEGIN CERTIFICATE-----", "size": 1 << 30, "format": "raw", "dirty": False}  # fmt: skip


def export(**kw: Any) -> ExportJob:
    args: dict[str, Any] = {"job_id": "j1", "backup_id": "b1", "disk_id": "d1", "store": "file:///srv/store",
                            "source": dict(SOURCE)}  # fmt: skip
    return ExportJob(**(args | kw))


def test_subjects() -> None:
    assert jobs.job_subject("imageio") == "ferry.jobs.imageio"
    assert jobs.job_subject("attach", "vm-1") == "ferry.jobs.attach.vm-1"
    assert jobs.job_subject("store") == "ferry.jobs.store"
    assert jobs.dead_subject("ferry.jobs.attach.vm-1") == "ferry.dead.attach.vm-1"
    assert jobs.consumer_name("ferry.jobs.attach.vm-1") == "mover-attach-vm-1"
    assert jobs.result_subject("j1") == "ferry.events.result.j1"
    assert jobs.progress_subject("j1") == "ferry.events.progress.j1"
    assert jobs.backup_subject("b-1") == "ferry.events.backup.b-1"
    with pytest.raises(MalformedMessage, match="proxy"):
        jobs.job_subject("attach")
    with pytest.raises(MalformedMessage, match="unknown capability"):
        jobs.job_subject("ftp")
    with pytest.raises(MalformedMessage, match="must be"):
        jobs.result_subject("a.b")  # would add a subject token
    assert jobs.store_path("file:///srv/store") == "/srv/store"
    assert jobs.store_path("/srv/store") == "/srv/store"
    with pytest.raises(MalformedMessage, match="only local"):
        jobs.store_path("s3://bucket")


def test_round_trips() -> None:
    job = export(base="prev", changed=True, labels={"vm": "web"}, source=SOURCE | {"dirty": True})
    assert parse_job(job.to_json()) == job
    assert json.loads(job.to_json())["kind"] == "export"
    assert job.capability == "imageio"
    r = RestoreJob("j2", "r1", "d1", "/srv/store", "sb1", dict(SOURCE))
    assert parse_job(r.to_json()) == r
    c = jobs.CheckJob("j3", "/srv/store", read_data=True)
    assert parse_job(c.to_json()) == c and c.capability == "store"
    p = jobs.PruneJob("j4", "/srv/store", delete=["x", "y"])
    assert parse_job(p.to_json()) == p
    res = JobResult("j1", "export", True, store_backup_id="sb", stats={"read": 1})
    assert JobResult.from_json(res.to_json()) == res
    prog = JobProgress("j1", 5, 10, 2, 1.5)
    assert JobProgress.from_json(prog.to_json()) == prog
    trig = jobs.BackupTrigger("web", "imageio", "full")
    assert jobs.BackupTrigger.from_json(trig.to_json()) == trig


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        (b"not json", "not JSON"),
        (b"[1]", "expected a JSON object"),
        (b'{"kind": "explode"}', "kind 'explode'"),
        (export().to_json().replace(b'"job_id":"j1",', b""), "missing field 'job_id'"),
        (export().to_json().replace(b'"j1"', b'"a b"'), "job_id 'a b'"),
        (export().to_json().replace(b'"size":1073741824', b'"size":"big"'), "source.size: expected an integer"),
        (export().to_json().replace(b'"size":1073741824', b'"size":0'), "size must be positive"),
        (export().to_json().replace(b'"https://host', b'"ftp://host'), "transfer_url must be an http"),
        (export().to_json().replace(b'"format":"raw"', b'"format":"vmdk"'), "format must be"),
        (export().to_json().replace(b'"type":"imageio"', b'"type":"tape"'), "source.type 'tape'"),
        (export().to_json().replace(b'"dirty":false', b'"dirty":true'), "dirty needs a base"),
        (export().to_json().replace(b'"dirty":false', b'"dirty":false,"shallow":true'), "shallow needs a base"),
        (export(base="b0").to_json().replace(b'"dirty":false', b'"dirty":true,"shallow":true'), "exclude"),
        (export().to_json().replace(b'"changed":false', b'"changed":"yes"'), "changed: expected true or false"),
        (export().to_json()[:-1] + b',"extra":1}', "unknown field"),
    ],
)
def test_malformed(raw: bytes, match: str) -> None:
    with pytest.raises(MalformedMessage, match=match) as e:
        parse_job(raw)
    assert "\n" not in str(e.value) and not e.value.retryable


def test_job_id_of_malformed() -> None:
    assert jobs.job_id_of(b'{"job_id": "j9", "kind": "nope"}') == "j9"
    assert jobs.job_id_of(b"garbage") is None
    assert jobs.job_id_of(b'{"job_id": "a.b"}') is None


def test_failed_result_needs_error() -> None:
    with pytest.raises(MalformedMessage, match="needs an error"):
        JobResult.from_dict({"job_id": "j", "kind": "export", "ok": False})


@given(st.dictionaries(st.text(max_size=8), st.one_of(st.none(), st.integers(), st.text(max_size=8)), max_size=6))
def test_random_objects_never_crash(data: dict[str, Any]) -> None:
    # Whatever arrives, parsing either gives a job or a MalformedMessage: never another exception.
    for kind in ("export", "restore", "check", "prune"):
        try:
            parse_job(json.dumps(data | {"kind": kind}))
        except MalformedMessage:
            pass

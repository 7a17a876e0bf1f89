"""Fixtures of the control-plane tests: a real lab (engine, imageio daemons, storage) per module."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from lab import client as labclient
from tests.control.plane import Plane


@pytest.fixture(scope="package")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[labclient.Lab]:
    d = tmp_path_factory.mktemp("lab")
    handle = labclient.up(d)
    try:
        yield handle
    finally:
        labclient.down(d)


@pytest.fixture
def lab_engine_args(lab: labclient.Lab) -> dict[str, str]:
    return {"url": lab.url, "user": lab.user, "password": lab.password, "ca_file": lab.ca_file}


def free_dir(tmp_path: Path, name: str) -> Path:
    p = tmp_path / name
    p.mkdir()
    return p


@pytest.fixture(scope="package")
def plane(lab: labclient.Lab, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Plane]:
    p = Plane(tmp_path_factory.mktemp("plane"), lab)
    try:
        yield p
    finally:
        p.close()

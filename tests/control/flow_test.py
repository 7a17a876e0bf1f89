"""The flow frame: steps in order, states recorded, clean-up LIFO, on-failure only after a failure,
every clean-up runs even when one fails, and the original error is what the flow raises."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from control.errors import FlowError
from control.flows.base import Flow


class Recorder(Flow):
    kind = "test"

    def __init__(self, fail_at: str | None = None, cleanup_fails: str | None = None) -> None:
        super().__init__("f1")
        self.fail_at = fail_at
        self.cleanup_fails = cleanup_fails
        self.log: list[str] = []
        self.states: list[str] = []
        self.outcome: bool | None = None

    def _act(self, name: str) -> Callable[[], None]:
        def act() -> None:
            if name == self.cleanup_fails:
                raise RuntimeError(f"{name} broke")
            self.log.append(name)
        return act

    def steps(self) -> list[tuple[str, Callable[[], None]]]:
        def lock() -> None:
            self.always("unlock", self._act("unlock"))

        def snap() -> None:
            self.on_failure("remove snapshot", self._act("remove snapshot"))
            if self.fail_at == "snap":
                raise RuntimeError("snapshot failed")

        def transfer() -> None:
            c = self.on_failure("cancel transfer", self._act("cancel transfer"))
            if self.fail_at == "transfer":
                raise RuntimeError("transfer hung")
            self.discharge(c)  # finalized on the normal path

        return [("lock", lock), ("snap", snap), ("transfer", transfer)]

    def record_state(self, state: str) -> None:
        self.states.append(state)

    def finished(self, ok: bool) -> None:
        self.outcome = ok


def test_success_runs_only_always_cleanups() -> None:
    f = Recorder()
    f.run()
    assert f.log == ["unlock"]
    assert f.states == ["lock", "snap", "transfer", "succeeded"]
    assert f.outcome is True


def test_failure_runs_cleanups_in_reverse_and_raises_first_error() -> None:
    f = Recorder(fail_at="transfer")
    with pytest.raises(FlowError, match=r"transfer hung \(in step transfer\)"):
        f.run()
    assert f.log == ["cancel transfer", "remove snapshot", "unlock"]
    assert f.states[-2:] == ["cleanup", "failed"]
    assert f.outcome is False


def test_failing_cleanup_does_not_stop_the_others() -> None:
    f = Recorder(fail_at="transfer", cleanup_fails="remove snapshot")
    with pytest.raises(FlowError, match="transfer hung"):
        f.run()
    assert f.log == ["cancel transfer", "unlock"]
    assert f.cleanup_report.failed == {"remove snapshot": "RuntimeError: remove snapshot broke"}


def test_failure_before_a_resource_does_not_clean_it() -> None:
    f = Recorder(fail_at="snap")
    with pytest.raises(FlowError):
        f.run()
    assert f.log == ["remove snapshot", "unlock"]  # no transfer was started, none is cancelled

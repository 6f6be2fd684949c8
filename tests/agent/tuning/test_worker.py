"""The tuning thread: ``maintain()`` only wakes it (the agent's timer never waits for a tick), and a
tick that fails in a way the unit did not expect is counted and logged once while it repeats, and
tuning runs on (it used to end tuning for the agent's lifetime)."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest

from agent.tuning.unit import TuningUnit
from agent.tuning.worker import TuningThread
from host.paths import HostPaths
from tests.agent.tuning.hosttree import make_host
from tests.agent.tuning.test_unit import metrics


def wait_ticks(worker: TuningThread, n: int) -> None:
    deadline = time.monotonic() + 30
    while worker.ticks < n:
        assert time.monotonic() < deadline, f"{worker.ticks} tick(s), waited for {n}"
        time.sleep(0.01)


def test_an_unexpected_failure_is_counted_logged_once_and_tuning_runs_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    unit = TuningUnit(HostPaths(make_host(tmp_path / "host")), None, "observe")
    real = unit.maintain
    failures = [3]

    def flaky() -> None:
        if failures[0]:
            failures[0] -= 1
            raise RuntimeError("a bug in a tick")
        real()

    monkeypatch.setattr(unit, "maintain", flaky)
    worker = TuningThread(unit)
    with caplog.at_level(logging.ERROR, logger="agent.tuning.worker"):
        worker.start()
        try:
            for n in range(1, 5):
                wait_ticks(worker, n)
                worker.maintain()
            wait_ticks(worker, 4)
        finally:
            worker.close()
    assert metrics(unit)["nodetune_tuning_errors_total"][(("item", "engine"),)] == 3
    assert len([r for r in caplog.records if r.exc_info]) == 1  # one traceback, not one per tick
    assert metrics(unit)["nodetune_tuning_in_sync"]  # the fourth tick ran: tuning is alive

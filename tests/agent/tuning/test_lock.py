"""One writer per host, with two real processes: a second apply waits for the first and builds on
its journal (the originals stay the host's, not the first writer's values); a writer held up too
long gets exit 3 (CLI) or ``errors_total{item="lock"}`` (agent) and changes nothing; ``verify``
never "finishes" a run another process is still applying."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.tuning import lock
from agent.tuning.unit import TuningUnit
from host.paths import HostPaths
from tests.agent.tuning.hosttree import make_host, snapshot, value
from tests.agent.tuning.stepper import REPO, argv
from tests.agent.tuning.test_engine import tune
from tests.agent.tuning.test_unit import metrics
from tests.conftest import free_port

P1 = "name: p1\nsysctl: {net.core.somaxconn: '>=8192', vm.max_map_count: '262144'}"
P2 = "name: p2\nsysctl: {net.core.somaxconn: '>=9000', net.ipv4.ip_local_port_range: '10240 65000'}"
ORIGINAL = {
    "proc/sys/net/core/somaxconn": "4096",
    "proc/sys/vm/max_map_count": "65530",
    "proc/sys/net/ipv4/ip_local_port_range": "32768 60999",
}


def wait_for(condition, what: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


@pytest.fixture
def paused_apply(tmp_path: Path) -> Iterator[tuple[Path, Path, subprocess.Popen]]:
    """A first writer (a real process) paused inside its run, holding the lock: somaxconn written."""
    host = make_host(tmp_path / "host")
    gate = tmp_path / "gate"
    gate.mkdir()
    (tmp_path / "p1.yaml").write_text(P1)
    first = subprocess.Popen(
        argv(host, "apply", tmp_path / "p1.yaml", pause_at="write sysctl/net.core.somaxconn", gate=str(gate)), cwd=REPO
    )
    try:
        wait_for(lambda: (gate / "paused").exists() or first.poll() is not None, "the first writer to pause")
        assert first.poll() is None
        yield host, gate, first
    finally:
        (gate / "go").touch()
        first.wait(timeout=60)


def test_a_second_writer_waits_and_journals_the_hosts_originals(tmp_path: Path, paused_apply) -> None:
    host, gate, first = paused_apply
    assert value(host, "proc/sys/net/core/somaxconn") == "8192"  # the first writer's value, mid-run
    (tmp_path / "p2.yaml").write_text(P2)
    with open(tmp_path / "second.err", "w") as err:
        second = subprocess.Popen(
            [sys.executable, "-m", "agent.cli", "tune", "apply", "--profile", str(tmp_path / "p2.yaml"),
             "--host-root", str(host)],
            cwd=REPO, stdout=subprocess.DEVNULL, stderr=err,
        )  # fmt: skip
    try:
        wait_for(
            lambda: "waiting for the tuning lock" in (tmp_path / "second.err").read_text() or second.poll() is not None,
            "the second writer to wait",
        )
        assert second.poll() is None, (tmp_path / "second.err").read_text()  # it waits; it did not go ahead
        (gate / "go").touch()
        assert first.wait(timeout=60) == 0
        assert second.wait(timeout=60) == 0, (tmp_path / "second.err").read_text()
    finally:
        if second.poll() is None:
            second.kill()
            second.wait()
    journal = json.loads((host / "var/lib/nodetune/tuning-journal.json").read_text())
    originals = {k: e["original"] for k, e in journal["entries"].items()}
    # somaxconn: the host's 4096, not the first writer's 8192; max_map_count (dropped by p2) released
    assert originals == {"sysctl/net.core.somaxconn": "4096", "sysctl/net.ipv4.ip_local_port_range": "32768 60999"}
    assert value(host, "proc/sys/net/core/somaxconn") == "9000"
    assert value(host, "proc/sys/vm/max_map_count") == "65530"
    assert tune("revert", host, None)[0] == 0
    assert {rel: value(host, rel) for rel in ORIGINAL} == ORIGINAL


def test_a_writer_held_up_too_long_changes_nothing_and_says_so(
    tmp_path: Path, paused_apply, monkeypatch: pytest.MonkeyPatch
) -> None:
    host, _, _ = paused_apply
    monkeypatch.setattr(lock, "DEFAULT_TIMEOUT_S", 0.3)
    before = snapshot(host)
    code, _, err = tune("apply", host, P2, tmp=tmp_path)
    assert code == 3 and "lock" in err and "nothing was changed" in err
    code, _, err = tune("verify", host, P1, tmp=tmp_path)  # must not "finish" the first writer's run
    assert code == 3 and "lock" in err
    code, _, err = tune("revert", host, None, tmp=tmp_path)
    assert code == 3 and "lock" in err
    assert snapshot(host) == before  # the first writer's run is intact: journal, values
    profile = tmp_path / "agent.yaml"
    profile.write_text(P2)
    unit = TuningUnit(HostPaths(host), profile, "enforce")
    unit.maintain()
    assert metrics(unit)["nodetune_tuning_errors_total"][(("item", "lock"),)] == 1
    assert snapshot(host) == before


def test_the_lock_dies_with_its_holder(tmp_path: Path, paused_apply, monkeypatch: pytest.MonkeyPatch) -> None:
    """A writer SIGKILLed while it holds the lock does not leave the host locked: the next one gets
    the lock at once and finishes (undoes) the killed run. While the holder lives, the lock is held
    (the old test passed without any lock: it only checked the recovery)."""
    host, _, first = paused_apply
    monkeypatch.setattr(lock, "DEFAULT_TIMEOUT_S", 0.3)
    code, _, err = tune("verify", host, P1, tmp=tmp_path)
    assert code == 3 and "lock" in err, err  # held by the paused writer
    first.kill()  # SIGKILL, inside its run
    assert first.wait(timeout=60) == -9
    monkeypatch.setattr(lock, "DEFAULT_TIMEOUT_S", 10.0)
    code, _, err = tune("verify", host, P1, tmp=tmp_path)
    assert code == 1 and "interrupted" in err, err
    assert {rel: value(host, rel) for rel in ORIGINAL} == ORIGINAL


def test_an_agent_and_the_cli_racing_one_writer_at_a_time(tmp_path: Path, paused_apply) -> None:
    """Two real processes, agent vs CLI (the issue's surge/operator case): `nodetune run --mode
    enforce` starts while `nodetune tune apply` holds the lock mid-run; the agent waits, then
    builds on the CLI's journal: its originals are the host's, never the CLI's values."""
    host, gate, first = paused_apply
    (tmp_path / "p2.yaml").write_text(P2)
    port = free_port()
    with open(tmp_path / "agent.err", "w") as err:
        agent = subprocess.Popen(
            [sys.executable, "-m", "agent.cli", "run", "--listen", f"127.0.0.1:{port}", "--profile",
             str(tmp_path / "p2.yaml"), "--mode", "enforce", "--host-root", str(host), "--probes", "none",
             "--collectors", "none", "--cache-dir", str(tmp_path / "cache")],
            cwd=REPO, stdout=subprocess.DEVNULL, stderr=err,
        )  # fmt: skip
    try:
        log = tmp_path / "agent.err"
        wait_for(
            lambda: "waiting for the tuning lock" in log.read_text() or agent.poll() is not None, "the agent to wait"
        )
        assert agent.poll() is None, log.read_text()
        assert value(host, "proc/sys/net/ipv4/ip_local_port_range") == "32768 60999"  # it did not go ahead
        (gate / "go").touch()
        assert first.wait(timeout=60) == 0
        path = host / "var/lib/nodetune/tuning-journal.json"
        wait_for(
            lambda: (
                path.exists()
                and json.loads(path.read_text())["profile"] == "p2"
                and not json.loads(path.read_text())["applying"]
            ),
            "the agent's apply",
        )
    finally:
        agent.terminate()
        agent.wait(timeout=30)
    journal = json.loads(path.read_text())
    originals = {k: e["original"] for k, e in journal["entries"].items()}
    assert originals == {"sysctl/net.core.somaxconn": "4096", "sysctl/net.ipv4.ip_local_port_range": "32768 60999"}
    assert value(host, "proc/sys/net/core/somaxconn") == "9000"
    assert value(host, "proc/sys/net/ipv4/ip_local_port_range") == "10240 65000"
    assert tune("revert", host, None)[0] == 0
    assert {rel: value(host, rel) for rel in ORIGINAL} == ORIGINAL


def test_the_cli_lock_timeout_flag_is_checked_before_the_host_is_touched(tmp_path) -> None:
    from agent.cli import main

    profile = tmp_path / "p.yaml"
    profile.write_text("name: p\nsysctl:\n  vm.swappiness: '10'\n")
    host = tmp_path / "host"
    (host / "proc/sys/vm").mkdir(parents=True)
    (host / "proc/sys/vm/swappiness").write_text("60\n")
    argv = ["tune", "apply", "--profile", str(profile), "--host-root", str(host), "--lock-timeout", "-1"]
    assert main(argv) == 2
    assert (host / "proc/sys/vm/swappiness").read_text() == "60\n"
    assert main([*argv[:-1], "0.5"]) == 0
    assert (host / "proc/sys/vm/swappiness").read_text().strip() == "10"

"""Crash recovery across several runs with overlapping keys: a run SIGKILLed after any of its steps
is undone to the state before it - every key as the previous run left it, including keys an earlier
run journaled (their originals untouched) and keys the run was releasing - or, killed after its
last step, is complete. Never a mix. Afterwards a revert still restores the host's true originals.
(README "Tuning", "Crash recovery".)"""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

from agent.tuning.engine import Engine
from agent.tuning.profile import parse
from agent.tuning.validate import build
from host.paths import HostPaths
from tests.agent.tuning.hosttree import make_host, value
from tests.agent.tuning.stepper import killed_in_child
from tests.agent.tuning.test_engine import semantic, tune

P1 = "name: p1\nsysctl: {net.core.somaxconn: '>=8192', vm.max_map_count: '262144'}\nthp: {enabled: never}"
# p2 keeps somaxconn (raised further), drops max_map_count and thp.enabled, adds two keys
P2 = (
    "name: p2\nsysctl: {net.core.somaxconn: '>=9000', net.ipv4.ip_local_port_range: '10240 65000'}\n"
    "thp: {defrag: never}"
)
# p3 overlaps both: somaxconn again, max_map_count back, the port range changed
P3 = (
    "name: p3\nsysctl: {net.core.somaxconn: '>=10000', vm.max_map_count: '300000', "
    "net.ipv4.ip_local_port_range: '20000 60000'}\nthp: {defrag: never}"
)
FILES = (
    "proc/sys/net/core/somaxconn",
    "proc/sys/vm/max_map_count",
    "proc/sys/net/ipv4/ip_local_port_range",
    "sys/kernel/mm/transparent_hugepage/enabled",
    "sys/kernel/mm/transparent_hugepage/defrag",
)


def state(host: Path) -> dict[str, str]:
    return semantic({rel: value(host, rel) for rel in FILES})


def steps_of(host: Path, text: str) -> list[str]:
    """The steps of an uninterrupted run of ``text`` on a copy of ``host``."""
    copy = host.parent / "steps-copy"
    shutil.copytree(host, copy, symlinks=True)
    (profile,) = parse(text)
    steps: list[str] = []
    Engine(HostPaths(copy), build(profile, HostPaths(copy))[0], profile.name, on_step=steps.append).apply()
    shutil.rmtree(copy)
    return steps


def test_sigkill_after_each_step_of_a_second_and_third_apply(tmp_path: Path) -> None:
    base = make_host(tmp_path / "base")
    original = state(base)
    checked = 0
    for previous, crashed in (([P1], P2), ([P1, P2], P3)):
        host = tmp_path / "host"
        shutil.rmtree(host, ignore_errors=True)
        shutil.copytree(base, host, symlinks=True)
        for text in previous:
            assert tune("apply", host, text, tmp=tmp_path)[0] == 0
        before = state(host)
        steps = steps_of(host, crashed)
        assert any(s.startswith("release") for s in steps) or crashed is P3
        snapshot_dir = tmp_path / "before-run"
        shutil.rmtree(snapshot_dir, ignore_errors=True)
        shutil.copytree(host, snapshot_dir, symlinks=True)
        after = None
        for step in steps:
            shutil.rmtree(host)
            shutil.copytree(snapshot_dir, host, symlinks=True)
            status = killed_in_child(host, "apply", crashed, step)
            assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, step
            code, _, err = tune("verify", host, crashed, tmp=tmp_path)  # the next start recovers
            now = state(host)
            if step == "done":
                after = now
                assert code == 0 and now != before, step
            else:
                assert now == before, (step, now, before)  # all of the previous run's values
                assert "was interrupted" in err, step
            assert tune("revert", host, None, tmp=tmp_path)[0] == 0
            assert state(host) == original, step  # the journal still holds the true originals
            checked += 1
        assert after is not None
    assert checked >= 15


def test_sigkill_during_a_revert_leaves_the_profile_applied(tmp_path: Path) -> None:
    """A revert is a run too: cut short, it is undone (all-desired), and the next revert completes."""
    base = make_host(tmp_path / "base")
    original = state(base)
    assert tune("apply", base, P1, tmp=tmp_path)[0] == 0
    applied = state(base)
    steps: list[str] = []
    copy = tmp_path / "copy"
    shutil.copytree(base, copy, symlinks=True)
    Engine(HostPaths(copy), [], on_step=steps.append).revert()
    assert steps[-1] == "done" and len(steps) >= 6
    for step in steps[:-1]:
        host = tmp_path / "host"
        shutil.rmtree(host, ignore_errors=True)
        shutil.copytree(base, host, symlinks=True)
        status = killed_in_child(host, "revert", None, step)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, step
        assert tune("verify", host, P1, tmp=tmp_path)[0] == 0, step  # undone: the profile holds
        assert state(host) == applied, step
        assert tune("revert", host, None, tmp=tmp_path)[0] == 0
        assert state(host) == original, step


def test_an_interrupted_run_in_a_version_1_journal_is_undone(tmp_path: Path) -> None:
    """A journal written before the undo log (version 1) is read: its run's own entries are undone."""
    host = make_host(tmp_path / "host")
    (host / "proc/sys/net/core/somaxconn").write_text("8192\n")
    path = host / "var/lib/nodetune/tuning-journal.json"
    path.parent.mkdir(parents=True)
    entries = {"sysctl/net.core.somaxconn": {"original": "4096", "run": 1}}
    data = {"version": 1, "boot_id": "11111111-2222-3333-4444-555555555555", "profile": "p", "run": 1}
    path.write_text(json.dumps({**data, "applying": 1, "entries": entries}))
    code, _, err = tune("verify", host, P1, tmp=tmp_path)
    assert code == 1 and "was interrupted" in err
    assert value(host, "proc/sys/net/core/somaxconn") == "4096"

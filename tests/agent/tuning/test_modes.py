"""Observe and enforce when a profile changes or disappears, and what the unit counts and logs:
observe never writes (even when its profile file is removed); enforce reverts a removed profile
whole and a key dropped from a profile that stays alone; errors are labelled by item; a bad reload
keeps the last good profile and logs once."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from agent.tuning.engine import Engine
from agent.tuning.journal import Journal
from agent.tuning.profile import parse
from agent.tuning.unit import TuningUnit
from agent.tuning.validate import build
from host.paths import HostPaths
from tests.agent.tuning.hosttree import make_host, snapshot, value
from tests.agent.tuning.test_engine import tune
from tests.agent.tuning.test_unit import configmap, metrics

SOMAXCONN = "proc/sys/net/core/somaxconn"
MAPS = "proc/sys/vm/max_map_count"


def test_observe_never_writes_even_when_its_profile_is_removed(tmp_path: Path) -> None:
    """The issue's reproduction: `tune apply`, then an observe agent on the same profile, then the
    profile file removed: the applied values stay (the old unit reverted after 3 ticks)."""
    host = make_host(tmp_path / "host")
    text = "name: p1\nsysctl: {net.core.somaxconn: '>=8192'}"
    assert tune("apply", host, text, tmp=tmp_path)[0] == 0
    assert value(host, SOMAXCONN) == "8192"
    profile = configmap(tmp_path / "cm", text, 1)
    unit = TuningUnit(HostPaths(host), profile, "observe", removed_ticks=3)
    unit.maintain()
    before = snapshot(host)
    os.unlink(tmp_path / "cm/..data")
    for _ in range(6):
        unit.maintain()
    assert snapshot(host) == before  # journal and values: not a byte changed
    assert value(host, SOMAXCONN) == "8192"
    assert "nodetune_tuning_profile_info" not in metrics(unit)  # no profile in force, reported


def test_enforce_reverts_a_removed_profile_whole(tmp_path: Path) -> None:
    host = make_host(tmp_path / "host")
    profile = configmap(
        tmp_path / "cm", "name: p1\nsysctl: {net.core.somaxconn: '>=8192', vm.max_map_count: '262144'}", 1
    )
    unit = TuningUnit(HostPaths(host), profile, "enforce", removed_ticks=2)
    unit.maintain()
    assert (value(host, SOMAXCONN), value(host, MAPS)) == ("8192", "262144")
    os.unlink(tmp_path / "cm/..data")
    unit.maintain()
    unit.maintain()
    assert (value(host, SOMAXCONN), value(host, MAPS)) == ("4096", "65530")
    assert not (host / "var/lib/nodetune/tuning-journal.json").exists()


def test_enforce_reverts_a_key_dropped_from_a_profile_that_stays_and_only_that_key(tmp_path: Path) -> None:
    host = make_host(tmp_path / "host")
    now = [0.0]
    profile = configmap(
        tmp_path / "cm", "name: p1\nsysctl: {net.core.somaxconn: '>=8192', vm.max_map_count: '262144'}", 1
    )
    unit = TuningUnit(HostPaths(host), profile, "enforce", clock=lambda: now[0])
    unit.maintain()
    assert (value(host, SOMAXCONN), value(host, MAPS)) == ("8192", "262144")
    configmap(tmp_path / "cm", "name: p1\nsysctl: {net.core.somaxconn: '>=8192'}", 2)  # max_map_count dropped
    now[0] += 1  # within the drift rate limit: a new profile applies at once all the same
    unit.maintain()
    assert value(host, MAPS) == "65530"  # back to its original
    assert value(host, SOMAXCONN) == "8192"  # still the profile's
    code, out, _ = tune("revert", host, None)
    assert code == 0 and "reverted 1 key(s)" in out  # only somaxconn was still journaled
    assert value(host, SOMAXCONN) == "4096"


def test_errors_are_counted_under_the_items_name_and_the_message_does_not_claim_a_rollback(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A revert that cannot write: the label is the item ('sysctl'), not text cut from the message,
    and the log says it was not put back."""
    host = make_host(tmp_path / "host")
    profile = configmap(tmp_path / "cm", "name: p1\nsysctl: {net.core.somaxconn: '>=8192'}", 1)
    unit = TuningUnit(HostPaths(host), profile, "enforce", removed_ticks=1)
    unit.maintain()
    os.unlink(tmp_path / "cm/..data")
    (host / SOMAXCONN).unlink()
    (host / SOMAXCONN).mkdir()  # the original can no longer be written (EISDIR)
    try:
        with caplog.at_level(logging.ERROR, logger="agent.tuning.unit"):
            unit.maintain()
            unit.maintain()
    finally:
        (host / SOMAXCONN).rmdir()
    errors = metrics(unit)["nodetune_tuning_errors_total"]
    assert errors[(("item", "sysctl"),)] == 2
    assert all("sysctl/" not in dict(k)["item"] and ":" not in dict(k)["item"] for k in errors)
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(lines) == 1, lines  # the same failure every tick: one line
    assert "rolled back" not in lines[0] and "revert failed" in lines[0]


def test_a_bad_reload_keeps_the_last_good_profile_reports_it_and_logs_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    host = make_host(tmp_path / "host")
    now = [0.0]
    profile = configmap(tmp_path / "cm", "name: p1\nsysctl: {net.core.somaxconn: '>=8192'}", 1)
    unit = TuningUnit(HostPaths(host), profile, "enforce", clock=lambda: now[0], reapply_interval_s=1)
    unit.maintain()
    assert metrics(unit)["nodetune_tuning_profile_valid"] == {(): 1}
    configmap(tmp_path / "cm", "name: p2\nsysctl: {net.core.somaxconn: '>=abc'}", 2)
    with caplog.at_level(logging.DEBUG):
        for _ in range(4):
            now[0] += 2
            (host / SOMAXCONN).write_text("128\n")  # drift: the last good profile still fixes it
            unit.maintain()
            assert value(host, SOMAXCONN) == "8192"
    m = metrics(unit)
    assert m["nodetune_tuning_profile_valid"] == {(): 0}
    assert m["nodetune_tuning_errors_total"][(("item", "profile"),)] == 1
    assert m["nodetune_tuning_profile_info"] == {(("mode", "enforce"), ("profile", "p1")): 1}
    rejected = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(rejected) == 1 and rejected[0].exc_info is None and ">=abc" in rejected[0].getMessage()


def test_a_dropped_key_that_left_the_host_does_not_block_the_next_apply(tmp_path: Path) -> None:
    """A journaled IRQ or sysctl whose file is gone (NIC removed, module unloaded) is dropped from
    the journal with a note, instead of failing every apply from then on."""
    host = make_host(tmp_path / "host")
    assert tune("apply", host, "name: p\nsysctl: {net.core.somaxconn: '>=8192', vm.max_map_count: '262144'}")[0] == 0
    (host / MAPS).unlink()  # gone from the host
    code, _, err = tune("apply", host, "name: p\nsysctl: {net.core.somaxconn: '>=9000'}")
    assert code == 0 and "sysctl/vm.max_map_count no longer exists on the host" in err
    assert value(host, SOMAXCONN) == "9000"
    assert tune("revert", host, None)[0] == 0
    assert value(host, SOMAXCONN) == "4096"


def test_an_enforce_tick_finishes_a_run_another_process_left_half_done(tmp_path: Path) -> None:
    """Review #4: an enforce agent in sync never loaded the journal (only apply() did), so a CLI
    apply killed after its first write stayed half done. Each enforce tick now finishes it."""
    host = make_host(tmp_path / "host")
    profile = configmap(tmp_path / "cm", "name: p1\nsysctl: {net.core.somaxconn: '>=8192'}", 1)
    unit = TuningUnit(HostPaths(host), profile, "enforce", reapply_interval_s=3600)
    unit.maintain()
    assert value(host, SOMAXCONN) == "8192"

    def killed(step: str) -> None:
        if step == "write sysctl/vm.max_map_count":
            raise KeyboardInterrupt  # stands for SIGKILL: nothing after this step runs

    th = HostPaths(host)
    items, _ = build(parse("name: cli\nsysctl: {vm.max_map_count: '262144', net.core.rmem_max: '425984'}")[0], th)
    with pytest.raises(KeyboardInterrupt):
        Engine(th, items, "cli", on_step=killed).apply()
    assert value(host, MAPS) == "262144"  # half a run: max_map_count written, rmem_max not
    unit.maintain()
    assert value(host, MAPS) == "65530"  # undone: all-original for the interrupted run
    j = Journal.load(host / "var/lib/nodetune", th.boot_id())
    assert j.applying is None and "sysctl/vm.max_map_count" not in j.entries
    assert value(host, SOMAXCONN) == "8192"  # the agent's own change stays


def test_an_enforce_agent_without_a_profile_in_force_never_reverts_the_hosts_journal(tmp_path: Path) -> None:
    """Review #10: no profile matched the node's labels (so nothing applied), the file then removed:
    at tick == removed_ticks the agent reverted what `nodetune tune` had applied."""
    host = make_host(tmp_path / "host")
    assert tune("apply", host, "name: cli\nsysctl: {net.core.somaxconn: '>=8192'}", tmp=tmp_path)[0] == 0
    profile = configmap(tmp_path / "cm", "name: p1\nselector: {role: db}\nsysctl: {vm.max_map_count: '262144'}", 1)
    unit = TuningUnit(HostPaths(host), profile, "enforce", node_labels=lambda: {"role": "web"}, removed_ticks=2)
    unit.maintain()
    assert unit.profile is None
    before = snapshot(host)
    os.unlink(tmp_path / "cm/..data")
    for _ in range(5):
        unit.maintain()
    assert snapshot(host) == before
    assert value(host, SOMAXCONN) == "8192"


def test_observe_reports_a_run_cut_short_without_writing_and_every_tick_is_timestamped(tmp_path: Path) -> None:
    """Lesser points: observe never reported an interrupted run; nothing said the tuning thread was
    stuck. ``interrupted_run`` is read without the lock; ``last_tick_timestamp_seconds`` moves."""
    host = make_host(tmp_path / "host")
    profile = configmap(tmp_path / "cm", "name: p1\nsysctl: {net.core.somaxconn: '>=8192'}", 1)
    unit = TuningUnit(HostPaths(host), profile, "observe")
    assert metrics(unit)["nodetune_tuning_last_tick_timestamp_seconds"] == {(): 0}
    unit.maintain()
    first = metrics(unit)["nodetune_tuning_last_tick_timestamp_seconds"][()]
    assert first > 0 and metrics(unit)["nodetune_tuning_interrupted_run"] == {(): 0}

    def killed(step: str) -> None:
        if step == "write sysctl/vm.max_map_count":
            raise KeyboardInterrupt

    th = HostPaths(host)
    items, _ = build(parse("name: cli\nsysctl: {vm.max_map_count: '262144'}")[0], th)
    with pytest.raises(KeyboardInterrupt):
        Engine(th, items, "cli", on_step=killed).apply()
    before = snapshot(host)
    unit.maintain()
    assert metrics(unit)["nodetune_tuning_interrupted_run"] == {(): 1}
    assert metrics(unit)["nodetune_tuning_last_tick_timestamp_seconds"][()] >= first
    assert snapshot(host) == before  # observe: reported, not finished

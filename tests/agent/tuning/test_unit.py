"""The agent's tuning unit on fixture trees: observe reports and never writes, enforce applies and
re-applies drift (rate-limited), a ConfigMap-style ``..data`` swap is picked up, an invalid
profile keeps the last good one in force."""

from __future__ import annotations

import os
from pathlib import Path

from agent.tuning.unit import TuningUnit
from host.paths import HostPaths
from tests.agent.tuning.hosttree import make_host, snapshot, value


def metrics(unit: TuningUnit) -> dict[str, dict[tuple, float]]:
    out: dict[str, dict[tuple, float]] = {}
    for family in unit.collect():
        for s in family.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


def configmap(dirpath: Path, text: str, version: int) -> Path:
    """Write a profile the way the kubelet updates a ConfigMap volume: a new timestamped directory,
    then an atomic swap of the ``..data`` symlink; the file is a symlink through ``..data``."""
    data = dirpath / f"..2026_11_23_{version}"
    data.mkdir(parents=True)
    (data / "profile.yaml").write_text(text)
    tmp = dirpath / "..data_tmp"
    tmp.symlink_to(data.name)
    os.replace(tmp, dirpath / "..data")
    link = dirpath / "profile.yaml"
    if not link.is_symlink():
        link.symlink_to("..data/profile.yaml")
    return link


def test_observe_reports_and_changes_nothing(tmp_path: Path) -> None:
    host = make_host(tmp_path / "host")
    profile = configmap(
        tmp_path / "cm", "name: p1\nsysctl: {net.core.somaxconn: '>=8192', vm.max_map_count: '65530'}", 1
    )
    before = snapshot(host)
    unit = TuningUnit(HostPaths(host), profile, "observe")
    unit.maintain()
    m = metrics(unit)
    assert m["nodetune_tuning_in_sync"] == {
        (("item", "sysctl"), ("key", "net.core.somaxconn")): 0,
        (("item", "sysctl"), ("key", "vm.max_map_count")): 1,
    }
    assert m["nodetune_tuning_profile_info"] == {(("mode", "observe"), ("profile", "p1")): 1}
    assert m["nodetune_tuning_profile_valid"] == {(): 1}
    assert snapshot(host) == before


def test_enforce_applies_fixes_drift_rate_limited_and_follows_the_configmap(tmp_path: Path) -> None:
    host = make_host(tmp_path / "host")
    now = [1000.0]
    profile = configmap(tmp_path / "cm", "name: p1\nsysctl: {net.core.somaxconn: '>=8192'}", 1)
    unit = TuningUnit(HostPaths(host), profile, "enforce", reapply_interval_s=60, clock=lambda: now[0])
    unit.maintain()
    assert value(host, "proc/sys/net/core/somaxconn") == "8192"
    assert metrics(unit)["nodetune_tuning_changes_total"][(("item", "sysctl"),)] == 1
    (host / "proc/sys/net/core/somaxconn").write_text("128\n")  # drift
    now[0] += 5
    unit.maintain()  # within the rate limit: reported, not yet fixed
    assert value(host, "proc/sys/net/core/somaxconn") == "128"
    assert metrics(unit)["nodetune_tuning_in_sync"][(("item", "sysctl"), ("key", "net.core.somaxconn"))] == 0
    now[0] += 60
    unit.maintain()
    assert value(host, "proc/sys/net/core/somaxconn") == "8192"
    assert metrics(unit)["nodetune_tuning_changes_total"][(("item", "sysctl"),)] == 2
    # The kubelet swaps ..data: the new profile is read on the next tick.
    configmap(tmp_path / "cm", "name: p2\nsysctl: {net.core.somaxconn: '>=9000'}", 2)
    now[0] += 60
    unit.maintain()
    assert unit.profile is not None and unit.profile.name == "p2"
    assert value(host, "proc/sys/net/core/somaxconn") == "9000"
    # An invalid update: reported, the last good profile stays in force.
    configmap(tmp_path / "cm", "name: p3\nsysctl: {net.core.no_such: '1'}", 3)
    (host / "proc/sys/net/core/somaxconn").write_text("128\n")
    now[0] += 60
    unit.maintain()
    m = metrics(unit)
    assert m["nodetune_tuning_profile_valid"] == {(): 0}
    assert m["nodetune_tuning_errors_total"][(("item", "profile"),)] == 1
    assert unit.profile.name == "p2" and value(host, "proc/sys/net/core/somaxconn") == "9000"


def test_built_in_profile_without_a_file_observes(tmp_path: Path) -> None:
    host = make_host(tmp_path / "host")
    before = snapshot(host)
    unit = TuningUnit(HostPaths(host), None, "observe")
    unit.maintain()
    m = metrics(unit)
    assert m["nodetune_tuning_profile_info"] == {(("mode", "observe"), ("profile", "nodetune-default")): 1}
    assert m["nodetune_tuning_in_sync"][(("item", "thp"), ("key", "enabled"))] == 0
    assert snapshot(host) == before
    assert unit.collect() and m == metrics(unit)  # a scrape reads: the same twice


def test_a_removed_profile_is_reverted_after_a_few_ticks_not_at_once(tmp_path: Path) -> None:
    host = make_host(tmp_path / "host")
    profile = configmap(tmp_path / "cm", "name: p1\nsysctl: {net.core.somaxconn: '>=8192'}", 1)
    unit = TuningUnit(HostPaths(host), profile, "enforce", removed_ticks=3)
    unit.maintain()
    assert value(host, "proc/sys/net/core/somaxconn") == "8192"
    os.unlink(tmp_path / "cm/..data")  # the ConfigMap's key is gone
    unit.maintain()
    unit.maintain()
    assert value(host, "proc/sys/net/core/somaxconn") == "8192"  # two ticks: could be a swap
    unit.maintain()
    assert value(host, "proc/sys/net/core/somaxconn") == "4096"  # third: reverted
    assert not (host / "var/lib/nodetune/tuning-journal.json").exists()
    assert "nodetune_tuning_profile_info" not in metrics(unit)  # no profile in force
    unit.maintain()  # and only once
    configmap(tmp_path / "cm", "name: p2\nsysctl: {net.core.somaxconn: '>=9000'}", 2)  # back again
    unit.maintain()
    assert value(host, "proc/sys/net/core/somaxconn") == "9000"


def test_a_scrape_racing_a_removed_profile_reports_one_consistent_state(tmp_path: Path) -> None:
    """Review #9: collect() read ``self.profile`` twice; the tuning thread setting it to None in
    between (``_removed``) made the scrape raise AttributeError. The interleaving is forced here:
    the attribute turns None right after its first read."""
    host = make_host(tmp_path / "host")
    profile = configmap(tmp_path / "cm", "name: p1\nsysctl: {net.core.somaxconn: '>=8192'}", 1)
    unit = TuningUnit(HostPaths(host), profile, "observe")
    unit.maintain()

    class Racing(TuningUnit):
        reads = 0

        @property
        def profile(self):  # the tuning thread's write lands between two reads
            Racing.reads += 1
            return self.__dict__["_p"] if Racing.reads == 1 else None

        @profile.setter
        def profile(self, value) -> None:
            self.__dict__["_p"] = value

    p = unit.profile
    unit.__class__ = Racing
    unit.__dict__["_p"] = p
    m = metrics(unit)  # raised AttributeError: 'NoneType' object has no attribute 'name'
    assert m["nodetune_tuning_profile_info"] == {(("mode", "observe"), ("profile", "p1")): 1}

"""Throttling collector: equal to the kernel's cpu.stat at the read, on the real v1 cpu hierarchy
(these hosts bind cpu to v1) and on a v2 fixture tree; monotonic across container restarts."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from agent.collectors.throttling import ThrottlingCollector, parse_stat
from agent.identity.workloads import Workloads
from host.paths import HostPaths
from tests.conftest import BUSY, SpreadCgroup, wait_until

POD = "pod0a1b2c3d-0000-4000-8000-0000000000aa"


def family(collector: ThrottlingCollector, name: str) -> dict[tuple[str, ...], float]:
    for metric in collector.collect():
        if metric.name == name:
            return {
                (s.labels["namespace"], s.labels["pod"], s.labels["container"], s.labels["cgroup"]): s.value
                for s in metric.samples
            }
    return {}


@pytest.fixture
def v1_pod():
    paths = HostPaths()
    if paths.cgroup_v1("cpu") is None:
        pytest.skip("no v1 cpu hierarchy")
    made: list[SpreadCgroup] = []
    roots = [r for r in (paths.cgroup_v1("cpu"), paths.cgroup_v1("cpuacct")) if r is not None]

    def make(container: str) -> SpreadCgroup:
        top = f"/nodetune-test-thr-{uuid.uuid4().hex[:8]}"
        cg = SpreadCgroup(roots, f"{top}/kubepods/burstable/{POD}/{container}")
        made.append(cg)
        return cg

    yield make
    for cg in made:
        cg.remove()


@pytest.mark.root
def test_exported_counters_lie_between_two_reads_of_cpu_stat(v1_pod) -> None:
    paths = HostPaths()
    cg = v1_pod("c" * 64)
    cpu_dir = cg.dirs[0]
    (cpu_dir / "cpu.cfs_quota_us").write_text("10000")  # 10 % of one CPU, period 100 ms
    cg.spawn(BUSY)
    wait_until(  # a busy loop with a 10 % quota is throttled in most periods
        lambda: parse_stat((cpu_dir / "cpu.stat").read_text())["nr_throttled"] > 5, what="6 throttled periods"
    )
    collector = ThrottlingCollector(paths, Workloads(None))
    try:
        assert collector.hierarchy == "cpu"
        labels = ("", "", "", cg.rel)
        before = parse_stat((cpu_dir / "cpu.stat").read_text())
        usage_before = int((cg.dirs[-1] / "cpuacct.usage").read_text())
        families = {
            m.name: {
                tuple(s.labels[k] for k in ("namespace", "pod", "container", "cgroup")): s.value for s in m.samples
            }
            for m in collector.collect()
        }
        after = parse_stat((cpu_dir / "cpu.stat").read_text())
        usage_after = int((cg.dirs[-1] / "cpuacct.usage").read_text())
    finally:
        collector.close()
    periods = families["nodetune_cpu_cfs_periods"][labels]
    throttled = families["nodetune_cpu_cfs_throttled_periods"][labels]
    throttled_s = families["nodetune_cpu_cfs_throttled_seconds"][labels]
    usage_s = families["nodetune_cpu_usage_seconds"][labels]
    assert before["nr_periods"] <= periods <= after["nr_periods"]
    assert before["nr_throttled"] <= throttled <= after["nr_throttled"]
    assert before["throttled_time"] / 1e9 <= throttled_s <= after["throttled_time"] / 1e9
    assert usage_before / 1e9 <= usage_s <= usage_after / 1e9
    assert throttled > 5
    assert families["nodetune_cpu_limit_cores"][labels] == pytest.approx(0.1)
    if "nr_bursts" in after:
        assert families["nodetune_cpu_cfs_burst_cores"][labels] == 0.0


@pytest.mark.root
def test_unlimited_cgroups(v1_pod) -> None:
    """An unlimited pod container: series but no limit gauge. An unlimited host cgroup: nothing."""
    paths = HostPaths()
    cg = v1_pod("d" * 64)
    host = paths.cgroup_v1("cpu") / f"nodetune-test-host-{uuid.uuid4().hex[:8]}"
    host.mkdir()
    collector = ThrottlingCollector(paths, Workloads(None))
    try:
        periods = family(collector, "nodetune_cpu_cfs_periods")
        limits = family(collector, "nodetune_cpu_limit_cores")
        assert ("", "", "", cg.rel) in periods and ("", "", "", cg.rel) not in limits
        assert not any(lbl[3].startswith("/" + host.name) for lbl in periods)
    finally:
        collector.close()
        host.rmdir()


def v2_tree(tmp_path: Path) -> Path:
    root = tmp_path / "sys/fs/cgroup"
    root.mkdir(parents=True)
    (root / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
    return root


def v2_cgroup(root: Path, rel: str, usage: int, periods: int, throttled: int, quota: str = "50000 100000") -> Path:
    d = root / rel.lstrip("/")
    d.mkdir(parents=True)
    (d / "cpu.stat").write_text(
        f"usage_usec {usage}\nuser_usec 1\nsystem_usec 2\nnr_periods {periods}\nnr_throttled {throttled}\n"
        f"throttled_usec {throttled * 1000}\nnr_bursts 3\nburst_usec 4000\n"
    )
    (d / "cpu.max").write_text(quota + "\n")
    (d / "cpu.max.burst").write_text("20000\n")
    return d


class Names:
    version = 1

    def names(self, pod_uid: str, container_id: str) -> tuple[str, str, str] | None:
        return ("cache", "redis-0", "redis" if container_id else "")


def test_v2_files_are_read_in_their_units(tmp_path: Path) -> None:
    root = v2_tree(tmp_path)
    pod = f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-{POD.replace('-', '_')}.slice"
    v2_cgroup(root, pod, usage=10, periods=1, throttled=0, quota="max 100000")
    v2_cgroup(root, pod + "/cri-containerd-" + "e" * 64 + ".scope", usage=2_500_000, periods=70, throttled=7)
    v2_cgroup(root, "/system.slice/limited.service", usage=5, periods=2, throttled=1)
    v2_cgroup(root, "/system.slice/free.service", usage=5, periods=0, throttled=0, quota="max 100000")
    collector = ThrottlingCollector(HostPaths(tmp_path), Workloads(None, pod_names=Names()))
    try:
        assert collector.hierarchy == "unified"
        m = parse_metrics_of(collector)
    finally:
        collector.close()
    redis, pod_level = ("cache", "redis-0", "redis", ""), ("cache", "redis-0", "", "")
    assert m["nodetune_cpu_usage_seconds"][redis] == 2.5
    assert m["nodetune_cpu_cfs_periods"][redis] == 70 and m["nodetune_cpu_cfs_throttled_periods"][redis] == 7
    assert m["nodetune_cpu_cfs_throttled_seconds"][redis] == 0.007
    assert m["nodetune_cpu_limit_cores"][redis] == 0.5 and pod_level not in m["nodetune_cpu_limit_cores"]
    assert m["nodetune_cpu_cfs_burst_cores"][redis] == 0.2
    assert m["nodetune_cpu_cfs_bursts"][redis] == 3 and m["nodetune_cpu_cfs_burst_seconds"][redis] == 0.004
    assert pod_level in m["nodetune_cpu_cfs_periods"]  # pod level, container="" as cAdvisor
    host = ("", "", "", "/system.slice/limited.service")
    assert host in m["nodetune_cpu_cfs_periods"]
    assert ("", "", "", "/system.slice/free.service") not in m["nodetune_cpu_cfs_periods"]


def parse_metrics_of(collector: ThrottlingCollector) -> dict[str, dict[tuple[str, ...], float]]:
    out: dict[str, dict[tuple[str, ...], float]] = {}
    for metric in collector.collect():
        for s in metric.samples:
            key = tuple(s.labels[k] for k in ("namespace", "pod", "container", "cgroup"))
            out.setdefault(s.name.removesuffix("_total"), {})[key] = s.value
    return out


def test_container_restart_continues_the_counters(tmp_path: Path) -> None:
    root = v2_tree(tmp_path)
    pod = f"/kubepods/burstable/{POD}"
    first = v2_cgroup(root, pod + "/" + "a" * 64, usage=1000, periods=50, throttled=10)
    collector = ThrottlingCollector(HostPaths(tmp_path), Workloads(None, pod_names=Names()))
    redis = ("cache", "redis-0", "redis", "")
    try:
        collector.maintain()
        assert parse_metrics_of(collector)["nodetune_cpu_cfs_periods"][redis] == 50
        for f in first.iterdir():
            f.unlink()
        first.rmdir()  # the container restarts: its cgroup goes, a new one with the same names comes
        assert parse_metrics_of(collector)["nodetune_cpu_cfs_periods"][redis] == 50  # before the tick: last values
        v2_cgroup(root, pod + "/" + "b" * 64, usage=10, periods=3, throttled=1)
        collector.maintain()
        m = parse_metrics_of(collector)
        assert m["nodetune_cpu_cfs_periods"][redis] == 53 and m["nodetune_cpu_cfs_throttled_periods"][redis] == 11
    finally:
        collector.close()


def test_an_overflowed_change_log_is_resynced_from_the_tree(tmp_path: Path) -> None:
    """More changes between two ticks than the collector's log holds: it is told its log
    overflowed, forgets what it kept of cgroups no longer in the tree and goes on counting."""
    root = v2_tree(tmp_path)
    pod = f"/kubepods/burstable/{POD}"
    first = v2_cgroup(root, pod + "/" + "a" * 64, usage=1000, periods=50, throttled=10)
    collector = ThrottlingCollector(HostPaths(tmp_path), Workloads(None, pod_names=Names()))
    collector.changes.limit = 0  # any change overflows it
    redis = ("cache", "redis-0", "redis", "")
    fresh = None
    try:
        collector.maintain()
        assert parse_metrics_of(collector)["nodetune_cpu_cfs_periods"][redis] == 50
        for f in first.iterdir():
            f.unlink()
        first.rmdir()
        v2_cgroup(root, pod + "/" + "b" * 64, usage=10, periods=3, throttled=1)
        collector.maintain()
        m = parse_metrics_of(collector)
        assert m["nodetune_cpu_cfs_periods"][redis] == 53 and m["nodetune_cpu_cfs_throttled_periods"][redis] == 11
        fresh = ThrottlingCollector(HostPaths(tmp_path), Workloads(None, pod_names=Names()))
        fresh.maintain()
        assert collector.reader.files.kept() == fresh.reader.files.kept()  # nothing kept of the removed one
    finally:
        collector.close()
        if fresh is not None:
            fresh.close()

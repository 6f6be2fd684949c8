"""Throttling under cgroup churn: a cgroup made again at the same path between two timer ticks is
a new member of its label set (its predecessor's final counts stay), and nothing is kept of a
cgroup once it is gone — misses included."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from agent.collectors.throttling import KeptFiles, ThrottlingCollector
from agent.identity.workloads import Workloads
from host.paths import HostPaths
from tests.conftest import BUSY, SpreadCgroup, wait_until


def usage(collector: ThrottlingCollector, cgroup: str) -> float:
    for metric in collector.collect():
        if metric.name == "nodetune_cpu_usage_seconds":
            for s in metric.samples:
                if s.labels["cgroup"] == cgroup:
                    return s.value
    raise AssertionError(f"no usage series for {cgroup}")


@pytest.mark.root
def test_a_cgroup_made_again_at_its_path_between_ticks_never_takes_the_counters_back() -> None:
    paths = HostPaths()
    cpu, cpuacct = paths.cgroup_v1("cpu"), paths.cgroup_v1("cpuacct")
    if cpu is None:
        pytest.skip("no v1 cpu hierarchy")
    roots = [r for r in (cpu, cpuacct) if r is not None]
    rel = f"/nodetune-test-thr-{uuid.uuid4().hex[:8]}/redis.service"  # a host unit with CPUQuota=

    def start() -> SpreadCgroup:
        cg = SpreadCgroup(roots, rel)
        (cg.dirs[0] / "cpu.cfs_quota_us").write_text("20000")
        cg.spawn(BUSY)
        return cg

    first = start()
    second = None
    collector = ThrottlingCollector(paths, Workloads(None))
    try:
        acct = Path(str(cpuacct if cpuacct is not None else cpu) + rel)
        wait_until(lambda: int((acct / "cpuacct.usage").read_text()) > 50_000_000)  # 50 ms of CPU
        collector.maintain()
        before = usage(collector, rel)
        assert before >= 0.05
        first.remove()  # a restart of the unit: the cgroup goes and comes back at the same path
        first = None
        second = start()
        wait_until(lambda: int((acct / "cpuacct.usage").read_text()) > 0)
        seen = [usage(collector, rel), usage(collector, rel)]  # two scrapes between ticks
        collector.maintain()
        seen.append(usage(collector, rel))
        wait_until(lambda: int((acct / "cpuacct.usage").read_text()) > 10_000_000)
        seen.append(usage(collector, rel))
    finally:
        collector.close()
        for cg in (first, second):
            if cg is not None:
                cg.remove()
    print("usage before the restart", before, "after", seen)
    assert all(a <= b for a, b in zip([before, *seen], seen, strict=False)), (before, seen)
    assert seen[-1] >= before + 0.01  # the new cgroup's usage is added to the old one's


def test_forget_drops_everything_kept_of_a_cgroup_misses_included(tmp_path: Path) -> None:
    cg = tmp_path / "cg"
    cg.mkdir()
    (cg / "cpu.max").write_text("max 100000\n")
    files = KeptFiles()
    assert files.read_settled(str(cg), "cpu.max") == "max 100000\n"
    assert files.read_settled(str(cg), "cpu.max.burst") is None  # no burst file: a miss, kept
    assert files.read_settled(str(tmp_path / "other"), "cpu.max") is None  # no such cgroup
    assert files.kept() == 2
    files.forget(str(cg))
    files.forget(str(tmp_path / "other"))
    assert files.kept() == 0
    files.close()


def test_ident_tells_apart_two_files_made_at_one_path(tmp_path: Path) -> None:
    files = KeptFiles()
    (tmp_path / "cpu.stat").write_text("nr_periods 1\n")
    files.read(str(tmp_path), "cpu.stat")
    first = files.ident(str(tmp_path), "cpu.stat")
    keep = tmp_path / "kept"  # keep the old inode in use so the new file cannot reuse its number
    (tmp_path / "cpu.stat").rename(keep)
    (tmp_path / "cpu.stat").write_text("nr_periods 2\n")
    files.forget(str(tmp_path))
    files.read(str(tmp_path), "cpu.stat")
    assert first != 0 and files.ident(str(tmp_path), "cpu.stat") not in (0, first)
    files.close()

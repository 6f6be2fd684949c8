"""runqlat: rendering (pure) and the loaded probe on the real kernel, every attach strategy."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from probes.base import CgroupLabeler, KernelFacts, ProbeUnavailable
from probes.btf import BTFError, Member
from probes.headers import HeadersNotFound
from probes.histogram import NSLOTS
from probes.runqlat import RAW_TRACEPOINT, TRACEPOINT, RunqlatProbe, pid_slots_for
from tests.conftest import BUSY, SLEEPER, run_delay_ns


@dataclass
class FakeBTF:
    """The few BTF facts runqlat asks for, with a 6.18-like layout."""

    sched_info: bool = True
    gap: int = 8
    task_btf_helper: bool = True

    def member(self, struct: str, name: str) -> Member:
        table = {
            ("task_struct", "sched_info"): Member(1008, 48),
            ("sched_info", "pcount"): Member(0, 8),
            ("sched_info", "run_delay"): Member(self.gap, 8),
        }
        if (struct, name) not in table or (not self.sched_info and name == "sched_info"):
            raise BTFError(f"struct {struct} has no member {name!r}")
        return table[(struct, name)]

    def has_function(self, name: str) -> bool:
        return self.task_btf_helper and name == "bpf_get_current_task_btf"


def fake_kernel(tmp_path: Path, btf: FakeBTF | None) -> KernelFacts:
    proc = tmp_path / "proc/sys/kernel"
    proc.mkdir(parents=True)
    (proc / "pid_max").write_text("4194304\n")
    k = KernelFacts(
        release="6.18.0-test",
        host_root=tmp_path,
        sys_root=tmp_path / "sys",
        proc_root=tmp_path / "proc",
        cache_dir=tmp_path,
    )
    k.__dict__["btf"] = btf  # cached_property override: no kernel needed
    return k


def test_pid_slots_cover_pid_max_up_to_the_cap() -> None:
    assert pid_slots_for(32768, 1 << 18) == 32768
    assert pid_slots_for(40000, 1 << 18) == 65536
    assert pid_slots_for(4194304, 1 << 18) == 1 << 18
    assert pid_slots_for(10, 1 << 18) == 1024


def test_render_raw_tracepoint_uses_sched_info_offsets_from_btf(tmp_path: Path) -> None:
    probe = RunqlatProbe(fake_kernel(tmp_path, FakeBTF()), max_cgroups=64)
    text, cflags = probe.render(RAW_TRACEPOINT)
    assert "RAW_TRACEPOINT_PROBE(sched_switch)" in text
    assert cflags == [
        "-DPID_SLOTS=262144",
        "-DMAX_CGROUPS=64",
        "-DSTRATEGY_SCHEDINFO",
        "-DSCHED_INFO_OFF=1008",
        "-DRUN_DELAY_GAP=8",
        "-DTASK_BTF",
    ]


def test_render_raw_tracepoint_probe_read_path_before_5_11(tmp_path: Path) -> None:
    _, cflags = RunqlatProbe(fake_kernel(tmp_path, FakeBTF(task_btf_helper=False))).render(RAW_TRACEPOINT)
    assert "-DSTRATEGY_SCHEDINFO" in cflags and "-DTASK_BTF" not in cflags


@pytest.mark.parametrize(
    ("btf", "reason"),
    [
        (None, "no kernel BTF"),
        (FakeBTF(sched_info=False), "CONFIG_SCHED_INFO"),
        (FakeBTF(gap=12), "unexpected struct sched_info layout"),
    ],
)
def test_raw_tracepoint_unsupported_says_why(tmp_path: Path, btf: FakeBTF | None, reason: str) -> None:
    probe = RunqlatProbe(fake_kernel(tmp_path, btf))
    assert reason in (probe.unsupported(RAW_TRACEPOINT) or "")
    assert probe.unsupported(TRACEPOINT) is None
    with pytest.raises(ValueError, match=reason):
        probe.render(RAW_TRACEPOINT)


def test_render_tracepoint_needs_no_btf(tmp_path: Path) -> None:
    probe = RunqlatProbe(fake_kernel(tmp_path, None))
    _, cflags = probe.render(TRACEPOINT)
    assert "-DSTRATEGY_TP" in cflags and "-DTASK_REPORT_MASK=0xff" in cflags
    with pytest.raises(ValueError):
        probe.render("kprobe")


def test_unknown_strategy_filter_is_rejected(tmp_path: Path) -> None:
    probe = RunqlatProbe(fake_kernel(tmp_path, FakeBTF()), only_strategies=("fentry",))
    with pytest.raises(ValueError, match="unknown attach strategies"):
        probe._candidates()


def test_load_without_headers_is_unavailable_not_a_crash(tmp_path: Path) -> None:
    kernel = fake_kernel(tmp_path, FakeBTF())
    kernel.__dict__["headers"] = HeadersNotFound("no headers here")
    with pytest.raises(ProbeUnavailable, match="no headers here"):
        RunqlatProbe(kernel).load()


# --- on the real kernel -------------------------------------------------------------------------
class IdLabeler(CgroupLabeler):
    """Labels = the cgroup id itself; None for ids in ``gone``."""

    label_names = ("cgroup_id",)

    def __init__(self) -> None:
        self.gone: set[int] = set()

    def labels_for_cgroup_id(self, cgroup_id: int) -> tuple[str, ...] | None:
        return None if cgroup_id in self.gone else (str(cgroup_id),)


def loaded(strategies: tuple[str, ...], tmp_path: Path, **kw: object) -> RunqlatProbe:
    probe = RunqlatProbe(KernelFacts(cache_dir=Path("/var/cache/nodetune")), IdLabeler(), strategies, **kw)
    probe.load()
    assert probe.attach == strategies[0]
    return probe


STRATEGY_CASES = [
    pytest.param((RAW_TRACEPOINT,), {}, id="raw_tracepoint"),
    pytest.param((RAW_TRACEPOINT,), {"task_btf": False}, id="raw_tracepoint-probe-read"),
    pytest.param((TRACEPOINT,), {}, id="tracepoint"),
]


@pytest.mark.bpf
@pytest.mark.parametrize(("strategies", "kw"), STRATEGY_CASES)
def test_histogram_sum_agrees_with_schedstat_run_delay(strategies, kw, tmp_path: Path, make_cgroup) -> None:
    """More busy tasks than CPUs on one CPU: in-kernel sum vs /proc/<pid>/schedstat, within 10%."""
    busy = make_cgroup("busy")
    probe = loaded(strategies, tmp_path, **kw)
    try:
        for _ in range(4):
            busy.spawn(BUSY, cpu=0)
        time.sleep(0.5)  # every task has run (and been seen) in its cgroup
        before_hist = probe.read_histograms().get(busy.id, ([0] * NSLOTS, 0))
        before_delay = run_delay_ns(busy.pids())
        time.sleep(3)
        after_hist = probe.read_histograms()[busy.id]
        after_delay = run_delay_ns(busy.pids())
    finally:
        probe.close()
    probe_ns = after_hist[1] - before_hist[1]
    kernel_ns = after_delay - before_delay
    count = sum(after_hist[0]) - sum(before_hist[0])
    assert kernel_ns > 3e9 * 0.5, f"busy tasks waited only {kernel_ns} ns: load not as designed"
    assert count > 100
    assert abs(probe_ns - kernel_ns) <= 0.10 * kernel_ns, f"probe {probe_ns} ns vs schedstat {kernel_ns} ns"


@pytest.mark.bpf
@pytest.mark.parametrize(("strategies", "kw"), STRATEGY_CASES)
def test_sleeping_task_is_attributed_to_its_own_cgroup(strategies, kw, tmp_path: Path, make_cgroup) -> None:
    """A woken task is counted in the cgroup it ran in, not its waker's (a timer softirq or kworker)."""
    idle = make_cgroup("idle")
    probe = loaded(strategies, tmp_path, **kw)
    try:
        idle.spawn(SLEEPER, cpu=max(os.sched_getaffinity(0)))
        time.sleep(2)
        hists = probe.read_histograms()
    finally:
        probe.close()
    slots, total_ns = hists[idle.id]
    assert sum(slots) >= 100  # ~250 wakeups/s
    assert total_ns / sum(slots) < 1e-3 * 1e9  # an idle CPU runs a woken task within a millisecond


@pytest.mark.bpf
def test_entries_of_removed_cgroups_are_dropped(tmp_path: Path, make_cgroup) -> None:
    cg = make_cgroup("gone")
    probe = loaded((RAW_TRACEPOINT,), tmp_path)
    try:
        cg.spawn(SLEEPER)
        time.sleep(1)
        cg_id = cg.id
        assert cg_id in probe.read_histograms()
        cg.remove()
        probe.labeler.gone.add(cg_id)
        list(probe.collect())  # first miss: kept (the cgroup might just be new)
        assert cg_id in probe.read_histograms()
        list(probe.collect())  # second miss in a row: deleted
        assert cg_id not in probe.read_histograms()
    finally:
        probe.close()


@pytest.mark.bpf
def test_bounded_cgroup_map_counts_what_it_drops(tmp_path: Path, make_cgroup) -> None:
    a, b = make_cgroup("a"), make_cgroup("b")
    probe = loaded((RAW_TRACEPOINT,), tmp_path, max_cgroups=1)
    try:
        a.spawn(SLEEPER)
        b.spawn(SLEEPER)
        time.sleep(1)
        assert len(probe.read_histograms()) == 1
        assert probe.read_stats()["cgroup_map_full"] > 0
    finally:
        probe.close()


@pytest.mark.bpf
@pytest.mark.parametrize(("strategies", "kw"), STRATEGY_CASES)
def test_row_of_a_removed_cgroup_is_zeroed_and_freed(strategies, kw, tmp_path: Path, make_cgroup) -> None:
    cg = make_cgroup("row")
    probe = loaded(strategies, tmp_path, **kw)
    try:
        cg.spawn(SLEEPER)
        time.sleep(1)
        rows, owner = probe.table("runqlat_cgroup_rows"), probe.table("runqlat_row_owner")
        hist, free = probe.table("runqueue_latency_seconds"), probe.table("runqlat_free_rows")
        cg_id = cg.id
        row = rows[rows.Key(cg_id)].value
        assert owner[owner.Key(row)].value == cg_id
        assert sum(sum(c.slots) for c in hist[hist.Key(row)]) > 0
        cg.remove()
        probe.labeler.gone.add(cg_id)
        list(probe.collect())
        list(probe.collect())  # second miss: unowned, unmapped, zeroed, freed
        assert owner[owner.Key(row)].value == 0
        assert cg_id not in {k.value for k, _ in rows.items()}
        assert all(c.sum_ns == 0 and not any(c.slots) for c in hist[hist.Key(row)])
        assert row in [v.value for v in free.values()]  # drains the queue: the probe closes next
    finally:
        probe.close()


@pytest.mark.bpf
def test_close_detaches_programs(tmp_path: Path) -> None:
    probe = loaded((RAW_TRACEPOINT,), tmp_path)
    fds = probe.program_fds()
    assert set(fds) == {"raw_tracepoint__sched_switch"}  # no wakeup hook: the kernel accounts the waits
    probe.close()
    probe.close()  # idempotent
    assert probe.program_fds() == {} and list(probe.collect()) == []

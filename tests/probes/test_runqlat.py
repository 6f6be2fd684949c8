"""runqlat: rendering (pure) and the loaded probe on the real kernel, every attach strategy."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from agent.identity.cgroup_hierarchy import CgroupHierarchy
from agent.identity.workloads import Workloads
from host.paths import HostPaths
from metrics.histogram import NSLOTS
from metrics.workload_series import Lookup
from probes.base import CPU_V1, CgroupLabeler, KernelFacts, ProbeUnavailable
from probes.btf import BTFError, Member
from probes.headers import HeadersNotFound
from probes.runqlat import HIST, RAW_TRACEPOINT, TRACEPOINT, RunqlatProbe, pid_slots_for
from probes.settings import SettingError
from tests.conftest import BUSY, SLEEPER, run_delay_ns, wait_until


@dataclass
class FakeBTF:
    """The few BTF facts runqlat asks for, with a 6.18-like layout."""

    sched_info: bool = True
    gap: int = 8
    task_btf_helper: bool = True

    def member(self, struct: str, name: str) -> Member:
        table = {
            ("task_struct", "sched_info"): Member(1008, 48),
            ("task_struct", "pid"): Member(1500, 4),
            ("sched_info", "pcount"): Member(0, 8),
            ("sched_info", "run_delay"): Member(self.gap, 8),
        }
        if (struct, name) not in table or (not self.sched_info and name == "sched_info"):
            raise BTFError(f"struct {struct} has no member {name!r}")
        return table[(struct, name)]

    def has_function(self, name: str) -> bool:
        return self.task_btf_helper and name == "bpf_get_current_task_btf"

    def enum_value(self, enum: str, name: str) -> int:
        raise BTFError(f"enum {enum} not in this fake")


def fake_kernel(tmp_path: Path, btf: FakeBTF | None) -> KernelFacts:
    proc = tmp_path / "proc/sys/kernel"
    proc.mkdir(parents=True, exist_ok=True)
    (proc / "pid_max").write_text("4194304\n")
    k = KernelFacts(release="6.18.0-test", host=HostPaths(tmp_path), cache_dir=tmp_path)
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
    assert "BPF_PERCPU_ARRAY(runqueue_latency_seconds, struct runqueue_latency_seconds_row, 64)" in text
    assert "static __always_inline u32 latency_slot(u64 ns)" in text  # the shared prelude comes first
    assert "BPF_PERCPU_ARRAY(runqueue_latency_seconds_cache, struct runqueue_latency_seconds_cache_entry, 256)" in text
    assert "runqlat_pid_slots" not in text.split("#ifdef STRATEGY_TP")[0]  # no per-task state
    assert cflags == [
        f"-DNSLOTS={NSLOTS}",
        "-DNSTATS=4",
        "-DSTAT_CGROUP_MAP_FULL=0",
        "-DSTAT_UNATTRIBUTED=1",
        "-DSTAT_PID_SLOT_EVICTED=2",
        "-DSTAT_NEXT_PROBE_READ=3",
        "-DTASK_BTF",  # plain loads through bpf_get_current_task_btf()
        "-DSTRATEGY_SCHEDINFO",
        "-DRUN_DELAY_OFF=1016",
        "-DTASK_PID_OFF=1500",
    ]


def test_render_raw_tracepoint_probe_reads_before_5_11(tmp_path: Path) -> None:
    _, cflags = RunqlatProbe(fake_kernel(tmp_path, FakeBTF(task_btf_helper=False))).render(RAW_TRACEPOINT)
    assert "-DSTRATEGY_SCHEDINFO" in cflags and "-DTASK_BTF" not in cflags


def test_settings_are_validated_by_the_probe(tmp_path: Path) -> None:
    with pytest.raises(SettingError, match="--runqlat-max-cgroups 0"):
        RunqlatProbe(fake_kernel(tmp_path, FakeBTF()), max_cgroups=0)
    with pytest.raises(SettingError, match="power of two"):
        RunqlatProbe(fake_kernel(tmp_path, FakeBTF()), max_pid_slots=3000)


def test_cpu_hierarchy_without_btf_offsets_fails_each_strategy_not_the_agent(
    tmp_path: Path, header_cache: Path
) -> None:
    """BTF errors happen inside the strategy attempt: every strategy is tried and reported."""
    kernel = fake_kernel(tmp_path, FakeBTF())
    kernel.workload_hierarchy = CPU_V1
    kernel.__dict__["headers"] = KernelFacts(cache_dir=header_cache).headers  # never /var/cache/nodetune
    with pytest.raises(ProbeUnavailable) as e:
        RunqlatProbe(kernel).load()
    assert "raw_tracepoint: BTFError" in e.value.reason and "tracepoint: BTFError" in e.value.reason


@pytest.mark.parametrize(
    ("btf", "reason"),
    [
        (None, "no kernel BTF"),
        (FakeBTF(sched_info=False), "CONFIG_SCHED_INFO"),
        (FakeBTF(gap=12), "unexpected layout"),
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
    """Labels = the cgroup id itself; gone for ids in ``gone``."""

    label_names = ("cgroup_id",)

    def __init__(self) -> None:
        self.gone: set[int] = set()

    def resolve(self, cgroup_id: int, check_gone: bool = True) -> Lookup:
        return Lookup((str(cgroup_id),), cgroup_id in self.gone)


def loaded(strategies: tuple[str, ...], cache: Path, labeler=None, kernel=None, **kw: object) -> RunqlatProbe:
    probe = RunqlatProbe(kernel or KernelFacts(cache_dir=cache), labeler or IdLabeler(), strategies, **kw)
    probe.load()
    assert probe.attach == strategies[0]
    return probe


def runs(pid: int) -> int:
    """Times the task was switched in (3rd field of /proc/<pid>/schedstat)."""
    return int(Path(f"/proc/{pid}/schedstat").read_text().split()[2])


def hist_of(probe: RunqlatProbe, cg_id: int) -> tuple[list[int], int]:
    return probe.histograms().get((str(cg_id),), ([0] * NSLOTS, 0))


STRATEGY_CASES = [
    pytest.param((RAW_TRACEPOINT,), {}, id="raw_tracepoint"),
    pytest.param((RAW_TRACEPOINT,), {"task_btf": False}, id="raw_tracepoint-probe-read"),
    pytest.param((TRACEPOINT,), {}, id="tracepoint"),
]


@pytest.mark.bpf
@pytest.mark.parametrize(("strategies", "kw"), STRATEGY_CASES)
def test_histogram_sum_agrees_with_schedstat_run_delay(strategies, kw, header_cache: Path, make_cgroup) -> None:
    """More busy tasks than CPUs on one CPU: in-kernel sum vs /proc/<pid>/schedstat, within 10%."""
    busy = make_cgroup("busy")
    probe = loaded(strategies, header_cache, **kw)
    try:
        for _ in range(4):
            busy.spawn(BUSY, cpu=0)
        time.sleep(0.5)  # every task has run (and been seen) in its cgroup
        before_hist = hist_of(probe, busy.id)
        before_delay = run_delay_ns(busy.pids())
        time.sleep(3)
        after_hist = hist_of(probe, busy.id)
        after_delay = run_delay_ns(busy.pids())
        stats = probe.read_stats()
    finally:
        probe.close()
    if strategies == (RAW_TRACEPOINT,) and probe.uses_task_btf():
        # the incoming task is reached through rq->curr with plain loads, not probe reads
        assert stats["next_probe_read"] <= 0.01 * sum(after_hist[0])
    probe_ns = after_hist[1] - before_hist[1]
    kernel_ns = after_delay - before_delay
    count = sum(after_hist[0]) - sum(before_hist[0])
    assert kernel_ns > 3e9 * 0.5, f"busy tasks waited only {kernel_ns} ns: load not as designed"
    assert count > 100
    print(
        f"{strategies[0]} {kw}: probe {probe_ns} ns vs schedstat {kernel_ns} ns "
        f"({(probe_ns / kernel_ns - 1) * 100:+.2f} %)"
    )
    assert abs(probe_ns - kernel_ns) <= 0.10 * kernel_ns, f"probe {probe_ns} ns vs schedstat {kernel_ns} ns"


@pytest.mark.bpf
@pytest.mark.parametrize(("strategies", "kw"), STRATEGY_CASES)
def test_sleeping_task_is_attributed_to_its_own_cgroup(strategies, kw, header_cache: Path, make_cgroup) -> None:
    """A woken task is counted in the cgroup it ran in, not its waker's (a timer softirq or kworker)."""
    idle = make_cgroup("idle")
    probe = loaded(strategies, header_cache, **kw)
    try:
        pid = idle.spawn(SLEEPER, cpu=max(os.sched_getaffinity(0))).pid
        wait_until(lambda: sum(hist_of(probe, idle.id)[0]) >= 10, what="the sleeper's first waits")
        (slots0, ns0), delay0 = hist_of(probe, idle.id), run_delay_ns([pid])
        wait_until(lambda: sum(hist_of(probe, idle.id)[0]) >= sum(slots0) + 100, what="100 more wakeups")
        (slots1, ns1), delay1 = hist_of(probe, idle.id), run_delay_ns([pid])
    finally:
        probe.close()
    # Each wait is the run-queue wait after a wakeup (what schedstat's run_delay counts), not the
    # 4 ms sleep before it (100 of those: 0.4 s), however loaded the CPU is. The slack covers the
    # few µs by which a wakeup timestamp and the kernel's enqueue time differ on µs-long waits, and
    # a wait in flight at one of the two reads (the histogram and schedstat are not read at the same
    # instant: a quiet CI run saw 0 against 1.4 ms, and 3.2 against 0.7 ms): 20 ms, far below 0.4 s.
    probe_ns, kernel_ns = ns1 - ns0, delay1 - delay0
    print(f"{sum(slots1) - sum(slots0)} waits: probe {probe_ns} ns, schedstat {kernel_ns} ns")
    assert abs(probe_ns - kernel_ns) <= 0.25 * kernel_ns + 20e6, (probe_ns, kernel_ns)


@pytest.mark.bpf
def test_removed_cgroup_keeps_its_counts_then_its_series_expires(header_cache: Path, make_cgroup) -> None:
    cg = make_cgroup("gone")
    probe = loaded((RAW_TRACEPOINT,), header_cache, series_grace_s=0.5)
    try:
        cg.spawn(SLEEPER)
        cg_id = cg.id
        wait_until(lambda: sum(hist_of(probe, cg_id)[0]) > 0, what="a wait in the cgroup")
        probe.maintain()  # registered
        cg.remove()
        counted = hist_of(probe, cg_id)
        assert sum(counted[0]) > 0
        probe.labeler.gone.add(cg_id)
        for _ in range(2):  # unown, then (a tick later) read, retire, zero and free
            list(probe.collect())  # scrapes change nothing
            probe.maintain()
            assert hist_of(probe, cg_id) == counted  # kept: the series never goes back
        time.sleep(0.6)
        probe.maintain()  # no live cgroup for longer than the grace: dropped
        assert (str(cg_id),) not in probe.histograms()
    finally:
        probe.close()


@pytest.mark.bpf
def test_bounded_cgroup_map_counts_what_it_drops(header_cache: Path, make_cgroup) -> None:
    a, b = make_cgroup("a"), make_cgroup("b")
    probe = loaded((RAW_TRACEPOINT,), header_cache, max_cgroups=1)
    try:
        a.spawn(SLEEPER)
        b.spawn(SLEEPER)
        wait_until(lambda: probe.read_stats()["cgroup_map_full"] > 0, what="a wait dropped for want of a row")
        assert len(probe.histograms()) == 1
    finally:
        probe.close()


@pytest.mark.bpf
@pytest.mark.parametrize(("strategies", "kw"), STRATEGY_CASES)
def test_row_of_a_removed_cgroup_is_zeroed_and_freed(strategies, kw, header_cache: Path, make_cgroup) -> None:
    cg = make_cgroup("row")
    probe = loaded(strategies, header_cache, **kw)
    try:
        cg.spawn(SLEEPER)
        cg_id = cg.id
        wait_until(lambda: sum(hist_of(probe, cg_id)[0]) > 0, what="a wait in the cgroup")
        index, owner = probe.table(HIST + "_index"), probe.table(HIST + "_owner")
        hist, free = probe.table(HIST), probe.table(HIST + "_free")
        row = index[index.Key(cg_id)].value
        assert owner[owner.Key(row)].value == cg_id
        assert sum(sum(c.w[:NSLOTS]) for c in hist[hist.Key(row)]) > 0
        cg.stop()  # frozen: the batched read (one bpf(2) call) must equal BCC's per-CPU lookup
        batched = probe.workload_tables[HIST].rows.read([row])[row]
        assert batched == [sum(c.w[i] for c in hist[hist.Key(row)]) for i in range(NSLOTS + 1)]
        cg.remove()
        probe.labeler.gone.add(cg_id)
        probe.maintain()  # phase 1: unowned and unmapped, counts still in the row
        assert owner[owner.Key(row)].value == 0
        assert cg_id not in {k.value for k, _ in index.items()}
        assert sum(sum(c.w[:NSLOTS]) for c in hist[hist.Key(row)]) > 0
        probe.maintain()  # phase 2, a tick later: zeroed and freed
        assert all(not any(c.w) for c in hist[hist.Key(row)])
        assert row in [v.value for v in free.values()]  # drains the stack: the probe closes next
    finally:
        probe.close()


@pytest.mark.bpf
def test_both_strategies_agree_on_the_same_workload(header_cache: Path, make_cgroup) -> None:
    """Independent measurements: the kernel's run_delay (raw_tracepoint) vs our own wakeup-to-run
    timestamps (tracepoint), loaded together over the same busy cgroup."""
    busy = make_cgroup("both")
    a = loaded((RAW_TRACEPOINT,), header_cache)
    b = loaded((TRACEPOINT,), header_cache)
    try:
        for _ in range(3):
            busy.spawn(BUSY, cpu=0)
        busy.spawn(SLEEPER, cpu=0)
        time.sleep(0.5)
        a0, b0 = hist_of(a, busy.id), hist_of(b, busy.id)
        time.sleep(3)
        a1, b1 = hist_of(a, busy.id), hist_of(b, busy.id)
    finally:
        a.close()
        b.close()
    sum_a, sum_b = a1[1] - a0[1], b1[1] - b0[1]
    count_a, count_b = sum(a1[0]) - sum(a0[0]), sum(b1[0]) - sum(b0[0])
    print(f"sum: run_delay {sum_a} ns, timestamps {sum_b} ns; waits {count_a} vs {count_b}")
    assert sum_a > 1e9
    assert abs(sum_a - sum_b) <= 0.10 * sum_a
    assert abs(count_a - count_b) <= 0.10 * count_a


@pytest.mark.bpf
def test_garbled_btf_falls_back_to_the_tracepoint_strategy(header_cache: Path, tmp_path: Path) -> None:
    blob = bytearray(Path("/sys/kernel/btf/vmlinux").read_bytes()[:4096])
    blob[24:64] = bytes(range(40))
    (tmp_path / "vmlinux").write_bytes(blob)
    kernel = KernelFacts(cache_dir=header_cache, btf_path=tmp_path / "vmlinux")
    probe = RunqlatProbe(kernel, IdLabeler())
    try:
        probe.load()
        assert probe.attach == TRACEPOINT
        assert "no kernel BTF" in probe.skipped[RAW_TRACEPOINT]
    finally:
        probe.close()


@pytest.mark.bpf
def test_v1_cpu_hierarchy_charges_the_cpu_cgroup_with_collector_labels(header_cache: Path, make_cgroup) -> None:
    """Hybrid host, cgroupfs driver: pods live only in the v1 controllers. The probe charges the
    task's v1 cpu cgroup (ids read through task->cgroups with BTF offsets)."""
    cpu_root = HostPaths().cgroup_v1("cpu")
    if cpu_root is None:
        pytest.skip("no v1 cpu hierarchy on this host")
    parent = make_cgroup("v1", root=cpu_root)
    cg = parent.child("kubepods").child("burstable").child("pod0a1b2c3d-0000-4000-8000-00000000abcd")
    cg = cg.child("c" * 64)  # a container of a pod, as the cgroupfs driver lays it out
    hierarchy = CgroupHierarchy(cpu_root)
    workloads = Workloads(hierarchy)
    kernel = KernelFacts(cache_dir=header_cache, workload_hierarchy=CPU_V1)
    probe = loaded((RAW_TRACEPOINT,), header_cache, labeler=workloads, kernel=kernel)
    try:
        for _ in range(3):
            cg.spawn(BUSY, cpu=0)
        time.sleep(0.5)
        want = workloads.labels_for_path(cg.rel)  # what the throttling collector gives this path
        assert want == ("", "", "", cg.rel)
        before, delay0 = probe.histograms().get(want, ([0] * NSLOTS, 0)), run_delay_ns(cg.pids())
        time.sleep(2)
        after, delay1 = probe.histograms()[want], run_delay_ns(cg.pids())
    finally:
        probe.close()
        hierarchy.close()
    probe_ns, kernel_ns = after[1] - before[1], delay1 - delay0
    assert kernel_ns > 0.5e9
    assert abs(probe_ns - kernel_ns) <= 0.10 * kernel_ns


@pytest.mark.bpf
def test_close_detaches_programs(header_cache: Path) -> None:
    probe = loaded((RAW_TRACEPOINT,), header_cache)
    fds = probe.program_fds()
    assert set(fds) == {"raw_tracepoint__sched_switch"}  # no wakeup hook: the kernel accounts the waits
    probe.close()
    probe.close()  # idempotent
    assert probe.program_fds() == {} and list(probe.collect()) == []


@pytest.mark.bpf
@pytest.mark.parametrize(("strategies", "kw"), STRATEGY_CASES)
def test_task_moved_to_another_cgroup_is_charged_there(strategies, kw, header_cache: Path, make_cgroup) -> None:
    """The per-task workload cache (keyed by css_set where BTF allows) follows a cgroup move."""
    a, b = make_cgroup("from"), make_cgroup("to")
    probe = loaded(strategies, header_cache, **kw)
    try:
        procs = [a.spawn(BUSY, cpu=0) for _ in range(3)]
        wait_until(lambda: sum(hist_of(probe, a.id)[0]) > 0, what="waits in the first cgroup")
        for proc in procs:
            (b.path / "cgroup.procs").write_text(str(proc.pid))
        moved = {proc.pid: runs(proc.pid) for proc in procs}
        # every task has been switched in twice since its move: it ran in its new cgroup
        wait_until(lambda: all(runs(pid) >= n + 2 for pid, n in moved.items()), what="each task run after its move")
        a0, b0 = sum(hist_of(probe, a.id)[0]), sum(hist_of(probe, b.id)[0])
        time.sleep(1.5)
        a1, b1 = sum(hist_of(probe, a.id)[0]), sum(hist_of(probe, b.id)[0])
    finally:
        b.procs.extend(a.procs)
        a.procs.clear()
        probe.close()
    assert a0 > 0, "the tasks waited in their first cgroup"
    assert a1 == a0, f"nothing charged to the old cgroup after the move ({a1 - a0} waits)"
    assert b1 - b0 > 50

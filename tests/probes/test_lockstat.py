"""lockstat: pure parts (render, availability) and the loaded probe against `perf lock contention`."""

from __future__ import annotations

import gzip
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest

from bench.lock_connect_overhead import build_storm
from bench.lockstat_accuracy import CLASSES, TappedLockstat, tapped_window
from host.paths import HostPaths
from metrics.histogram import NSLOTS, slot_of
from probes import bpfsys
from probes.base import KernelFacts
from probes.btf import BTFError, Member
from probes.headers import HeadersNotFound
from probes.kallsyms import KernelSymbols
from probes.lockstat import LOCK_TYPES, LockstatProbe
from probes.settings import SettingError
from tests.conftest import REPO, wait_until
from tests.probes.test_runqlat import IdLabeler

KALLSYMS = """\
ffffffff81000000 T _stext
ffffffff81000100 t helper_a
ffffffff81000200 T caller_b
ffffffff82265800 T __sched_text_start
ffffffff82265900 T mutex_lock
ffffffff8226e522 T __sched_text_end
ffffffff8226e530 T __lock_text_start
ffffffff8226ec50 T _raw_spin_lock
ffffffff8226ffb1 T __lock_text_end
ffffffff83000000 D some_data
"""


SWITCH_COUNT_OFFSETS = {("task_struct", "nvcsw"): 2280, ("task_struct", "nivcsw"): 2288}


class FakeBTF:
    def __init__(self, tracepoint: bool = True, switch_counts: bool = True) -> None:
        self.tracepoint = tracepoint
        self.switch_counts = switch_counts

    def has_function(self, name: str) -> bool:
        return name == "bpf_get_current_task_btf" or (self.tracepoint and name == "__traceiter_contention_begin")

    def member(self, struct: str, name: str) -> Member:
        if self.switch_counts and (struct, name) in SWITCH_COUNT_OFFSETS:
            return Member(SWITCH_COUNT_OFFSETS[struct, name], 8)
        raise BTFError(f"struct {struct} has no {name} in this fake")


def fake_probe(
    tmp_path: Path, tracepoint: bool = True, kallsyms: str = KALLSYMS, switch_counts: bool = True, **kw: int
) -> LockstatProbe:
    host = HostPaths(tmp_path)
    host.proc.mkdir(exist_ok=True)
    (host.proc / "kallsyms").write_text(kallsyms)
    k = KernelFacts(release="6.18.0-test", host=host, cache_dir=tmp_path)
    k.__dict__["btf"] = FakeBTF(tracepoint, switch_counts)
    k.__dict__["task_btf"] = True
    return LockstatProbe(k, IdLabeler(), symbols=KernelSymbols(host.proc / "kallsyms"), **kw)


def test_render_passes_lock_types_and_the_locking_code_bounds(tmp_path: Path) -> None:
    probe = fake_probe(tmp_path, max_callers=64)
    text, cflags = probe.render()
    assert "RAW_TRACEPOINT_PROBE(contention_begin)" in text and "RAW_TRACEPOINT_PROBE(contention_end)" in text
    assert "BPF_ARRAY(lockstat_sleepers, struct sleeper, SLEEPER_SLOTS);" in text
    assert "BPF_HASH(lock_callers_index, u64, u32, 64);" in text
    assert "count_stat(STAT_CALLER_MAP_FULL);" in text  # the callers' own loss reason
    assert "-DLOCK_TEXT_START=0xffffffff82265800ULL" in cflags
    assert "-DLOCK_TEXT_END=0xffffffff8226ffb1ULL" in cflags
    assert "-DTASK_NVCSW_OFF=2280" in cflags and "-DTASK_NIVCSW_OFF=2288" in cflags  # a spin frame's stretch
    assert "-DSLEEPER_SLOTS=16384" in cflags
    assert "-DTIMED_PER_WINDOW=200ULL" in cflags  # 20,000 per second per CPU, in 10 ms windows
    assert [f for f in cflags if f.startswith("-DLT_")] == [f"-DLT_{t.upper()}={i}" for i, t in enumerate(LOCK_TYPES)]
    assert probe.lost_reasons() == ("caller_map_full", "cgroup_map_full", "spin_nesting", "sleeper_slots_full")


def test_timing_budget_flag_values(tmp_path: Path) -> None:
    """0 times every wait; a budget is rounded up to whole waits per 10 ms window; the sleeper
    slots are a power of two (the slot index is a mask)."""
    assert "-DTIMED_PER_WINDOW=0ULL" in fake_probe(tmp_path, timed_waits=0).render()[1]
    assert "-DTIMED_PER_WINDOW=1ULL" in fake_probe(tmp_path, timed_waits=1).render()[1]
    with pytest.raises(SettingError, match="--lockstat-sleeper-slots 1000: must be a power of two"):
        fake_probe(tmp_path, sleeper_slots=1000)
    with pytest.raises(SettingError, match="--lockstat-timed-waits -1"):
        fake_probe(tmp_path, timed_waits=-1)


def test_unavailable_without_the_tracepoints_symbol_addresses_or_switch_counts(tmp_path: Path) -> None:
    assert "lock:contention_begin" in fake_probe(tmp_path, tracepoint=False).unsupported("raw_tracepoint")
    hidden = re.sub(r"^[0-9a-f]{16}", "0" * 16, KALLSYMS, flags=re.M)  # kptr_restrict: addresses zeroed
    assert "kallsyms" in fake_probe(tmp_path, kallsyms=hidden).unsupported("raw_tracepoint")
    assert "context-switch counts" in fake_probe(tmp_path, switch_counts=False).unsupported("raw_tracepoint")
    assert fake_probe(tmp_path).unsupported("raw_tracepoint") is None


def test_prefetch_reads_kallsyms_ahead_and_never_raises(tmp_path: Path) -> None:
    """``prefetch()`` (run by the daemon on a helper thread while the probes compile) leaves the
    locking code's bounds found for ``load()`` by a scan of /proc/kallsyms, without building the
    symbol table, which ``settle()`` builds once the agent is ready; before the kernel's headers
    are known, or without any, it does nothing (it never looks for headers itself); a check that
    raises is left for ``load()`` to meet and report."""

    def probe_in(name: str, headers: object | None) -> LockstatProbe:
        host = HostPaths(tmp_path / name)
        host.proc.mkdir(parents=True)
        (host.proc / "kallsyms").write_text(KALLSYMS)
        kernel = KernelFacts(release="6.18.0-test", host=host, cache_dir=tmp_path / name)
        kernel.__dict__.update(btf=FakeBTF(), task_btf=True)
        if headers is not None:
            kernel.__dict__["headers"] = headers
        return LockstatProbe(kernel, IdLabeler())  # no symbols given: read from kallsyms when asked

    probe = probe_in("ready", object())  # any headers but HeadersNotFound
    assert "_lock_text" not in probe.__dict__
    probe.prefetch()
    assert probe.__dict__["_lock_text"] == (0xFFFFFFFF82265800, 0xFFFFFFFF8226FFB1)
    assert "symbols" not in probe.__dict__  # the table waits for settle()
    probe.settle()
    assert "symbols" in probe.__dict__ and probe.symbols.address("_raw_spin_lock") == 0xFFFFFFFF8226EC50
    for name, headers in (("none", HeadersNotFound("no headers in this test")), ("unknown", None)):
        waiting = probe_in(name, headers)
        waiting.prefetch()
        assert "_lock_text" not in waiting.__dict__ and "symbols" not in waiting.__dict__
        assert headers is not None or "headers" not in waiting.kernel.__dict__  # not looked for here
    broken = probe_in("broken", object())

    def fails(strategy: str) -> str | None:
        raise RuntimeError("a check that fails")

    broken.unsupported = fails  # type: ignore[method-assign]
    broken.prefetch()  # logged at debug, not raised


# --- on the real kernel --------------------------------------------------------------------------

PERF_TYPES = {"spinlock": "spinlock", "mutex": "mutex", "rwsem:R": "rwsem_read", "rwsem:W": "rwsem_write"}
UNITS = {"ns": 1e-9, "us": 1e-6, "ms": 1e-3, "s": 1.0}


def perf_contention(data: Path) -> dict[tuple[str, str], tuple[int, float]]:
    """(lock type, caller function) -> (contended, total wait s) from `perf lock contention -i`.

    ``--stack-skip 1``: skip only the tracepoint's own frame, then perf skips the locking code
    (sched and lock text) by itself - the caller as defined in probes/lockstat.py. perf 6.1's
    default skip of 3 frames assumes a mutex_lock frame that kernels which enter the mutex slow
    path by a tail call no longer have (here it names vfs_write for anon_pipe_write's mutex_lock).
    """
    out = subprocess.run(
        ["perf", "lock", "contention", "-i", str(data), "--stack-skip", "1", "-E", "100000"],
        capture_output=True,
        text=True,
        check=True,
    ).stderr  # perf lock prints its table on stderr
    rows: dict[tuple[str, str], tuple[int, float]] = {}
    line_re = re.compile(r"^\s*(\d+)\s+([\d.]+)\s+(ns|us|ms|s)\s+\S+\s+\S+\s+\S+\s+\S+\s+(\S+)\s+(\S+)\s*$")
    for line in out.splitlines():
        m = line_re.match(line)
        if not m:
            continue
        count, wait, unit, ptype, caller = m.groups()
        key = (PERF_TYPES.get(ptype, ptype), caller.split("+")[0])
        n, w = rows.get(key, (0, 0.0))
        rows[key] = (n + int(count), w + float(wait) * UNITS[unit])
    return rows


def type_counts(rows: dict[tuple[str, str], tuple[int, float]]) -> dict[str, int]:
    """(lock type, caller) -> (count, wait) summed into lock type -> count."""
    out: dict[str, int] = {}
    for (lock_type, _), (n, _) in rows.items():
        out[lock_type] = out.get(lock_type, 0) + n
    return out


def window(probe: LockstatProbe, before: tuple, after: tuple) -> dict[tuple[str, str], tuple[int, float]]:
    """(lock type, caller) -> (contentions, wait s) between two ``caller_totals()`` reads; the
    waits with no caller row under caller "other"."""
    (b_named, b_unknown), (a_named, a_unknown) = before, after
    out = {
        k: (v[0] - b_named.get(k, [0, 0])[0], (v[1] - b_named.get(k, [0, 0])[1]) / 1e9)
        for k, v in a_named.items()
        if v[0] > b_named.get(k, [0, 0])[0]
    }
    for t in LOCK_TYPES:
        n = a_unknown[t][0] - b_unknown[t][0]
        if n:
            out[(t, "other")] = (n, (a_unknown[t][1] - b_unknown[t][1]) / 1e9)
    return out


def mounted(path: str) -> bool:
    return any(line.split()[4] == path for line in Path("/proc/self/mountinfo").read_text().splitlines())


@pytest.fixture
def perf_leaves_tracefs_as_found():
    """perf mounts tracefs at /sys/kernel/tracing when it is not (tools/lib/api/fs): put it back."""
    was = mounted("/sys/kernel/tracing")
    yield
    if not was and mounted("/sys/kernel/tracing"):
        subprocess.run(["umount", "/sys/kernel/tracing"], check=True)


def counts_at_once(probe: LockstatProbe) -> tuple[tuple[dict, dict], dict[str, int]]:
    """``caller_totals()`` and ``pending()`` as of one moment. A CPU that walks a contention
    between the two reads moves its pool into a caller row, where neither read sees it: so the
    pools are read before and after the rows, again until both reads agree (a few tries)."""
    pools = probe.pending()
    for _ in range(20):
        totals = probe.caller_totals()
        again = probe.pending()
        if again == pools:
            break
        pools = again
    return totals, again


def spin_begins(data: Path, since: float, until: float) -> int:
    """Spinlock contentions perf recorded between two CLOCK_MONOTONIC times (the recording made
    with ``-k CLOCK_MONOTONIC``): its ``lock:contention_begin`` events with flags ``SPIN`` alone,
    each of which is one contention (a spinning waiter announces its wait once). Raw events, not
    perf's pairing of begins with ends."""
    out = subprocess.run(
        ["perf", "script", "-i", str(data), "-F", "time,event,trace"], capture_output=True, text=True, check=True
    ).stdout
    return sum(
        1
        for line in out.splitlines()
        if "contention_begin" in line
        and line.rstrip().endswith("(flags=SPIN)")
        and since <= float(line.split(":", 1)[0]) <= until
    )


def perf_lost(data: Path) -> int:
    """How many LOST records perf wrote (its ring buffer was full: events missing from its count)."""
    out = subprocess.run(
        ["perf", "report", "-i", str(data), "--stats"], capture_output=True, text=True, check=True
    ).stdout
    return sum(int(m[1]) for m in re.finditer(r"^\s*LOST\S* events:\s+(\d+)", out, re.M))


@dataclass
class PerfWindow:
    """One run of the pipe workload watched by the probe and by ``perf lock record`` at once."""

    ours: dict[tuple[str, str], tuple[int, float]]  # (type, caller) -> (count, wait s), rows only
    ours_t: dict[str, int]  # type -> count, rows plus pools
    theirs: dict[tuple[str, str], tuple[int, float]]
    theirs_t: dict[str, int]
    inner: int  # perf's SPIN begins from the end of our first read to the start of our second
    outer: int  # ... from the start of the first to the end of the second
    lost: int  # perf's LOST records
    workload_mutex_s: float
    total_mutex_s: float
    stats: dict[str, int]

    def spin_ok(self) -> bool:
        return 0.95 * self.inner <= self.ours_t.get("spinlock", 0) <= 1.05 * self.outer

    def show(self) -> None:
        by_caller = type_counts(self.ours)
        print(
            f"per type: nodetune {self.ours_t} (by caller {by_caller}) perf {self.theirs_t}; perf's SPIN "
            f"begins {self.inner}..{self.outer}; perf LOST records {self.lost}"
        )
        for key in sorted({k for k in (*self.ours, *self.theirs) if k[0] == "spinlock"}):
            print(f"  {key}: nodetune {self.ours.get(key, (0, 0))[0]} perf {self.theirs.get(key, (0, 0))[0]}")
        print(f"stats: {self.stats}")


def perf_window(probe: LockstatProbe, cg, data: Path) -> PerfWindow:
    perf = subprocess.Popen(
        ["perf", "lock", "record", "-a", "-k", "CLOCK_MONOTONIC", "-o", str(data), "--", "sleep", "120"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        # perf enables its events before it starts its workload ("sleep", exec'd in its child): once
        # that runs, perf records (tools/perf/builtin-record.c, __cmd_record()).
        wait_until(lambda: "sleep" in children_comms(perf.pid), what="perf's workload started")
        misses = recursion_misses(probe)
        t0 = time.clock_gettime(time.CLOCK_MONOTONIC)
        (before, before_unknown), pending_before = counts_at_once(probe)
        t1 = time.clock_gettime(time.CLOCK_MONOTONIC)
        hist_before = probe.histograms()
        wl_before = probe.series("workload_lock_wait_seconds").get((str(cg.id),), [0] * len(LOCK_TYPES))
        worker = cg.spawn([sys.executable, "-m", "tests.contention", "3", "6"])
        assert worker.wait(timeout=60) == 0
        t2 = time.clock_gettime(time.CLOCK_MONOTONIC)
        (after, after_unknown), pending_after = counts_at_once(probe)
        t3 = time.clock_gettime(time.CLOCK_MONOTONIC)
        hist_after = probe.histograms()
        wl_after = probe.series("workload_lock_wait_seconds")[(str(cg.id),)]
        stats = probe.read_stats()
        stats["recursion_misses"] = recursion_misses(probe) - misses
    finally:
        perf.send_signal(signal.SIGINT)
        perf.wait(timeout=60)
    ours = window(probe, (before, before_unknown), (after, after_unknown))
    by_caller = type_counts(ours)
    mutex = LOCK_TYPES.index("mutex")
    return PerfWindow(
        ours=ours,
        ours_t={t: n for t in LOCK_TYPES if (n := by_caller.get(t, 0) + pending_after[t] - pending_before[t])},
        theirs=(theirs := perf_contention(data)),
        theirs_t=type_counts(theirs),
        inner=spin_begins(data, t1, t2),
        outer=spin_begins(data, t0, t3),
        lost=perf_lost(data),
        workload_mutex_s=(wl_after[mutex] - wl_before[mutex]) / 1e9,
        total_mutex_s=(hist_after["mutex"][1] - hist_before["mutex"][1]) / 1e9,
        stats=stats,
    )


@pytest.mark.bpf
@pytest.mark.usefixtures("perf_leaves_tracefs_as_found")
def test_agrees_with_perf_lock_contention_on_a_pipe_workload(header_cache: Path, make_cgroup, tmp_path: Path) -> None:
    """Six processes writing into one pipe on 2 CPUs (tests/contention.py): pipe->mutex (sleeping,
    woken on any CPU) and wait-queue spinlocks. Over the same window our per-type counts agree with
    perf's, the top caller by total wait is the same, and the wait is charged to the workload's
    cgroup.

    A type's count is its caller rows plus what still waits in the CPUs' pools (``pending()``):
    without the pools the spinlock count read 1,567 against perf's 1,993 in CI (unwalked spinlocks
    stay pooled while the mutex storm raises the walk shift).
    - mutex: within 2 % of ``perf lock contention``. Equal in 78 of 79 runs; 1.5 % short once, with
      a 500-pod scrape benchmark running alongside.
    - spinlock: between perf's raw ``SPIN`` begins inside our window (from the end of the first
      read to the start of the second) and around it (start of the first to end of the second),
      5 % either side: raw events, not perf's pairing of begins with ends. The probe reads more
      than perf's begins, never less: in 38 runs on 2026-12-03 by +0.04 to +4.5 % (median +0.35 %),
      and in about 140 earlier runs twice by 10 and 20 % (README, Lock contention: an open
      discrepancy). So a window over the upper bound, or one in which perf lost events (its LOST
      records), is run once more and the second is judged; a probe that always overcounts still
      fails, as does one that loses contentions (the lower bound is judged on the first window)."""
    cg = make_cgroup("locks")
    probe = LockstatProbe(KernelFacts(cache_dir=header_cache), IdLabeler())
    probe.load()
    try:
        w = perf_window(probe, cg, tmp_path / "perf.data")
        w.show()
        assert w.ours_t.get("spinlock", 0) >= 0.95 * w.inner, "the probe lost spinlock contentions"
        if not w.spin_ok() or w.lost:
            print("over the spinlock bound or perf lost events: a second window")
            w = perf_window(probe, cg, tmp_path / "perf2.data")
            w.show()
    finally:
        probe.close()
    top_ours = max(w.ours, key=lambda k: w.ours[k][1])
    top_theirs = max(w.theirs, key=lambda k: w.theirs[k][1])
    print(f"top caller by wait: nodetune {top_ours} {w.ours[top_ours]}, perf {top_theirs} {w.theirs[top_theirs]}")
    assert w.ours_t.get("mutex", 0) > 1000, "the pipe workload made no mutex contention"
    assert w.ours_t.get("spinlock", 0) > 50
    assert w.lost == 0, "perf lost events in both windows: its counts are incomplete"
    assert abs(w.ours_t["mutex"] - w.theirs_t.get("mutex", 0)) <= 0.02 * w.theirs_t.get("mutex", 0)
    assert w.spin_ok()
    assert top_ours == top_theirs
    assert top_ours[0] == "mutex" and top_ours[1].startswith("anon_pipe_")  # fs/pipe.c: pipe->mutex
    # The sleeping waits are charged to the writers' workload: most of the mutex wait in the window.
    print(f"mutex wait charged to the workload: {w.workload_mutex_s:.3f} s of {w.total_mutex_s:.3f} s")
    assert 0.8 * w.total_mutex_s <= w.workload_mutex_s <= w.total_mutex_s * 1.0001
    assert w.stats["sleeper_slots_full"] == 0 and w.stats["spin_nesting"] == 0


WINDOWS = 3  # of the budget tests: their wait totals are judged by the median ratio of these


@pytest.mark.bpf
def test_waits_over_the_timing_budget_are_sampled_and_weighted(header_cache: Path) -> None:
    """Two probes on the same pipe workload (about 500,000 contentions per second on 2 CPUs): one
    times every wait, one only 10,000 per second per CPU. The second still counts every
    contention (its counts equal the first's), reports the rest as untimed, and its weighted
    histogram estimates the first's: its count within 10 % (an unweighted sample would give 1/16
    or less), its first bucket (<= 1 us, 95 % of the waits here) within 5 %.

    Waits longer than a tick all cross one, so the second times every one of them whatever the
    sample said: its histogram above a tick counts what the first's does, not 0 or 2^k times as
    many. They are what made its wait total swing (about 20 spins of 4 to 8 ms across a preempted
    vCPU hold a fifth of the wait): timed at 1 in 32 they gave 0.70 to 2.2 times the exact total
    over 2 s; timed all, 0.96 to 1.11 on a quiet machine, and now and then 1.25 on a busy one
    (waits of a fraction of a tick are still drawn). So the total is judged by the median of
    three windows (README, Timing budget), each run until it holds 100,000 mutex waits and three
    across a tick (2 s on a quiet machine)."""
    exact = LockstatProbe(KernelFacts(cache_dir=header_cache), IdLabeler(), timed_waits=0)
    sampled = LockstatProbe(KernelFacts(cache_dir=header_cache), IdLabeler(), timed_waits=10_000)
    probes = (exact, sampled)
    long = first_slot_over(tick_ns())
    snapshots = []
    exact.load()  # first: the order matters to a few per cent (README, How close the estimates are)
    try:
        sampled.load()
        try:
            for _ in range(WINDOWS):
                before = [(p.caller_totals(), p.histograms(), p.untimed(), p.pending()) for p in probes]
                tick_timed = sampled.read_stats()["tick_timed"]
                misses = sum(recursion_misses(p) for p in probes)
                # The workload's contention rate depends on what else the CPUs run (31,260 mutex
                # waits in 2 s once, under load, against 500,000 a second on a quiet machine): it
                # runs until the window holds enough to sample, and waits across a tick.
                deadline = time.monotonic() + 60
                while True:
                    subprocess.run([sys.executable, "-m", "tests.contention", "1", "6"], cwd=REPO, check=True)
                    hist = exact.histograms()
                    mutex_n = sum(hist["mutex"][0]) - sum(before[0][1]["mutex"][0])
                    over = sum(hist[t][0][s] - before[0][1][t][0][s] for t in LOCK_TYPES for s in range(long, NSLOTS))
                    if (mutex_n > 100_000 and over >= 3) or time.monotonic() > deadline:
                        break
                # The workload's exit contends on spinlocks (wakeups, mm teardown) for a while
                # after: settled first, or one probe's read counts some the other's did not.
                time.sleep(0.5)
                after = [(p.caller_totals(), p.histograms(), p.untimed(), p.pending()) for p in probes]
                misses = sum(recursion_misses(p) for p in probes) - misses
                snapshots.append((before, after, sampled.read_stats()["tick_timed"] - tick_timed, misses))
        finally:
            sampled.close()
    finally:
        exact.close()
    ratios = []
    for before, after, tick_timed, misses in snapshots:
        # Every contention counted: by caller, or still in a CPU's pool for its next walked one.
        by_caller = [type_counts(window(p, b[0], a[0])) for p, b, a in zip(probes, before, after, strict=True)]
        counts = [
            {t: n for t in LOCK_TYPES if (n := c.get(t, 0) + a[3][t] - b[3][t])}
            for c, b, a in zip(by_caller, before, after, strict=True)
        ]
        mutex = [sum(a[1]["mutex"][0]) - sum(b[1]["mutex"][0]) for b, a in zip(before, after, strict=True)]
        wait = [(a[1]["mutex"][1] - b[1]["mutex"][1]) / 1e9 for b, a in zip(before, after, strict=True)]
        first = [a[1]["mutex"][0][0] - b[1]["mutex"][0][0] for b, a in zip(before, after, strict=True)]
        untimed = [a[2] - b[2] for b, a in zip(before, after, strict=True)]
        over_tick = [
            sum(a[1][t][0][s] - b[1][t][0][s] for t in LOCK_TYPES for s in range(long, NSLOTS))
            for b, a in zip(before, after, strict=True)
        ]
        print(
            f"counts {counts}; mutex histogram count {mutex}, first bucket {first}, wait {wait} s; untimed {untimed};"
            f" waits over a tick {over_tick} (slots >= {long}), timed for crossing a tick {tick_timed};"
            f" recursion misses {misses}"
        )
        assert counts[0]["mutex"] > 100_000, "the pipe workload made too little contention to sample"
        # Both count each one, but for the runs the kernel skipped: a contention in an interrupt
        # while one probe's program runs on that CPU is seen by the other only.
        for lock_type, n in counts[0].items():
            assert abs(counts[1].get(lock_type, 0) - n) <= 0.01 * n + 2 + misses, lock_type
        assert untimed[0] == 0
        assert untimed[1] > 0.5 * sum(counts[1].values())
        assert abs(mutex[0] - counts[0]["mutex"]) <= 0.01 * mutex[0]  # every wait timed: all counted
        assert abs(mutex[1] - mutex[0]) <= 0.1 * mutex[0]
        assert first[0] > 0.5 * mutex[0]
        assert abs(first[1] - first[0]) <= 0.05 * first[0]
        assert tick_timed > 0
        assert abs(over_tick[1] - over_tick[0]) <= 2 + 0.1 * over_tick[0]
        ratios.append(wait[1] / wait[0])
    print(f"wait total, budgeted / exact: {[round(r, 3) for r in ratios]}")
    assert 0.85 <= statistics.median(ratios) <= 1.25


@pytest.mark.bpf
def test_wait_totals_under_the_budget_match_the_truth_on_the_same_waits(header_cache: Path, tmp_path: Path) -> None:
    """The budgeted probe against the truth on the same waits (bench/lockstat_accuracy.py's tap:
    both programs also read the clock first thing, so each mutex wait is timed in full as well),
    on bench/lock_storm.c: 1 to 3 million mutex contentions per second, a few of whose waiters
    spin for milliseconds (an owner whose vCPU is preempted still looks on CPU) and then sleep.
    Those spins were lost when the waiter was not drawn (estimate 0.89 to 0.99 of the truth,
    median 0.923), or counted 2^k times when it was (up to 1.42); now 1.01 to 1.07. Median of
    three runs within 0.98-1.12 (the previous program's medians here: 0.945 and 0.950). No such
    check is possible between two probes (README, How close the estimates are)."""
    binary = build_storm("lock_storm", tmp_path)
    probe = TappedLockstat(KernelFacts(cache_dir=header_cache), IdLabeler(), timed_waits=20_000)
    probe.load()
    try:
        windows = [tapped_window(probe, [str(binary), "4", "500000"]) for _ in range(WINDOWS)]
        untimed = probe.untimed()
    finally:
        probe.close()
    ratios = []
    for classes in windows:
        parts = zip(CLASSES, classes, strict=True)
        print(" | ".join(f"{name}: {n} waits, {t:.4f} s, est {e:.4f} s" for name, (n, t, e) in parts))
        ratios.append(sum(c[2] for c in classes) / sum(c[1] for c in classes))
    print(f"estimate / truth: {[round(r, 3) for r in ratios]}")
    assert untimed > 0.5 * sum(c[0] for w in windows for c in w), "the storm stayed under the budget: nothing sampled"
    assert 0.98 <= statistics.median(ratios) <= 1.12


def recursion_misses(probe: LockstatProbe) -> int:
    """Runs of the probe's programs the kernel skipped (the program was running on that CPU)."""
    stats = (bpfsys.prog_stats(fd) for fd in probe.program_fds().values())
    return sum(s.recursion_misses for s in stats if s)


def tick_ns() -> int:
    """The kernel's tick, from CONFIG_HZ in /proc/config.gz; 10 ms (HZ=100, the longest) if it
    does not say."""
    try:
        config = gzip.decompress(Path("/proc/config.gz").read_bytes()).decode()
    except OSError:
        return 10_000_000
    hz = re.search(r"^CONFIG_HZ=(\d+)$", config, re.M)
    return 1_000_000_000 // int(hz.group(1)) if hz else 10_000_000


def first_slot_over(ns: int) -> int:
    """The first histogram slot whose every duration is longer than ``ns``."""
    return min(slot_of(ns) + 1, NSLOTS - 1)  # slot s holds (2^(s-1), 2^s] us


def children_comms(pid: int) -> list[str]:
    """The command names of the children of process ``pid`` (/proc/<pid>/task/<pid>/children)."""
    comms = []
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return comms
    for child in children:
        try:
            comms.append(Path(f"/proc/{child}/comm").read_text().strip())
        except OSError:
            continue
    return comms


def sleeper_locks(probe: LockstatProbe) -> Counter[int]:
    """Sleeper slots held at this instant, by the lock their task waits for. The slots serve every
    task of the machine: others than the test's may hold a few at any instant."""
    return Counter(slot.w.lock for slot in probe.table("lockstat_sleepers").values() if slot.owner)


@pytest.mark.bpf
def test_sleepers_beyond_their_slots_are_lost_counted_and_the_slots_come_back(header_cache: Path) -> None:
    """400 tasks asleep at once on one pipe's mutex (tests/contention.py: its writer holds the
    mutex, stalled on a userfaultfd page) against 64 sleeper slots: every slot is held, nearly all
    by them, each of theirs that found none is counted in sleeper_slots_full, and their timed waits
    each last the whole stall (over 0.5 s). Released, every slot they held is free again.

    A task may claim only the 4 slots from its hashed home (SLEEPER_PROBES): with 200 tasks, 1
    run in 200 left a slot nobody could claim (simulated); with 400, none in 100,000. The slots
    serve the whole machine: the test's are told apart by their lock (the stall's, held by most)."""
    probe = LockstatProbe(KernelFacts(cache_dir=header_cache), IdLabeler(), sleeper_slots=64)
    probe.load()
    stall = subprocess.Popen(
        [sys.executable, "-m", "tests.contention", "stall", "400"],
        cwd=REPO,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        before = (probe.read_stats(), probe.histograms()["mutex"][0])
        stalled = stall.stdout.readline().strip()  # every waiter asleep (D): past its contention_begin
        since = time.monotonic()
        held = sleeper_locks(probe)
        # The stall lasts over 0.5 s (the waits' length is asserted); the slots are read until then.
        while (held.total() < 64 or time.monotonic() - since < 0.6) and time.monotonic() < since + 30:
            time.sleep(0.05)
            held = sleeper_locks(probe)
        mid = probe.read_stats()
        stall.stdin.write("\n")
        stall.stdin.flush()
        released = stall.stdout.readline().strip()
        stall.wait(30)  # every waiter has written, so passed its contention_end: nothing to wait for
        after = (probe.read_stats(), probe.histograms()["mutex"][0], sleeper_locks(probe))
    finally:
        if stall.poll() is None:
            stall.kill()
            stall.wait()
        probe.close()
    lock, ours = held.most_common(1)[0] if held else (0, 0)
    lost = mid["sleeper_slots_full"] - before[0]["sleeper_slots_full"]
    long_waits = sum(after[1][slot_of(500_000_000) :]) - sum(before[1][slot_of(500_000_000) :])
    print(f"{stalled}; slots held {held.total()}/64, {ours} by the stall, lost {lost}; waits over 0.5 s {long_waits}")
    assert stalled == "stalled 400" and released == "released 4496", (stalled, released)
    assert held.total() == 64
    assert ours >= 48, held  # the machine's other tasks hold a few at most
    assert lost >= 400 - ours
    # Every wait of theirs that holds a slot is timed, none of the 336 and more without one: those
    # would bring it near 400 (a few other tasks' long waits may end meanwhile).
    assert ours <= long_waits <= 128
    assert after[2][lock] == 0


@pytest.mark.bpf
def test_exported_callers_are_bounded_and_monotonic(header_cache: Path) -> None:
    """top_callers=2: at most 2 named (type, caller) pairs plus one "other" per type, and no
    exported counter goes back across the timer's reselection."""
    probe = LockstatProbe(KernelFacts(cache_dir=header_cache), IdLabeler(), top_callers=2)
    probe.load()
    previous: dict[tuple[str, ...], float] = {}
    try:
        for _ in range(3):
            subprocess.run([sys.executable, "-m", "tests.contention", "1", "4"], cwd=REPO, check=True)
            probe.maintain()
            samples = {}
            for family in probe.collect():
                for s in family.samples:
                    if s.name in ("nodetune_lock_contentions_total", "nodetune_lock_contention_wait_seconds_total"):
                        samples[(s.name, s.labels["lock_type"], s.labels["caller"])] = s.value
            named = {(t, c) for (_, t, c) in samples if c != "other"}
            assert 0 < len(named) <= 2
            for key, value in previous.items():
                if key in samples:
                    assert samples[key] >= value, key
            others = {k: v for k, v in samples.items() if k[2] == "other"}
            for key, value in previous.items():
                if key[2] == "other":
                    assert others[key] >= value, key
            previous = samples
    finally:
        probe.close()


def test_sampled_callers_keep_their_share_when_one_runs_at_each_window_start(header_cache: Path, tmp_path) -> None:
    """Caller sampling gives every contention the same chance. Two probes on the same waits: one
    walks every stack (exact callers), one about 100 per second per CPU (one a window). Two
    mutex callers in two phases of every 10 ms window of the probes' clock
    (bench/window_storm.c): an epoll storm in its first 1.5 ms (do_epoll_ctl), pipe writers and
    a reader from 2 to 5 ms (anon_pipe_*); the 5 ms gap is more than a tick (4 ms at HZ 250),
    so the new window is noticed at the epoll storm's first contention. Walking each window's
    first contentions (the earlier sampler) gave the epoll storm every walk and, through the
    pools, the pipe's contentions too;
    a random draw keeps each caller's share within a few points of the exact one."""
    storm = build_storm("window_storm", tmp_path)
    exact = LockstatProbe(KernelFacts(cache_dir=header_cache), IdLabeler(), timed_waits=0, stack_walks=1_000_000)
    sampled = LockstatProbe(KernelFacts(cache_dir=header_cache), IdLabeler(), timed_waits=0, stack_walks=100)
    probes = (exact, sampled)
    exact.load()
    try:
        sampled.load()
        try:
            before = [p.caller_totals() for p in probes]
            pipes = subprocess.Popen([str(storm), "3", "3", "2000", "5000", "pipe"], stdout=subprocess.DEVNULL)
            subprocess.run([str(storm), "3", "3", "0", "1500"], check=True, capture_output=True)
            assert pipes.wait(timeout=60) == 0
            time.sleep(0.5)  # the workloads' exit settles (see the timing budget test)
            after = [p.caller_totals() for p in probes]
        finally:
            sampled.close()
    finally:
        exact.close()
    shares = []
    for p, b, a in zip(probes, before, after, strict=True):
        rows = window(p, b, a)
        epoll = sum(n for (t, c), (n, _w) in rows.items() if t == "mutex" and "epoll" in c)
        pipe = sum(n for (t, c), (n, _w) in rows.items() if t == "mutex" and "pipe" in c)
        shares.append((epoll, pipe, epoll / max(1, epoll + pipe)))
    print(f"mutex contentions (epoll, pipe, epoll share): exact {shares[0]}, sampled {shares[1]}")
    (e_epoll, e_pipe, e_share), (_, _, s_share) = shares
    walks = 100 * os.cpu_count() * 3  # the sampled probe's budget over the 3 s
    assert e_epoll + e_pipe > 5 * walks and min(e_epoll, e_pipe) > 300, "too little contention to sample"
    assert abs(s_share - e_share) <= 0.05, shares

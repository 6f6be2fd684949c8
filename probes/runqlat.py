"""Run-queue latency probe: per-cgroup log2 histograms of wakeup/preemption-to-run time.

Kernel interfaces, in order of preference (``runqlat.bpf.c`` has both):

* ``raw_tracepoint``: ``sched:sched_switch`` only. At each switch-out the wait that preceded the
  ending run is read from the kernel's own accounting, ``task->sched_info.run_delay`` (offsets from
  BTF), and charged to the task's cgroup at that moment - the cgroup it ran in, never a waker's.
  No clock read and no wakeup hook (cost: README, Overhead).
* ``tracepoint``: ``sched:sched_wakeup``, ``sched_wakeup_new`` and ``sched_switch`` through tracefs
  (no BTF needed): timestamp when runnable, delta at switch-in, charged to the cgroup the task had
  when it last ran (the waker is ``current`` at wakeup time, not the wakee).

Histogram entries of cgroups that no longer exist are deleted at scrape time once two scrapes in a
row could not find them.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable

from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily
from prometheus_client.metrics_core import Metric

from probes import tracefs
from probes.base import CgroupLabeler, KernelFacts, Probe
from probes.btf import BTFError
from probes.histogram import NSLOTS, cumulative_buckets

log = logging.getLogger(__name__)

RAW_TRACEPOINT = "raw_tracepoint"
TRACEPOINT = "tracepoint"
TASK_REPORT_MASK = 0xFF  # TASK_REPORT_MAX - 1, TASK_REPORT_MAX = 0x100 (include/linux/sched.h, >= 4.14)
STAT_REASONS = ("unattributed", "cgroup_map_full", "pid_slot_evicted")  # order of enum runqlat_stat


def _pow2_at_least(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def pid_slots_for(pid_max: int, cap: int) -> int:
    """Slots in the pid-indexed array: enough for every pid up to ``cap`` (a power of two).

    With pid_max <= cap every pid has its own slot; above it pids share slots direct-mapped and a
    waiting task can lose its slot to a colliding one (counted as ``pid_slot_evicted``).
    """
    return min(_pow2_at_least(max(pid_max, 1024)), _pow2_at_least(cap))


class RunqlatProbe(Probe):
    """See module docstring."""

    name = "runqlat"
    strategies = (RAW_TRACEPOINT, TRACEPOINT)
    source_file = "runqlat.bpf.c"

    def __init__(
        self,
        kernel: KernelFacts,
        labeler: CgroupLabeler | None = None,
        only_strategies: tuple[str, ...] | None = None,
        max_cgroups: int = 1024,
        max_pid_slots: int = 1 << 18,
        task_btf: bool | None = None,
    ) -> None:
        super().__init__(kernel, labeler, only_strategies)
        self.max_cgroups = max_cgroups
        self.max_pid_slots = max_pid_slots
        self.task_btf = task_btf  # None: use bpf_get_current_task_btf() where the kernel has it
        self._missing: set[int] = set()  # cgroup ids not found at the previous scrape

    def _pid_max(self) -> int:
        try:
            return int((self.kernel.proc_root / "sys/kernel/pid_max").read_text())
        except (OSError, ValueError):
            return 1 << 22  # PID_MAX_LIMIT on 64-bit: the slot array is capped anyway

    def _sched_info_offsets(self) -> tuple[int, int] | str:
        """(offset of sched_info.pcount in task_struct, gap to run_delay), or why not available."""
        btf = self.kernel.btf
        if btf is None:
            return f"no kernel BTF at {self.kernel.btf_path} for task_struct offsets"
        try:
            base = btf.member("task_struct", "sched_info").offset
            pcount = btf.member("sched_info", "pcount")
            run_delay = btf.member("sched_info", "run_delay")
        except BTFError as e:
            return f"kernel without CONFIG_SCHED_INFO ({e})"
        gap = run_delay.offset - pcount.offset
        if pcount.size != 8 or run_delay.size != 8 or gap <= 0 or gap % 8 or gap > 64:
            return f"unexpected struct sched_info layout (pcount@{pcount.offset}, run_delay@{run_delay.offset})"
        return base + pcount.offset, gap

    def unsupported(self, strategy: str) -> str | None:
        if strategy == RAW_TRACEPOINT:
            offsets = self._sched_info_offsets()
            return offsets if isinstance(offsets, str) else None
        return None

    def render(self, strategy: str | None = None) -> tuple[str, list[str]]:
        strategy = strategy or self.strategies[0]
        pid_slots = pid_slots_for(self._pid_max(), self.max_pid_slots)
        cflags = [f"-DPID_SLOTS={pid_slots}", f"-DMAX_CGROUPS={self.max_cgroups}"]
        if strategy == RAW_TRACEPOINT:
            offsets = self._sched_info_offsets()
            if isinstance(offsets, str):
                raise ValueError(offsets)
            cflags += ["-DSTRATEGY_SCHEDINFO", f"-DSCHED_INFO_OFF={offsets[0]}", f"-DRUN_DELAY_GAP={offsets[1]}"]
            task_btf = self.task_btf
            if task_btf is None:  # the helper's implementation is a kernel function since 5.11
                task_btf = bool(self.kernel.btf and self.kernel.btf.has_function("bpf_get_current_task_btf"))
            if task_btf:
                cflags.append("-DTASK_BTF")
        elif strategy == TRACEPOINT:
            cflags += ["-DSTRATEGY_TP", f"-DTASK_REPORT_MASK={TASK_REPORT_MASK:#x}"]
        else:
            raise ValueError(f"unknown strategy {strategy!r}")
        return self.source(), cflags

    def _before_load(self, strategy: str) -> None:
        if strategy == TRACEPOINT:
            tracefs.acquire()

    def _after_load(self, strategy: str) -> None:
        free = self.table("runqlat_free_rows")
        for row in range(self.max_cgroups):
            free.push(free.Leaf(row))

    def _after_close(self, strategy: str) -> None:
        if strategy == TRACEPOINT:
            tracefs.release()

    # --- scrape time ----------------------------------------------------------------------
    def read_histograms(self) -> dict[int, tuple[list[int], int]]:
        """cgroup id -> (slot counts summed over CPUs, sum of latencies in ns)."""
        hist = self.table("runqueue_latency_seconds")
        out: dict[int, tuple[list[int], int]] = {}
        for cgid, row in self.table("runqlat_cgroup_rows").items():
            slots = [0] * NSLOTS
            total_ns = 0
            for cpu_value in hist[hist.Key(row.value)]:
                for i in range(NSLOTS):
                    slots[i] += cpu_value.slots[i]
                total_ns += cpu_value.sum_ns
            out[cgid.value] = (slots, total_ns)
        return out

    def read_stats(self) -> dict[str, int]:
        table = self.table("runqlat_stats")
        return {reason: sum(table[table.Key(i)]) for i, reason in enumerate(STAT_REASONS)}

    def _forget(self, gone: Iterable[int]) -> None:
        """Give the rows of vanished cgroups back: unown, unmap, zero, then free (in that order,
        so the kernel never adds to a row it is about to hand to another cgroup)."""
        rows, owner = self.table("runqlat_cgroup_rows"), self.table("runqlat_row_owner")
        hist, free = self.table("runqueue_latency_seconds"), self.table("runqlat_free_rows")
        for cgid in gone:
            try:
                row = rows[rows.Key(cgid)].value
            except KeyError:
                continue
            owner[owner.Key(row)] = owner.Leaf(0)
            with contextlib.suppress(KeyError):
                del rows[rows.Key(cgid)]
            hist[hist.Key(row)] = hist.Leaf()
            free.push(free.Leaf(row))

    def collect(self) -> Iterable[Metric]:
        with self._lock:
            if self._bpf is None:
                return []
            histograms = self.read_histograms()
            stats = self.read_stats()
            label_names = self.labeler.label_names if self.labeler else ("cgroup_id",)
            merged: dict[tuple[str, ...], tuple[list[int], int]] = {}
            missing: set[int] = set()
            for cgid, (slots, total_ns) in histograms.items():
                labels = self.labeler.labels_for_cgroup_id(cgid) if self.labeler else (str(cgid),)
                if labels is None:
                    missing.add(cgid)
                    continue
                # Several cgroups can share one label set (host cgroups cut to two levels).
                acc_slots, acc_ns = merged.get(labels, ([0] * NSLOTS, 0))
                merged[labels] = ([a + b for a, b in zip(acc_slots, slots, strict=True)], acc_ns + total_ns)
            self._forget(missing & self._missing)
            self._missing = missing

        hist = HistogramMetricFamily(
            "nodetune_runqueue_latency_seconds",
            "Time tasks spent runnable on a run queue before running (wakeup, new task or "
            "preemption to switch-in), per workload.",
            labels=list(label_names),
        )
        for labels, (slots, total_ns) in sorted(merged.items()):
            hist.add_metric(list(labels), cumulative_buckets(slots), total_ns / 1e9)
        lost = CounterMetricFamily(
            "nodetune_probe_events_lost",
            "Events a probe could not account, by reason (bounded maps full, unknown owner).",
            labels=["probe", "reason"],
        )
        for reason, value in stats.items():
            lost.add_metric([self.name, reason], value)
        return [hist, lost]

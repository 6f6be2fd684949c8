"""Run-queue latency probe: per-workload log2 histograms of wakeup/preemption-to-run time.

Kernel interfaces, in order of preference (``runqlat.bpf.c`` has both):

* ``raw_tracepoint``: ``sched:sched_switch`` only. At each switch-out the wait that preceded the
  ending run is read from the kernel's own accounting, ``task->sched_info.run_delay`` (offsets from
  BTF), and charged to the task's workload at that moment - the cgroup it ran in, never a waker's.
  No clock read, no wakeup hook and no per-task state (cost: README, Overhead): the run_delay of
  the task switched in is noted per CPU, and its switch-out on the same CPU gives the delta.
* ``tracepoint``: ``sched:sched_wakeup``, ``sched_wakeup_new`` and ``sched_switch`` through tracefs
  (no BTF needed): timestamp when runnable, delta at switch-in, charged to the workload the task had
  when it last ran (the waker is ``current`` at wakeup time, not the wakee).

Histograms are per-workload rows (``probes/row_table.py``), turned into monotonic label sets by
``metrics/workload_series.py``.
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client.metrics_core import Metric

from metrics.exposition import CompactHistogram
from metrics.histogram import NSLOTS, ROW_WORDS
from probes import tracefs
from probes.base import Probe
from probes.btf import BTFError
from probes.row_table import RowTableSpec
from probes.settings import Setting

RAW_TRACEPOINT = "raw_tracepoint"
TRACEPOINT = "tracepoint"
TASK_REPORT_MASK = 0xFF  # TASK_REPORT_MAX - 1, TASK_REPORT_MAX = 0x100 (include/linux/sched.h, >= 4.14)
HIST = "runqueue_latency_seconds"


def _pow2_at_least(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def pid_slots_for(pid_max: int, cap: int) -> int:
    """Slots in the pid-indexed array (kernels < 5.11 and the tracepoint strategy): enough for
    every pid up to ``cap`` (a power of two). Above it pids share slots direct-mapped and a waiting
    task can lose its slot to a colliding one (counted as ``pid_slot_evicted``)."""
    return min(_pow2_at_least(max(pid_max, 1024)), _pow2_at_least(cap))


class RunqlatProbe(Probe):
    """See module docstring."""

    name = "runqlat"
    strategies = (RAW_TRACEPOINT, TRACEPOINT)
    source_file = "runqlat.bpf.c"
    settings = (
        Setting(
            "max_cgroups",
            1024,
            "in-kernel histogram rows, one per cgroup whose tasks waited (200 B x CPUs each)",
            maximum=65536,
        ),
        Setting(
            "max_pid_slots",
            1 << 18,
            "bound of the pid-indexed array of the tracepoint strategy (24 B each)",
            minimum=1024,
            maximum=1 << 22,
            power_of_two=True,
        ),
    )
    stat_reasons = ("unattributed", "pid_slot_evicted")
    info_stats = ("next_probe_read",)  # the incoming task was read with a probe read, not rq->curr

    def __init__(self, *args: object, task_btf: bool | None = None, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.task_btf = task_btf  # None: plain loads through bpf_get_current_task_btf() where available

    def uses_task_btf(self) -> bool:
        return self.kernel.task_btf if self.task_btf is None else self.task_btf

    def row_tables(self) -> tuple[RowTableSpec, ...]:
        return (RowTableSpec(HIST, ROW_WORDS, self.config["max_cgroups"]),)

    def _pid_max(self) -> int:
        try:
            return int((self.kernel.host.proc_sys / "kernel/pid_max").read_text())
        except (OSError, ValueError):
            return 1 << 22  # PID_MAX_LIMIT on 64-bit: the slot array is capped anyway

    def _sched_info_offsets(self) -> tuple[int, int] | str:
        """(offset of sched_info.run_delay in task_struct, offset of pid), or why not available."""
        btf = self.kernel.btf
        if btf is None:
            return f"no kernel BTF at {self.kernel.btf_path} for task_struct offsets"
        try:
            base = btf.member("task_struct", "sched_info").offset
            run_delay = btf.member("sched_info", "run_delay")
        except BTFError as e:
            return f"kernel without CONFIG_SCHED_INFO ({e})"
        try:
            pid = btf.member("task_struct", "pid")
        except BTFError as e:
            return f"no task_struct.pid in BTF ({e})"
        offset = base + run_delay.offset
        if run_delay.size != 8 or offset % 8 or pid.size != 4:
            return (
                f"unexpected layout (sched_info.run_delay {run_delay.size} B at {offset}, task_struct.pid {pid.size} B)"
            )
        return offset, pid.offset

    def _rq_curr_cflags(self) -> list[str]:
        """Offsets of current->se.cfs_rq->rq->curr (the incoming task at sched_switch), or []."""
        btf = self.kernel.btf
        if btf is None or not self.uses_task_btf():
            return []
        try:
            se = btf.member("task_struct", "se").offset + btf.member("sched_entity", "cfs_rq").offset
            return [
                "-DRQ_CURR_CHAIN",
                f"-DTASK_SE_CFS_RQ_OFF={se}",
                f"-DCFS_RQ_RQ_OFF={btf.member('cfs_rq', 'rq').offset}",
                f"-DRQ_CURR_OFF={btf.member('rq', 'curr').offset}",
            ]
        except BTFError:  # no CONFIG_FAIR_GROUP_SCHED (cfs_rq.rq) or another layout: probe reads
            return []

    def unsupported(self, strategy: str) -> str | None:
        if strategy == RAW_TRACEPOINT:
            offsets = self._sched_info_offsets()
            return offsets if isinstance(offsets, str) else None
        return None

    def cflags(self, strategy: str) -> list[str]:
        pid_slots = pid_slots_for(self._pid_max(), self.config["max_pid_slots"])
        flags: list[str] = []
        if strategy == RAW_TRACEPOINT:
            offsets = self._sched_info_offsets()
            if isinstance(offsets, str):
                raise ValueError(offsets)
            return [
                *flags,
                "-DSTRATEGY_SCHEDINFO",
                f"-DRUN_DELAY_OFF={offsets[0]}",
                f"-DTASK_PID_OFF={offsets[1]}",
                *self._rq_curr_cflags(),
            ]
        if strategy == TRACEPOINT:
            return [*flags, f"-DPID_SLOTS={pid_slots}", "-DSTRATEGY_TP", f"-DTASK_REPORT_MASK={TASK_REPORT_MASK:#x}"]
        raise ValueError(f"unknown strategy {strategy!r}")

    def _before_load(self, strategy: str) -> None:
        if strategy == TRACEPOINT:
            tracefs.acquire()

    def _after_close(self, strategy: str) -> None:
        if strategy == TRACEPOINT:
            tracefs.release()

    # --- scrape time ----------------------------------------------------------------------
    def histograms(self) -> dict[tuple[str, ...], tuple[list[int], int]]:
        """Label set -> (slot counts, sum of waits in ns), monotonic."""
        return {labels: (v[:NSLOTS], v[NSLOTS]) for labels, v in self.series(HIST).items()}

    def collect_loaded(self) -> Iterable[Metric]:
        hist = CompactHistogram(
            "nodetune_" + HIST,
            "Time tasks spent runnable on a run queue before running (wakeup, new task or "
            "preemption to switch-in), per workload.",
            labels=self.labeler.label_names,
        )
        for labels, (slots, total_ns) in sorted(self.histograms().items()):
            hist.add(labels, slots, total_ns / 1e9)
        return [hist]

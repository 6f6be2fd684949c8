"""Kernel lock contention probe: where the kernel spins and sleeps on locks, by type, caller and pod.

Kernel interface: the ``lock:contention_begin`` / ``lock:contention_end`` tracepoints (kernel
>= 5.19), attached as raw tracepoints (``lockstat.bpf.c``: per-CPU frames for spinning waiters,
a shared array of per-task slots for sleeping ones, callers from ``bpf_get_stack`` at begin), plus
``/proc/kallsyms`` for the locking code's bounds and the callers' names (read once, cached).

Exported:

* ``nodetune_lock_contention_wait_seconds{lock_type}``: histogram of single waits;
* ``nodetune_lock_contentions_total{lock_type,caller}`` and
  ``nodetune_lock_contention_wait_seconds_total{lock_type,caller}``: the top N (type, caller) pairs
  by wait over the agent's lifetime, the rest in ``caller="other"`` (``metrics/topn.py``);
* ``nodetune_workload_lock_wait_seconds_total{<workload labels>,lock_type}``;
* ``nodetune_lock_contentions_untimed_total``: contentions over the timing budget
  (``--lockstat-timed-waits`` per second per CPU), counted exactly but not timed; the timed
  ones stand for them in the waits (``lockstat.bpf.c``, struct budget). Waits that last across
  a tick are timed regardless.

Also from BTF: ``task_struct``'s context-switch counts, which tell a spinning wait's frame from
one left over by a context whose end the kernel skipped (``lockstat.bpf.c`` cpu_epoch).

``lock_type`` from the tracepoint's flags (include/trace/events/lock.h LCB_F_*; perf's names in
brackets): SPIN ``spinlock``; SPIN|READ ``rwlock_read`` (rwlock:R); SPIN|WRITE ``rwlock_write``;
MUTEX and MUTEX|SPIN (a mutex's optimistic spin) ``mutex``; READ ``rwsem_read``; WRITE
``rwsem_write``; RT, RT|READ, RT|WRITE ``rtmutex`` (PREEMPT_RT's sleeping spinlocks and rwlocks);
PERCPU|READ, PERCPU|WRITE ``percpu_rwsem``; 0 ``semaphore`` (kernel/locking/semaphore.c); any
other combination ``other``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from functools import cached_property
from pathlib import Path

from prometheus_client.metrics_core import Metric

from metrics.exposition import CompactHistogram, CompactScalar
from metrics.histogram import NSLOTS, ROW_WORDS
from metrics.topn import TopN
from probes import bpfsys
from probes.base import Probe
from probes.btf import BTFError
from probes.kallsyms import KernelSymbols, find_addresses
from probes.row_table import RowTableSpec, sum_over_cpus
from probes.settings import Setting
from probes.spinlock_visibility import ALL, SEEN, this_node

log = logging.getLogger(__name__)

RAW_TRACEPOINT = "raw_tracepoint"
LOCK_TYPES = (
    "spinlock",
    "rwlock_read",
    "rwlock_write",
    "mutex",
    "rwsem_read",
    "rwsem_write",
    "rtmutex",
    "percpu_rwsem",
    "semaphore",
    "other",
)
HIST = "lock_contention_wait_seconds"
CALLERS = "lock_callers"
WORKLOAD = "workload_lock_wait_seconds"
SPIN_DEPTH = 4  # task, softirq, hardirq, NMI: qspinlock's per-CPU MCS nodes (MAX_NODES)
MAX_FRAMES = 12  # the caller was at frame 3..7 in every contention seen here (README)
SWITCH_COUNTS = ("nvcsw", "nivcsw")  # task_struct: times switched out, voluntarily and not
LOCK_TEXT = ("__sched_text_start", "__lock_text_end")  # adjacent sections: sched text, then lock text
OTHER = "other"
UNKNOWN = "unknown"  # a caller address outside every known symbol


class LockstatProbe(Probe):
    """See module docstring."""

    name = "lockstat"
    strategies = (RAW_TRACEPOINT,)
    source_file = "lockstat.bpf.c"
    settings = (
        Setting("top_callers", 20, 'callers exported by name (the rest: caller="other")', maximum=1000),
        Setting(
            "caller_half_life",
            60,
            "seconds: callers are ranked by their wait over about this long (decayed), not their lifetime",
            maximum=86_400,
        ),
        Setting(
            "max_callers",
            4096,
            'in-kernel rows of (lock type, call site) (16 B x CPUs each); beyond: caller="other"',
            minimum=16,
            maximum=65536,
        ),
        Setting("max_cgroups", 1024, "in-kernel per-workload rows (80 B x CPUs each)", maximum=65536),
        Setting(
            "sleeper_slots",
            16384,
            "slots for tasks waiting on sleeping locks at the same instant (64 B each, not per CPU)",
            minimum=64,
            maximum=1 << 22,
            power_of_two=True,
        ),
        Setting(
            "stack_walks",
            500,
            "caller stack walks per second per CPU (~2.5 us each); beyond it callers are sampled",
            maximum=1_000_000,
        ),
        Setting(
            "timed_waits",
            20_000,
            "waits timed per second per CPU (two clock reads each, ~100 ns); beyond it 1 in 2^k is"
            " timed and counts for 2^k; 0: time every wait",
            minimum=0,
            maximum=100_000_000,
        ),
    )
    stat_reasons = ("spin_nesting", "sleeper_slots_full")
    info_stats = (
        "end_missed",  # a frame dropped because its end never came (recursion guard)
        "tick_timed",  # an unsampled wait timed because it lasted across a tick
    )

    def __init__(
        self, *args: object, symbols: KernelSymbols | None = None, kmsg: Path = Path("/dev/kmsg"), **kwargs: object
    ) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self._symbols = symbols
        self._kmsg = kmsg
        self.top = TopN(self.config["top_callers"], 2, rank=lambda v: v[1], half_life_s=self.config["caller_half_life"])
        self.spinlock_waits: tuple[str, str] | None = None  # (one of SEEN, why), found at load

    def _after_load(self, strategy: str) -> None:
        # Which spinlock waits the tracepoint can show here (probes/spinlock_visibility.py): read once.
        self.spinlock_waits = seen, why = this_node(self.kernel.host.proc, self._kmsg)
        if seen == ALL:
            log.info("lockstat: every spinlock waiter is seen (%s)", why)
        else:
            log.warning("lockstat: spinlock waits seen: %s (%s); sleeping locks are all seen", seen, why)

    @cached_property
    def symbols(self) -> KernelSymbols:
        return self._symbols or KernelSymbols(self.kernel.host.proc / "kallsyms")

    def row_tables(self) -> tuple[RowTableSpec, ...]:
        return (
            RowTableSpec(
                CALLERS, 2, self.config["max_callers"], full_reason="caller_map_full", per_workload=False, cache=0
            ),
            RowTableSpec(WORKLOAD, len(LOCK_TYPES), self.config["max_cgroups"]),
        )

    @cached_property
    def _lock_text(self) -> tuple[int, int] | str:
        """The locking code's bounds, or why there are none. Found by a scan of kallsyms, not from
        the symbol table: loading needs two addresses, and the table (naming callers) is built
        after the agent is ready (``settle``). An injected table (tests) is asked instead."""
        if self._symbols is not None:
            start, end = (self._symbols.address(s) for s in LOCK_TEXT)
        else:
            try:
                found = find_addresses(self.kernel.host.proc / "kallsyms", LOCK_TEXT)
            except OSError:
                found = {}
            start, end = (found.get(s) for s in LOCK_TEXT)
        if start is None or end is None or start >= end:
            return f"no {LOCK_TEXT[0]}/{LOCK_TEXT[1]} in /proc/kallsyms (kptr_restrict, or not root)"
        return start, end

    def settle(self) -> None:
        """Build the symbol table that names callers (0.2 s here) now, not at the first scrape."""
        self.symbols  # noqa: B018 (a cached property)

    def _switch_counts(self) -> list[str] | str:
        """The -D offsets of task_struct's context-switch counts (lockstat.bpf.c cpu_epoch), or why
        there are none."""
        btf = self.kernel.btf
        if btf is None:
            return "no kernel BTF"
        try:
            return [f"-DTASK_{name.upper()}_OFF={btf.member('task_struct', name).offset}" for name in SWITCH_COUNTS]
        except BTFError as e:
            return f"no task_struct context-switch counts in BTF: {e}"

    def unsupported(self, strategy: str) -> str | None:
        btf = self.kernel.btf
        if btf is None or not btf.has_function("__traceiter_contention_begin"):
            return "no lock:contention_begin tracepoint (kernel < 5.19, or no BTF to tell)"
        for why in (self._lock_text, self._switch_counts()):
            if isinstance(why, str):
                return why
        return None

    def cflags(self, strategy: str) -> list[str]:
        text = self._lock_text
        if isinstance(text, str):
            raise ValueError(text)
        switch_counts = self._switch_counts()
        if isinstance(switch_counts, str):
            raise ValueError(switch_counts)
        return [
            *switch_counts,
            f"-DNTYPES={len(LOCK_TYPES)}",
            *(f"-DLT_{t.upper()}={i}" for i, t in enumerate(LOCK_TYPES)),
            f"-DSPIN_DEPTH={SPIN_DEPTH}",
            f"-DSLEEPER_SLOTS={self.config['sleeper_slots']}",
            f"-DMAX_FRAMES={MAX_FRAMES}",
            f"-DWALKS_PER_WINDOW={max(1, self.config['stack_walks'] // 100)}",  # 10 ms windows
            f"-DTIMED_PER_WINDOW={(self.config['timed_waits'] + 99) // 100}ULL",
            f"-DLOCK_TEXT_START={text[0]:#x}ULL",
            f"-DLOCK_TEXT_END={text[1]:#x}ULL",
        ]

    # --- reading ----------------------------------------------------------------------------
    def _caller_name(self, key: int) -> str:
        return self.symbols.caller(key & 0xFFFFFFFFFFFF | 0xFFFF000000000000) or UNKNOWN

    def caller_totals(self) -> tuple[dict[tuple[str, str], list[int]], dict[str, list[int]]]:
        """((lock type, caller function) -> [contentions, wait ns], lock type -> the same for waits
        with no caller row: none found in the stack, or the rows full). Lifetime totals."""
        rows = self.keyed_tables[CALLERS]
        keys = rows.owned()
        values = rows.read(list(keys))
        callers: dict[tuple[str, str], list[int]] = {}
        for row, key in keys.items():
            type_index = key >> 56
            if type_index >= len(LOCK_TYPES):
                continue
            acc = callers.setdefault((LOCK_TYPES[type_index], self._caller_name(key)), [0, 0])
            acc[0] += values[row][0]
            acc[1] += values[row][1]
        unknown = self._per_type("lock_caller_unknown", 2)
        return callers, {lock_type: unknown[i] for i, lock_type in enumerate(LOCK_TYPES)}

    def _per_type(self, name: str, words: int) -> dict[int, list[int]]:
        """A per-CPU array with one entry per lock type, summed over CPUs (one batched read)."""
        fd = self.table(name).get_fd()
        values = bpfsys.lookup_batch(fd, 0, len(LOCK_TYPES), 8 * words, percpu=True)
        return sum_over_cpus(values, list(range(len(LOCK_TYPES))))

    def untimed(self) -> int:
        """Contentions counted but not timed (over the timing budget), summed over CPUs."""
        table = self.table("lockstat_budget")
        return sum(cpu.untimed for cpu in table[table.Key(0)])

    def pending(self) -> dict[str, int]:
        """Lock type -> contentions counted but not yet given to a caller, summed over CPUs: over
        the stack-walk budget they wait in their CPU's pool until its next contention of that type
        is walked (lockstat.bpf.c, struct budget). The caller counts lag by this much."""
        table = self.table("lockstat_budget")
        cpus = table[table.Key(0)]
        return {lock_type: sum(cpu.count[i] for cpu in cpus) for i, lock_type in enumerate(LOCK_TYPES)}

    def histograms(self) -> dict[str, tuple[list[int], int]]:
        """Lock type -> (slot counts, sum of waits in ns)."""
        rows = self._per_type(HIST, ROW_WORDS)
        return {lock_type: (rows[i][:NSLOTS], rows[i][NSLOTS]) for i, lock_type in enumerate(LOCK_TYPES)}

    def maintain(self) -> None:
        super().maintain()
        with self._lock:
            if self._bpf is not None:
                if "symbols" in self.__dict__ and self.symbols.refresh():  # a module came or went
                    log.info("lockstat: kernel modules changed; symbol table read again")
                self.top.reselect(self.caller_totals()[0])

    def collect_loaded(self) -> Iterable[Metric]:
        hist = CompactHistogram(
            "nodetune_" + HIST,
            "Time a kernel code path waited for a contended lock (one observation per contention), by lock type.",
            labels=("lock_type",),
        )
        for lock_type, (slots, total_ns) in self.histograms().items():
            hist.add((lock_type,), slots, total_ns / 1e9)
        count = CompactScalar(
            "nodetune_lock_contentions_total",
            "Contended lock acquisitions by lock type and calling kernel function (top callers by "
            'wait; the rest in caller="other").',
            "counter",
            ("lock_type", "caller"),
        )
        wait = CompactScalar(
            "nodetune_lock_contention_wait_seconds_total",
            "Time spent waiting for contended locks by lock type and calling kernel function (top "
            'callers by wait; the rest in caller="other").',
            "counter",
            ("lock_type", "caller"),
        )
        callers, unattributed = self.caller_totals()
        named, other = self.top.split(callers, group_of=lambda k: k[0])
        for lock_type, (n, ns) in unattributed.items():
            if n:
                acc = other.setdefault(lock_type, [0, 0])
                acc[0] += n
                acc[1] += ns
        for (lock_type, caller), (n, ns) in sorted(named.items()):
            count.add((lock_type, caller), n)
            wait.add((lock_type, caller), ns / 1e9)
        for lock_type, (n, ns) in sorted(other.items()):
            count.add((lock_type, OTHER), n)
            wait.add((lock_type, OTHER), ns / 1e9)
        per_workload = CompactScalar(
            "nodetune_" + WORKLOAD + "_total",
            "Time tasks of a workload waited for contended kernel locks, by lock type.",
            "counter",
            (*self.labeler.label_names, "lock_type"),
        )
        for labels, words in sorted(self.series(WORKLOAD).items()):
            for lock_type, ns in zip(LOCK_TYPES, words, strict=True):
                if ns:
                    per_workload.add((*labels, lock_type), ns / 1e9)
        untimed = CompactScalar(
            "nodetune_lock_contentions_untimed_total",
            "Contentions counted but not timed: over --lockstat-timed-waits per second per CPU, 1 in "
            "2^k waits is timed and stands for 2^k in the histogram and the wait totals.",
            "counter",
            (),
        )
        untimed.add((), self.untimed())
        seen = CompactScalar(
            "nodetune_lock_spinlock_waits_seen",
            "Which spinlock waits this kernel shows the probe, 1 for the one that holds: all; queued (bare"
            " metal: a lock's first waiter is not seen); none (a guest without PV spinlocks: test-and-set"
            " spinlocks, no tracepoint); unknown.",
            "gauge",
            ("seen",),
        )
        if self.spinlock_waits is not None:
            for value in SEEN:
                seen.add((value,), int(value == self.spinlock_waits[0]))
        return [hist, count, wait, per_workload, untimed, seen]

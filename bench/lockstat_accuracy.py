"""How close lockstat's wait totals under the timing budget are to the truth, on the same waits. Not a test.

Two probes loaded side by side cannot settle a bias of a few per cent at sub-microsecond waits:
each one's interval holds part of the other's programs, and at a mean wait of 0.5 us 50 ns is
10 %. Here one probe is built with a tap: both of its programs read the clock first thing into
a per-CPU slot, every wait keeps its begin's reading, and every mutex wait is accounted twice at
contention_end, as the tap's (the truth for this run) and as the budget's estimate, per class:

- ``cross-untimed``: not drawn, lasted across a tick, so timed from the CPU's last clock reading
  (the probe's tick rule: its error is the age of that reading);
- ``cross-drawn``: drawn and lasted across a tick: counted once, timed;
- ``drawn``: drawn, within a tick: counted 2^k times;
- ``undrawn``: not drawn, within a tick: not timed (a mutex waiter that went to sleep is timed
  from its sleep).

The taps read the clock at every event, which slows the workload as timing every wait does; the
comparison is on the same waits. Workloads: ``pipe``, ``tests/contention.py``'s pipe writers
(about 500,000 mutex contentions per second on 2 CPUs); ``storm``, ``bench/lock_storm.c`` (4
threads on one epoll instance's mutex: 1 to 3 million contentions per second, with the taps).
Few of their waiters sleep (tens per run), but those spun for milliseconds first. Run as root:
``python bench/lockstat_accuracy.py --runs 8 --timed-waits 10000 --workload storm``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.lock_connect_overhead import build_storm  # noqa: E402
from host.paths import HostPaths  # noqa: E402
from probes.base import KernelFacts  # noqa: E402
from probes.lockstat import LockstatProbe  # noqa: E402

CLASSES = ("cross-untimed", "cross-drawn", "drawn", "undrawn")

# (anchor in probes/lockstat.bpf.c, replacement): the tap. An anchor that moved stops the run.
TAP = (
    ("    u32 weight;  /* timed", "    u64 tap_ts;\n    u32 tap_weight;\n    u32 weight;  /* timed"),
    (
        "BPF_PERCPU_ARRAY(lockstat_budget, struct budget, 1);",
        "BPF_PERCPU_ARRAY(lockstat_budget, struct budget, 1);\n"
        "BPF_PERCPU_ARRAY(tap_classes, u64, 12);\nBPF_PERCPU_ARRAY(tap_now, u64, 1);\n"
        "static __always_inline u64 tap_read(void) { u32 z = 0; u64 *n = tap_now.lookup(&z); return n ? *n : 0; }\n"
        "static __always_inline void tap_add(u32 k, u64 v) { u64 *c = tap_classes.lookup(&k); if (c) *c += v; }",
    ),
    (
        "    w->ts = weight ? ts : b->clock;",
        "    w->tap_ts = tap_read();\n    w->tap_weight = weight;\n    w->ts = weight ? ts : b->clock;",
    ),
    (
        "    if (b && !weight)\n        b->untimed++;",
        "    if (b && !weight)\n        b->untimed++;\n"
        "    if (type == LT_MUTEX) {\n"
        "        u64 t = tap_read();\n"
        "        t = t > w->tap_ts ? t - w->tap_ts : 0;\n"
        "        u32 cls = bpf_jiffies64() != w->tick ? (w->tap_weight ? 1 : 0) : (w->tap_weight ? 2 : 3);\n"
        "        tap_add(cls * 3, 1);\n        tap_add(cls * 3 + 1, t);\n        tap_add(cls * 3 + 2, ns);\n"
        "    }",
    ),
    (
        "    /* TP_PROTO(void *lock, unsigned int flags) */",
        "    { u32 z = 0; u64 *n = tap_now.lookup(&z); if (n) *n = bpf_ktime_get_ns(); }",
    ),
    (
        "    /* TP_PROTO(void *lock, int ret)",
        "    { u32 z = 0; u64 *n = tap_now.lookup(&z); if (n) *n = bpf_ktime_get_ns(); }\n"
        "    /* TP_PROTO(void *lock, int ret)",
    ),
)


class TappedLockstat(LockstatProbe):
    """lockstat with the tap: every mutex wait also timed from the start of each program."""

    def source(self) -> str:
        text = super().source()
        for anchor, replacement in TAP:
            if text.count(anchor) != 1:
                raise SystemExit(f"the tap's anchor is not in lockstat.bpf.c once: {anchor!r}")
            text = text.replace(anchor, replacement)
        return text


def tap_totals(probe: TappedLockstat) -> list[tuple[int, float, float]]:
    """(count, true s, estimated s) per class of mutex wait, since the probe was loaded."""
    table = probe.table("tap_classes")
    values = [sum(table[table.Key(i)]) for i in range(3 * len(CLASSES))]
    return [(values[3 * c], values[3 * c + 1] / 1e9, values[3 * c + 2] / 1e9) for c in range(len(CLASSES))]


def tapped_window(probe: TappedLockstat, workload: list[str]) -> list[tuple[int, float, float]]:
    """(count, true s, estimated s) per class over one run of ``workload``."""
    before = tap_totals(probe)
    subprocess.run(workload, cwd=REPO, check=True, stdout=subprocess.DEVNULL)
    after = tap_totals(probe)
    return [(a[0] - b[0], a[1] - b[1], a[2] - b[2]) for b, a in zip(before, after, strict=True)]


def one_run(timed_waits: int, workload: list[str]) -> list[tuple[int, float, float]]:
    """(count, true s, estimated s) per class over one run of ``workload``, by a probe of its own."""
    probe = TappedLockstat(KernelFacts(cgroup2_root=HostPaths().cgroup_v2()), timed_waits=timed_waits)
    probe.load()
    try:
        return tapped_window(probe, workload)
    finally:
        probe.close()


def runs(count: int, timed_waits: int, workload: list[str]) -> int:
    """Print each run's classes and the estimate's ratio to the truth; then their median."""
    ratios = []
    for run in range(count):
        classes = one_run(timed_waits, workload)
        true_s = sum(c[1] for c in classes)
        est_s = sum(c[2] for c in classes)
        ratios.append(est_s / true_s)
        parts = zip(CLASSES, classes, strict=True)
        detail = "; ".join(f"{name} {n} waits: {t:.4f} s, est {e:.4f} s" for name, (n, t, e) in parts)
        print(f"run {run}: mutex wait {true_s:.3f} s, estimated {est_s:.3f} s, ratio {ratios[-1]:.3f} | {detail}")
    print(
        f"estimate / truth: median {statistics.median(ratios):.3f}, range {min(ratios):.3f}-{max(ratios):.3f}"
        f" ({len(ratios)} runs)"
    )
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=8)
    ap.add_argument("--timed-waits", type=int, default=20_000, help="--lockstat-timed-waits of the tapped probe")
    ap.add_argument("--workload", choices=("pipe", "storm"), default="pipe")
    ap.add_argument("--seconds", type=float, default=2.0, help="of the pipe workload")
    ap.add_argument("--writers", type=int, default=6, help="of the pipe workload")
    ap.add_argument("--lock-ops", type=int, default=500_000, help="epoll_ctl calls per thread of the storm")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("bench needs root", file=sys.stderr)
        return 1
    KernelFacts().headers.apply_env()
    print(
        f"kernel {os.uname().release}; {os.cpu_count()} CPUs; {args.workload};"
        f" --lockstat-timed-waits {args.timed_waits}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        if args.workload == "storm":
            workload = [str(build_storm("lock_storm", Path(tmp))), "4", str(args.lock_ops)]
        else:
            workload = [sys.executable, "-m", "tests.contention", str(args.seconds), str(args.writers)]
        return runs(args.runs, args.timed_waits, workload)


if __name__ == "__main__":
    sys.exit(main())

"""Per-CPU utilisation and the node's CPU saturation: ``psutil`` (``/proc/stat`` per-CPU times,
``/proc/loadavg``) and the kernel's CPU pressure (``/proc/pressure/cpu``, PSI, Linux 4.20+: the
``some`` total, microseconds in which at least one runnable task waited for a CPU). All are node-wide,
not namespaced, so they read the same inside the DaemonSet's pod.

Saturation is judged on PSI over the window, not on the load average: the load counts tasks in
uninterruptible sleep (D state, disk and NFS waits) as well as runnable ones, and is a 1-minute
decaying average, not the window. A per-CPU run-queue length over the window would need
``/proc/schedstat`` (``CONFIG_SCHEDSTATS``), which kernels without schedstats (this one) lack; the
per-workload wait is the runqlat probe's. Without PSI (a kernel built without it, or ``psi=0``) the
load per CPU is judged, and the finding says so.

``CpuTimes`` is one reading; ``window()`` turns two into the shares of each CPU's time spent busy and
in interrupts (hard + soft: seed 001's NIC softirqs on one CPU). Pure from the readings on, so the
analysis is tested on fixed input.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

# psutil's per-CPU fields (Linux); "busy" is everything but idle and iowait, as mpstat's %idle.
FIELDS = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")
NOT_BUSY = ("idle", "iowait")
INTERRUPTS = ("irq", "softirq")


@dataclass(frozen=True)
class CpuTimes:
    """Seconds per field for each CPU since boot, and the 1-minute load average."""

    per_cpu: tuple[dict[str, float], ...]
    load1: float
    psi_some_us: float | None = None  # /proc/pressure/cpu "some" total; None without PSI
    at: float = 0.0  # time.monotonic() of the reading

    @classmethod
    def read(cls, pressure: Path = Path("/proc/pressure/cpu")) -> CpuTimes:
        per_cpu = tuple({f: getattr(t, f, 0.0) for f in FIELDS} for t in psutil.cpu_times(percpu=True))
        return cls(per_cpu, os.getloadavg()[0], psi_some(pressure), time.monotonic())


def psi_some(path: Path) -> float | None:
    """The ``some`` line's ``total=`` (us) of a PSI file, or None (no PSI here, or unreadable)."""
    try:
        text = path.read_text()
    except OSError:  # ENOENT without CONFIG_PSI; EOPNOTSUPP with psi=0 on the command line
        return None
    for line in text.splitlines():
        fields = line.split()
        if fields and fields[0] == "some":
            for f in fields[1:]:
                if f.startswith("total="):
                    return float(f[len("total=") :])
    return None


@dataclass(frozen=True)
class CpuShare:
    cpu: int
    busy: float  # share of the window, 0..1
    interrupts: float  # irq + softirq share
    fields: dict[str, float]  # every field's share


@dataclass(frozen=True)
class CpuWindow:
    cpus: tuple[CpuShare, ...]
    load1: float
    waiting: float | None = None  # share of the window some runnable task waited for a CPU (PSI)

    @property
    def mean_busy(self) -> float:
        return sum(c.busy for c in self.cpus) / len(self.cpus) if self.cpus else 0.0


def window(before: CpuTimes, after: CpuTimes) -> CpuWindow:
    shares = []
    for i, (a, b) in enumerate(zip(before.per_cpu, after.per_cpu, strict=False)):
        delta = {f: max(0.0, b[f] - a[f]) for f in FIELDS}
        total = sum(delta.values())
        if total <= 0:
            continue  # offline, or no tick elapsed
        fields = {f: v / total for f, v in delta.items()}
        busy = 1.0 - sum(fields[f] for f in NOT_BUSY)
        shares.append(CpuShare(i, busy, sum(fields[f] for f in INTERRUPTS), fields))
    waiting = None
    if before.psi_some_us is not None and after.psi_some_us is not None and after.at > before.at:
        waiting = min(1.0, max(0.0, (after.psi_some_us - before.psi_some_us) / 1e6 / (after.at - before.at)))
    return CpuWindow(tuple(shares), after.load1, waiting)

"""Every threshold the doctor judges by, in one place, named after what it measures.

The levels an alert rule also uses are the alert rules' own: ``scripts/gen_alerts.py`` imports them
from here and renders the rules from them, so the doctor and the alerts cannot drift apart (a test
checks the generator holds these very objects). Like the rules, the doctor fires when a value is
*above* a level (``>``), never at it. Those levels: CPU throttling above 25 % of CFS periods
(kubernetes-mixin's CPUThrottlingHigh), throttled above 5 % while using under half the limit (seeds
000, 002), ephemeral-port saturation above 0.75 (warning) and 0.9 (critical) of the range
(node-mixin's saturation levels), any port allocation failure (critical), any listen-queue overflow
(warning), a run-queue latency p99 above 10 ms (seed 000: 0.1 % of Redis requests above 10 ms). Where
an alert has one level, the doctor's CRIT level is the documented multiple below; where there is no
alert, the level is the doctor's own and says why.
"""

from __future__ import annotations

# --- CPU -------------------------------------------------------------------------------------------
CPU_UTILISATION_WARN = 0.90
"""Mean busy share of all CPUs over the window above which the node is nearly full."""
CPU_WAITING_WARN = 0.25
CPU_WAITING_CRIT = 0.50
"""Share of the window in which at least one runnable task waited for a CPU (PSI ``cpu some``): a
quarter of the time is queueing a latency-sensitive task notices; half is a node that is full."""
CPU_SATURATION_WARN = 1.0
CPU_SATURATION_CRIT = 2.0
"""Without PSI: the 1-minute load average per CPU (above 1 tasks wait on average; above 2 a lot)."""
IRQ_SHARE_WARN = 0.50
IRQ_SHARE_CRIT = 0.90
"""Share of one CPU's time in hard and soft interrupts (seed 001: one CPU at 100 % si)."""
IRQ_OTHERS_IDLE = 0.50
"""...while the other CPUs are on average busy less than this: the interrupts are not spread."""
RUNQ_P99_WARN_S = 0.010
RUNQ_P99_CRIT_S = 0.100
"""Run-queue latency p99 of a workload (seconds): the alert's 10 ms; CRIT at a whole CFS period."""
RUNQ_MIN_WAITS = 20
"""Waits a workload needs in the window before its p99 means anything."""
THROTTLE_RATIO_WARN = 0.25
THROTTLE_RATIO_CRIT = 0.50
"""Throttled CFS periods / periods of a workload: the alert's 25 %; CRIT when half the periods are."""
THROTTLE_MIN_PERIODS = 5
"""CFS periods a workload needs in the window before its ratio means anything."""
THROTTLED_LOW_USAGE_RATIO = 0.05
THROTTLED_LOW_USAGE = 0.50
"""Throttled in more than 5 % of periods while usage / limit stays below 0.5: "throttled while usage
is low" (seeds 000, 002; NodetuneCPUThrottledAtLowUsage): WARN, whatever the plain ratio's verdict."""

# --- network -------------------------------------------------------------------------------------------
PORT_SATURATION_WARN = 0.75
PORT_SATURATION_CRIT = 0.90
"""Ports in use towards one destination / usable ephemeral range of the namespace."""
PORT_FAILURES_CRIT = 0
"""connect() calls that found no free port in the window: any one (above 0) is CRIT, as the alert."""
LISTEN_OVERFLOWS_WARN = 0
"""Connections dropped by a full accept queue in the window: any one (above 0) is WARN, as the
alert (NodetuneListenQueueOverflows is a warning: the client retries its SYN after >= 1 s)."""
LISTEN_SATURATION_WARN = 0.75
"""Fullest accept queue / (backlog + 1) of a namespace's listeners, at BOTH ends of the window: one
instantaneous sample says little (listen(0) with one connection pending reads 1.0), and there is no
alert on it. Never CRIT: an overflow is what hurts, and that is counted above."""

# --- kernel locks ------------------------------------------------------------------------------------
LOCK_SPIN_SHARE_WARN = 0.05
LOCK_SPIN_SHARE_CRIT = 0.20
"""Time spent spinning on contended spinlocks and rwlocks / all CPU time of the window (spinning
burns the CPU; sleeping-lock waits are reported, not judged)."""
SPINNING_LOCK_TYPES = ("spinlock", "rwlock_read", "rwlock_write")

# --- rendering ---------------------------------------------------------------------------------------
TOP_OFFENDERS = 5
"""Workloads (or CPUs, callers, keys) named per finding."""
TOP_HISTOGRAMS = 3
"""Histograms drawn per finding: the worst workloads' run-queue latency, the busiest lock types."""

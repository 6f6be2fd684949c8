"""Two readings of the agent's metrics (and the CPU and tuning facts of the window) -> findings.

Pure: no I/O, no clock. Each check says which unit feeds it (``UNIT_OF``); a check whose unit could
not run here is a SKIP finding that says why (no BPF, a collector that failed), and the others are
judged as usual. Thresholds: ``thresholds.py``. The fixes are what the seeds found for each pattern.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from agent.doctor import thresholds as T
from agent.doctor.cpu import CpuWindow
from agent.doctor.findings import CRIT, OK, SKIP, WARN, Finding, Histogram, Offender, Report, worst
from agent.doctor.reading import Labels, Reading, bucket_increase, increase, quantile
from agent.doctor.tuning import TuningFacts

# Which unit (probe or collector, as named in nodetune_scrape_collector_success) feeds each check.
UNIT_OF = {
    "cpu.runqueue": "runqlat",
    "cpu.throttling": "throttling",
    "network.ports": "ports",
    "network.port_failures": "connect",
    "network.listen": "listen",
    "locks.contention": "lockstat",
    "tuning.profile": "tuning",
}
TITLES = {
    "cpu.utilisation": "CPU utilisation",
    "cpu.saturation": "CPU saturation",
    "cpu.interrupts": "interrupts on one CPU",
    "cpu.runqueue": "run-queue latency",
    "cpu.throttling": "CFS throttling",
    "network.ports": "ephemeral ports",
    "network.port_failures": "port allocation failures",
    "network.listen": "listen queues",
    "locks.contention": "kernel lock contention",
    "tuning.profile": "tuning profile",
    "tuning.thp": "transparent hugepages",
    "tuning.irqbalance": "irqbalance",
}


# --- formatting ------------------------------------------------------------------------------------
def pct(x: float) -> str:
    if x == 0 or x >= 0.01:
        return f"{x * 100:.0f}%"
    return f"{x * 100:.1f}%" if x >= 0.0005 else "<0.1%"  # not "0.0%": something was there


def duration(s: float) -> str:
    if s >= 1:
        return f"{s:.2f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.1f} ms"
    return f"{s * 1e6:.0f} us"


def workload_name(labels: Labels) -> str:
    d = dict(labels)
    if d.get("pod"):
        return "/".join(p for p in (d.get("namespace", ""), d["pod"], d.get("container", "")) if p)
    return d.get("cgroup") or "(unlabelled)"


def netns_name(labels: Labels) -> str:
    d = dict(labels)
    if d.get("pod"):
        return f"{d.get('namespace', '')}/{d['pod']}"
    return d.get("netns") or "(unlabelled)"


def judge(value: float, warn: float, crit: float | None) -> str:
    """Above a level (``>``), as the alert rules compare: at the level is not yet over it."""
    return CRIT if crit is not None and value > crit else WARN if value > warn else OK


def worse(a: str, b: str) -> str:
    return worst([a, b])


def _without(labels: Labels, *names: str) -> Labels:
    return tuple(kv for kv in labels if kv[0] not in names)


# --- checks ------------------------------------------------------------------------------------------
class Window:
    """The inputs of one diagnosis."""

    def __init__(
        self,
        before: Reading,
        after: Reading,
        cpu: CpuWindow | None,
        tuning: TuningFacts | None,
        unavailable: Mapping[str, str],
    ) -> None:
        self.before, self.after, self.cpu, self.tuning = before, after, cpu, tuning
        self.unavailable = unavailable
        self.seconds = max(after.at - before.at, 1e-9)
        self.ncpu = len(cpu.cpus) if cpu and cpu.cpus else 1

    def increase(self, name: str) -> dict[Labels, float]:
        return increase(self.before, self.after, name)


def _finding(check: str, verdict: str, summary: str, **kw: object) -> Finding:
    return Finding(check, TITLES[check], verdict, summary, **kw)  # type: ignore[arg-type]


def cpu_utilisation(w: Window) -> Finding:
    assert w.cpu is not None
    busiest = sorted(w.cpu.cpus, key=lambda c: -c.busy)[: T.TOP_OFFENDERS]
    offenders = tuple(
        Offender(
            "cpu",
            f"cpu{c.cpu}",
            c.busy,
            f"busy {pct(c.busy)}: user {pct(c.fields['user'] + c.fields['nice'])}, system "
            f"{pct(c.fields['system'])}, irq+softirq {pct(c.interrupts)}, iowait {pct(c.fields['iowait'])}",
        )
        for c in busiest
    )
    mean = w.cpu.mean_busy
    verdict = judge(mean, T.CPU_UTILISATION_WARN, None)
    fix = "the node is nearly full: move workloads away or add capacity" if verdict != OK else ""
    summary = f"{pct(mean)} busy on average over {len(w.cpu.cpus)} CPUs"
    return _finding(
        "cpu.utilisation",
        verdict,
        summary,
        value=mean,
        unit="ratio",
        warn=T.CPU_UTILISATION_WARN,
        offenders=offenders,
        fix=fix,
    )


def cpu_saturation(w: Window) -> Finding:
    assert w.cpu is not None
    per_cpu = w.cpu.load1 / w.ncpu
    load = f"1-min load {w.cpu.load1:.2f} on {w.ncpu} CPUs = {per_cpu:.2f} per CPU"
    if w.cpu.waiting is not None:  # PSI over the window: runnable tasks only
        value, warn, crit, unit = w.cpu.waiting, T.CPU_WAITING_WARN, T.CPU_WAITING_CRIT, "ratio"
        summary = f"tasks waited for a CPU {pct(value)} of the window (PSI cpu some); {load}"
    else:
        value, warn, crit, unit = per_cpu, T.CPU_SATURATION_WARN, T.CPU_SATURATION_CRIT, "load"
        summary = f"{load} (no /proc/pressure/cpu: the load counts D-state tasks too)"
    verdict = judge(value, warn, crit)
    fix = (
        "runnable tasks wait for a CPU: see run-queue latency for who waits, and throttling for limits"
        if verdict != OK
        else ""
    )
    return _finding("cpu.saturation", verdict, summary, value=value, unit=unit, warn=warn, crit=crit, fix=fix)


def cpu_interrupts(w: Window) -> Finding:
    assert w.cpu is not None
    cpus = w.cpu.cpus
    top = max(cpus, key=lambda c: c.interrupts)
    others = [c.busy for c in cpus if c.cpu != top.cpu]
    others_busy = sum(others) / len(others) if others else 0.0
    verdict = judge(top.interrupts, T.IRQ_SHARE_WARN, T.IRQ_SHARE_CRIT) if others_busy < T.IRQ_OTHERS_IDLE else OK
    fix = ""
    if verdict != OK:
        running = w.tuning is not None and w.tuning.irqbalance_running
        fix = (
            "spread the NIC's interrupts over CPUs: "
            + ("irqbalance runs but did not spread them: pin " if running else "start irqbalance or pin ")
            + "the NIC's IRQs with the profile's irq_affinity (seed 001), or RPS for a single-queue NIC"
        )
    summary = f"cpu{top.cpu} spends {pct(top.interrupts)} in irq+softirq; other CPUs {pct(others_busy)} busy"
    offenders = tuple(
        Offender("cpu", f"cpu{c.cpu}", c.interrupts, f"irq {pct(c.fields['irq'])}, softirq {pct(c.fields['softirq'])}")
        for c in sorted(cpus, key=lambda c: -c.interrupts)[: T.TOP_OFFENDERS]
        if c.interrupts > 0
    )
    return _finding(
        "cpu.interrupts",
        verdict,
        summary,
        value=top.interrupts,
        unit="ratio",
        warn=T.IRQ_SHARE_WARN,
        crit=T.IRQ_SHARE_CRIT,
        offenders=offenders,
        fix=fix,
    )


def _percentile_rows(hists: dict[Labels, list[tuple[float, int]]]) -> list[tuple[Labels, float, float, int]]:
    """(labels, p99, p50, waits) of every label set with enough waits, worst p99 first."""
    rows = []
    for labels, buckets in hists.items():
        n = sum(c for _le, c in buckets)
        if n < T.RUNQ_MIN_WAITS:
            continue
        rows.append((labels, quantile(0.99, buckets) or 0.0, quantile(0.5, buckets) or 0.0, n))
    rows.sort(key=lambda r: (-r[1], -r[3], r[0]))
    return rows


def per_pod(labels: Labels) -> Labels:
    """A pod's containers as one (the alert's ``sum without (container, cgroup)``); a host cgroup as is."""
    return _without(labels, "container", "cgroup") if dict(labels).get("pod") else labels


def _sum_per_pod(hists: dict[Labels, list[tuple[float, int]]]) -> dict[Labels, list[tuple[float, int]]]:
    out: dict[Labels, list[tuple[float, int]]] = {}
    for labels, buckets in hists.items():
        key = per_pod(labels)
        if key not in out:
            out[key] = list(buckets)
        else:
            out[key] = [(le, a + b) for (le, a), (_le, b) in zip(out[key], buckets, strict=True)]
    return out


def cpu_runqueue(w: Window) -> Finding:
    hists = _sum_per_pod(bucket_increase(w.before, w.after, "nodetune_runqueue_latency_seconds"))
    rows = _percentile_rows(hists)
    if not rows:
        return _finding("cpu.runqueue", OK, f"fewer than {T.RUNQ_MIN_WAITS} waits per workload in the window")
    labels, p99, _p50, _n = rows[0]
    verdict = judge(p99, T.RUNQ_P99_WARN_S, T.RUNQ_P99_CRIT_S)
    # A throttled task waits on its run queue until the next period: say so where it is the cause.
    throttled = {per_pod(lb) for r, lb, *_ in throttling_rows(w) if r > T.THROTTLE_RATIO_WARN}
    offenders = tuple(
        Offender(
            "workload",
            workload_name(lb),
            q99,
            f"p99 {duration(q99)}, p50 {duration(q50)}, {n} waits"
            + (" (throttled: see CFS throttling)" if lb in throttled else ""),
        )
        for lb, q99, q50, n in rows[: T.TOP_OFFENDERS]
    )
    histograms = tuple(
        Histogram(f"run-queue latency of {workload_name(lb)}", tuple(hists[lb])) for lb, *_ in rows[: T.TOP_HISTOGRAMS]
    )
    fix = (
        "tasks wait for a CPU: if the workload is throttled see CFS throttling; otherwise give it "
        "dedicated CPUs (Guaranteed QoS with the static CPU manager) or move busy neighbours away (seed 000)"
        if verdict != OK
        else ""
    )
    summary = f"worst p99 {duration(p99)}: {workload_name(labels)} ({len(rows)} workloads with waits)"
    return _finding(
        "cpu.runqueue",
        verdict,
        summary,
        value=p99,
        unit="seconds",
        warn=T.RUNQ_P99_WARN_S,
        crit=T.RUNQ_P99_CRIT_S,
        offenders=offenders,
        fix=fix,
        histograms=histograms,
    )


def throttling_rows(w: Window) -> list[tuple[float, Labels, float, float | None, float | None, bool]]:
    """(throttled ratio, labels, periods, usage in cores or None, limit in cores, usage is low) of
    every workload with enough CFS periods in the window, most throttled first. As the alert rules
    (gen_alerts.CPU_SELECTORS): pod containers and host cgroups, not a pod's own cgroup, which would
    repeat its containers."""
    periods = w.increase("nodetune_cpu_cfs_periods_total")
    throttled = w.increase("nodetune_cpu_cfs_throttled_periods_total")
    usage = w.increase("nodetune_cpu_usage_seconds_total")
    limits = w.after.get("nodetune_cpu_limit_cores")
    rows = []
    for labels, n in periods.items():
        d = dict(labels)
        if n < T.THROTTLE_MIN_PERIODS or (d.get("pod") and not d.get("container")):
            continue
        ratio = throttled.get(labels, 0.0) / n
        used = usage.get(labels)
        cores = used / w.seconds if used is not None else None
        limit = limits.get(labels)
        low = bool(limit) and cores is not None and cores / limit < T.THROTTLED_LOW_USAGE  # type: ignore[operator]
        rows.append((ratio, labels, n, cores, limit, low))
    rows.sort(key=lambda r: (-r[0], r[1]))
    return rows


def cpu_throttling(w: Window) -> Finding:
    rows = throttling_rows(w)
    if not rows:
        return _finding("cpu.throttling", OK, "no workload with a CPU limit ran long enough to judge")
    ratio, labels = rows[0][0], rows[0][1]

    def low_usage(row: tuple) -> bool:  # NodetuneCPUThrottledAtLowUsage
        return row[5] and row[0] > T.THROTTLED_LOW_USAGE_RATIO

    verdict = judge(ratio, T.THROTTLE_RATIO_WARN, T.THROTTLE_RATIO_CRIT)
    if any(low_usage(r) for r in rows):
        verdict = worse(verdict, WARN)
    offenders = []
    for r, lb, n, cores, limit, low in rows[: T.TOP_OFFENDERS]:
        if r == 0:
            break
        if cores is None:
            use = "usage unknown (no cpuacct)"
        else:
            use = f"usage {cores:.2f} of {limit:.2f} cores" if limit else f"usage {cores:.2f} cores"
        offenders.append(
            Offender(
                "workload",
                workload_name(lb),
                r,
                f"throttled in {pct(r)} of {n:.0f} periods, {use}" + (" (throttled while usage is low)" if low else ""),
            )
        )
    fix = ""
    if verdict != OK:
        bad = [r for r in rows if r[0] > T.THROTTLE_RATIO_WARN or low_usage(r)]
        parts = []
        if any(r[5] for r in bad):
            parts.append(
                "throttled while usage is low: bursts use up the quota within a CFS period; raise the CPU "
                "limit or allow CFS burst (cpu.cfs_burst_us / cpu.max.burst) (seed 000, Redis)"
            )
        if any(not r[5] for r in bad):
            parts.append("the workload needs more CPU than its limit: raise the limit (scheduling uses requests)")
        fix = "; ".join(parts)
    summary = f"{workload_name(labels)} throttled in {pct(ratio)} of its CFS periods"
    if ratio == 0:
        summary = f"no workload throttled ({len(rows)} with a CPU limit)"
    return _finding(
        "cpu.throttling",
        verdict,
        summary,
        value=ratio,
        unit="ratio",
        warn=T.THROTTLE_RATIO_WARN,
        crit=T.THROTTLE_RATIO_CRIT,
        offenders=tuple(offenders),
        fix=fix,
    )


PORTS_FIX = (
    "reuse connections to the upstream (keep-alive, a pool), widen net.ipv4.ip_local_port_range in "
    "that namespace, or remove the proxy hop (seed 000: nginx in front of jaguar)"
)


def network_ports(w: Window) -> Finding:
    saturation = w.after.get("nodetune_ephemeral_port_saturation_ratio")
    sizes = w.after.get("nodetune_ephemeral_port_range_size")
    in_use = w.after.get("nodetune_ephemeral_ports_in_use")
    if not saturation:
        return _finding("network.ports", OK, "no network namespace read")
    rows = []
    for labels, n in in_use.items():
        ns = _without(labels, "destination")
        size = sizes.get(ns, 0.0)
        rows.append((n / size if size else 0.0, ns, dict(labels).get("destination", ""), n, size))
    rows.sort(key=lambda r: (-r[0], r[1], r[2]))
    worst_ns, worst = max(saturation.items(), key=lambda kv: (kv[1], kv[0]))
    verdict = judge(worst, T.PORT_SATURATION_WARN, T.PORT_SATURATION_CRIT)
    offenders = tuple(
        Offender("netns", netns_name(ns), r, f"{n:.0f} of {size:.0f} ports in use towards {dest} ({pct(r)})")
        for r, ns, dest, n, size in rows[: T.TOP_OFFENDERS]
        if n > 0
    )
    summary = f"{netns_name(worst_ns)}: {pct(worst)} of its ephemeral ports in use towards one destination"
    return _finding(
        "network.ports",
        verdict,
        summary,
        value=worst,
        unit="ratio",
        warn=T.PORT_SATURATION_WARN,
        crit=T.PORT_SATURATION_CRIT,
        offenders=offenders,
        fix=PORTS_FIX if verdict != OK else "",
    )


def network_port_failures(w: Window) -> Finding:
    failures = {lb: n for lb, n in w.increase("nodetune_connect_port_allocation_failures_total").items() if n > 0}
    total = sum(failures.values())
    verdict = CRIT if total > T.PORT_FAILURES_CRIT else OK
    offenders = tuple(
        Offender("workload", workload_name(lb), n, f"{n:.0f} connect() calls found no free port (EADDRNOTAVAIL)")
        for lb, n in sorted(failures.items(), key=lambda kv: (-kv[1], kv[0]))[: T.TOP_OFFENDERS]
    )
    summary = f"{total:.0f} connect() calls found no free local port"
    return _finding(
        "network.port_failures",
        verdict,
        summary,
        value=total,
        unit="count",
        crit=T.PORT_FAILURES_CRIT,
        offenders=offenders,
        fix=PORTS_FIX if verdict != OK else "",
    )


def network_listen(w: Window) -> Finding:
    overflows = w.increase("nodetune_tcp_listen_overflows_total")
    drops = w.increase("nodetune_tcp_listen_drops_total")
    saturation = w.after.get("nodetune_tcp_listen_queue_saturation_ratio")
    earlier = w.before.get("nodetune_tcp_listen_queue_saturation_ratio")
    backlogs: dict[Labels, list[str]] = {}
    for labels, b in sorted(w.after.get("nodetune_tcp_listen_backlog").items()):
        backlogs.setdefault(_without(labels, "port"), []).append(f":{dict(labels)['port']} backlog {b:.0f}")
    namespaces = set(overflows) | set(saturation)
    if not namespaces:
        return _finding("network.listen", OK, "no network namespace read")
    rows = []
    for ns in namespaces:
        o, s = overflows.get(ns, 0.0), saturation.get(ns, 0.0)
        full = min(s, earlier.get(ns, 0.0))  # full at both ends of the window, not in one sample
        verdict = WARN if o > T.LISTEN_OVERFLOWS_WARN or full > T.LISTEN_SATURATION_WARN else OK
        rows.append((verdict == CRIT, verdict == WARN, o, s, ns, verdict))
    rows.sort(key=lambda r: (not r[0], not r[1], -r[2], -r[3], r[4]))
    verdict = rows[0][5]
    total = sum(overflows.values())
    offenders = []
    for _c, _w, o, s, ns, v in rows[: T.TOP_OFFENDERS]:
        if v == OK and o == 0:
            break
        small = backlogs.get(ns, [])
        detail = f"{o:.0f} overflows, {drops.get(ns, 0):.0f} drops, fullest accept queue {pct(s)}"
        if small:
            detail += "; below somaxconn: " + ", ".join(small[:3])
        offenders.append(Offender("netns", netns_name(ns), o, detail))
    fix = (
        "raise net.core.somaxconn in that namespace (a pod's: an allowed unsafe sysctl) and the server's "
        "listen() backlog (redis tcp-backlog, nginx listen ... backlog=) (seeds 001, 003)"
        if verdict != OK
        else ""
    )
    fullest = max(saturation.values(), default=0.0)
    summary = f"{total:.0f} connections dropped by full accept queues; fullest queue {pct(fullest)}"
    return _finding(
        "network.listen",
        verdict,
        summary,
        value=total,
        unit="count",
        warn=T.LISTEN_OVERFLOWS_WARN,
        offenders=tuple(offenders),
        fix=fix,
    )


def locks_contention(w: Window) -> Finding:
    hists = {
        dict(lb).get("lock_type", ""): b
        for lb, b in bucket_increase(w.before, w.after, "nodetune_lock_contention_wait_seconds").items()
    }
    counts = w.increase("nodetune_lock_contentions_total")
    waits = w.increase("nodetune_lock_contention_wait_seconds_total")
    per_workload = w.increase("nodetune_workload_lock_wait_seconds_total")
    spin = sum(s for lb, s in waits.items() if dict(lb).get("lock_type") in T.SPINNING_LOCK_TYPES)
    share = spin / (w.seconds * w.ncpu)
    verdict = judge(share, T.LOCK_SPIN_SHARE_WARN, T.LOCK_SPIN_SHARE_CRIT)
    offenders = []
    for lb, s in sorted(waits.items(), key=lambda kv: (-kv[1], kv[0]))[: T.TOP_OFFENDERS]:
        if s <= 0:
            break
        d = dict(lb)
        offenders.append(
            Offender(
                "caller",
                f"{d.get('caller', '')} ({d.get('lock_type', '')})",
                s,
                f"waited {duration(s)} over {counts.get(lb, 0):.0f} contentions",
            )
        )
    for lb, s in sorted(per_workload.items(), key=lambda kv: (-kv[1], kv[0]))[: T.TOP_OFFENDERS]:
        if s <= 0:
            break
        d = dict(lb)
        offenders.append(
            Offender(
                "workload",
                workload_name(_without(lb, "lock_type")),
                s,
                f"waited {duration(s)} for {d.get('lock_type', '')} locks",
            )
        )
    busiest = sorted(((sum(c for _le, c in b), t) for t, b in hists.items()), reverse=True)
    histograms = tuple(Histogram(f"{t} waits", tuple(hists[t])) for n, t in busiest[: T.TOP_HISTOGRAMS] if n > 0)
    n_total = sum(counts.values())
    fix = ""
    if verdict != OK:
        fix = "the callers name the kernel path that spins"
        if any("inet_hash_connect" in o.name or "inet_check_established" in o.name for o in offenders):
            fix = "spinning in connect()'s port search: the port range is crowded (seed 000); " + PORTS_FIX
    summary = f"{n_total:.0f} contentions; spinning took {pct(share)} of all CPU time"
    return _finding(
        "locks.contention",
        verdict,
        summary,
        value=share,
        unit="ratio",
        warn=T.LOCK_SPIN_SHARE_WARN,
        crit=T.LOCK_SPIN_SHARE_CRIT,
        offenders=tuple(offenders),
        fix=fix,
        histograms=histograms,
    )


def tuning_profile(w: Window) -> Finding:
    t = w.tuning
    assert t is not None
    if not t.profile:
        if not t.valid:
            fix = "fix the profile: the agent's log says why it was rejected (it keeps no profile meanwhile)"
            return _finding("tuning.profile", WARN, "no tuning profile in force: the profile read was invalid", fix=fix)
        return _finding("tuning.profile", OK, "no tuning profile in force")
    out = [k for k in t.keys if not k.in_sync]
    offenders = tuple(
        Offender(
            "key",
            f"{k.item} {k.key}",
            0.0 if k.in_sync else 1.0,
            ("in the profile" if k.in_sync else "out of the profile")
            + (f": {k.current} -> {k.wanted}" if k.current or k.wanted else ""),
        )
        for k in sorted(t.keys, key=lambda k: (k.in_sync, k.item, k.key))
    )
    # Out of the profile is a WARN only where someone asked for the profile: an enforcing agent's
    # (--from; as NodetuneTuningOutOfSync) or --profile given to a live run. The built-in profile in a
    # live run, or an observing agent's, is listed key by key: on an untuned node that is the report.
    verdict = WARN if (out and t.judged) or not t.valid else OK
    summary = f"profile {t.profile} ({t.mode}): {len(t.keys) - len(out)} of {len(t.keys)} keys as the profile wants"
    if out and not t.judged:
        summary += f"; not judged: {t.not_judged or 'nothing enforces it'}"
    if not t.valid:
        summary += "; the last profile read was invalid"
    fix = ""
    if verdict != OK:
        fix = "nodetune tune apply --profile FILE, or run the agent with --mode enforce" if out else ""
        if not t.valid:
            fix = "; ".join(p for p in (fix, "fix the profile: the agent's log says why it was rejected") if p)
    return _finding("tuning.profile", verdict, summary, value=len(out), unit="count", offenders=offenders, fix=fix)


def tuning_thp(w: Window) -> Finding:
    t = w.tuning
    assert t is not None
    if t.thp_enabled is None:
        return _finding("tuning.thp", SKIP, t.thp_reason or "transparent hugepages not readable")
    verdict = OK if t.thp_enabled == "never" else WARN
    fix = (
        "echo never > /sys/kernel/mm/transparent_hugepage/enabled, or thp: {enabled: never} in the profile "
        "(seed 001: Redis latency)"
        if verdict != OK
        else ""
    )
    return _finding("tuning.thp", verdict, f"enabled = {t.thp_enabled}", fix=fix)


def tuning_irqbalance(w: Window) -> Finding:
    t = w.tuning
    assert t is not None
    key = next((k for k in t.keys if (k.item, k.key) == ("irqbalance", "service")), None)
    state = "running" if t.irqbalance_running else "not running"
    if key is None:
        return _finding("tuning.irqbalance", OK, f"{state} (the profile does not manage it)")
    verdict = OK if key.in_sync else WARN
    fix = "" if key.in_sync else "the profile pins IRQs itself: stop irqbalance (nodetune tune apply) (seed 001)"
    summary = f"{state}, {'as' if key.in_sync else 'not as'} the profile wants"
    return _finding("tuning.irqbalance", verdict, summary, fix=fix)


CHECKS: tuple[tuple[str, Callable[[Window], Finding], str], ...] = (
    # (check, function, what it needs: "cpu", "tuning" or "metrics")
    ("cpu.utilisation", cpu_utilisation, "cpu"),
    ("cpu.saturation", cpu_saturation, "cpu"),
    ("cpu.interrupts", cpu_interrupts, "cpu"),
    ("cpu.runqueue", cpu_runqueue, "metrics"),
    ("cpu.throttling", cpu_throttling, "metrics"),
    ("network.ports", network_ports, "metrics"),
    ("network.port_failures", network_port_failures, "metrics"),
    ("network.listen", network_listen, "metrics"),
    ("locks.contention", locks_contention, "metrics"),
    ("tuning.profile", tuning_profile, "tuning"),
    ("tuning.thp", tuning_thp, "tuning"),
    ("tuning.irqbalance", tuning_irqbalance, "tuning"),
)


def analyse(
    before: Reading,
    after: Reading,
    cpu: CpuWindow | None,
    tuning: TuningFacts | None,
    unavailable: Mapping[str, str],
    node: str,
    source: str,
) -> Report:
    """Every check, in order. ``unavailable``: unit name -> why it did not run (its checks are SKIP)."""
    w = Window(before, after, cpu, tuning, unavailable)
    report = Report(node, source, round(w.seconds, 3), w.ncpu if cpu else 0)
    for check, fn, needs in CHECKS:
        unit = UNIT_OF.get(check)
        if unit in unavailable:
            report.findings.append(_finding(check, SKIP, f"{unit}: {unavailable[unit]}"))
        elif needs == "cpu" and not (cpu and cpu.cpus):
            report.findings.append(_finding(check, SKIP, "no per-CPU times read"))
        elif needs == "tuning" and tuning is None:
            report.findings.append(_finding(check, SKIP, "tuning: no state read"))
        else:
            report.findings.append(fn(w))
    return report

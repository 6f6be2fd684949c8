"""The doctor's judgement on fixed input (tests/agent/doctor/fixed.py): each seed's pattern gets its
verdict, the right workload and the seed's fix; a unit that did not run is a SKIP that says why."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest

from agent.doctor import thresholds as T
from agent.doctor.analyse import analyse
from agent.doctor.cpu import CpuTimes, window
from agent.doctor.findings import CRIT, OK, SKIP, WARN, Report
from agent.doctor.reading import Reading, bucket_increase, increase, quantile
from tests.agent.doctor import fixed


def report(unavailable: dict[str, str] | None = None, **kw: object) -> Report:
    before, after = fixed.readings()
    cpu = window(fixed.CPU_BEFORE, fixed.CPU_AFTER)
    return analyse(before, after, cpu, kw.get("tuning", fixed.TUNING), unavailable or {}, "node-a", "live")  # type: ignore[arg-type]


def by_id(r: Report) -> dict:
    return {f.id: f for f in r.findings}


def test_each_seed_pattern_gets_its_verdict_workload_and_fix() -> None:
    f = by_id(report())
    # seed 000: redis throttled in 40 % of periods at 0.3 of its 1-core limit
    thr = f["cpu.throttling"]
    assert thr.verdict == WARN and thr.value == pytest.approx(0.4)
    assert thr.offenders[0].name == "shop/redis-0/redis" and "usage is low" in thr.offenders[0].detail
    assert "CFS burst" in thr.fix and "raise the CPU" in thr.fix
    assert "usage is low" not in thr.offenders[1].detail  # cron uses 0.19 of 0.2: it needs more CPU
    # seed 000: nginx's namespace out of ports towards its upstream, and connect() failing
    ports = f["network.ports"]
    assert ports.verdict == CRIT and ports.offenders[0].name == "shop/nginx-7d9f"
    assert "10.0.3.7:8080" in ports.offenders[0].detail and "ip_local_port_range" in ports.fix
    fail = f["network.port_failures"]
    assert fail.verdict == CRIT and fail.value == 17 and fail.offenders[0].name == "shop/nginx-7d9f/nginx"
    # seeds 001/003: host listener overflowing, backlog 128 below somaxconn
    listen = f["network.listen"]
    assert listen.verdict == WARN and listen.value == 25 and listen.offenders[0].name == "host"
    assert ":6379 backlog 128" in listen.offenders[0].detail and "somaxconn" in listen.fix
    # seed 001: cpu0 in softirq while cpu1 idles
    irq = f["cpu.interrupts"]
    assert irq.verdict == CRIT and irq.offenders[0].name == "cpu0" and "irq_affinity" in irq.fix
    # seed 000: spinning in the port search, 1.4 s of 20 s of CPU
    locks = f["locks.contention"]
    assert locks.verdict == WARN and locks.value == pytest.approx(0.07)
    assert locks.offenders[0].name == "__inet_hash_connect (spinlock)" and "port search" in locks.fix
    assert [h.title for h in locks.histograms] == ["spinlock waits", "mutex waits"]
    # run-queue latency: redis p99 in its 8-16 ms bucket
    rq = f["cpu.runqueue"]
    assert rq.verdict == WARN and rq.offenders[0].name == "shop/redis-0"  # per pod, as the alert
    assert 0.008 < rq.value <= 0.016
    assert rq.offenders[0].detail.endswith("(throttled: see CFS throttling)")  # redis is, nginx is not
    assert "throttled" not in rq.offenders[1].detail
    assert "/system.slice/cron.service" not in [o.name for o in rq.offenders]  # 5 waits: too few to judge
    # tuning: THP madvise, one key out of the profile
    assert f["tuning.thp"].verdict == WARN and "never" in f["tuning.thp"].fix
    # an observing agent's profile: listed key by key, not judged (NodetuneTuningOutOfSync: enforce only)
    tp = f["tuning.profile"]
    assert tp.verdict == OK and tp.offenders[0].name == "thp enabled" and "not judged" in tp.summary
    enforced = by_id(report(tuning=replace(fixed.TUNING, mode="enforce", judged=True)))["tuning.profile"]
    assert enforced.verdict == WARN and "--mode enforce" in enforced.fix
    assert f["cpu.saturation"].verdict == OK


def test_exit_code_is_the_worst_verdict() -> None:
    r = report()
    assert r.verdict == CRIT and r.exit_code() == 2
    r.findings = [x for x in r.findings if x.verdict != CRIT]
    assert r.exit_code() == 1
    r.findings = [x for x in r.findings if x.verdict == OK]
    assert r.exit_code() == 0
    r.findings = []
    assert r.exit_code() == 3


def test_a_unit_that_did_not_run_is_skipped_with_its_reason_and_the_rest_is_judged() -> None:
    r = report({"runqlat": "not loadable here: no BTF", "lockstat": "left out (--probes)"})
    f = by_id(r)
    assert f["cpu.runqueue"].verdict == SKIP and "no BTF" in f["cpu.runqueue"].summary
    assert f["locks.contention"].verdict == SKIP and "--probes" in f["locks.contention"].summary
    assert f["cpu.throttling"].verdict == WARN and f["network.ports"].verdict == CRIT


def test_throttling_judged_at_the_alert_thresholds() -> None:
    def at(throttled: int) -> str:
        labels = 'cgroup="/a"'
        b = Reading.from_text(
            f"nodetune_cpu_cfs_periods_total{{{labels}}} 0\nnodetune_cpu_cfs_throttled_periods_total{{{labels}}} 0\n", 0
        )
        a = Reading.from_text(
            f"nodetune_cpu_cfs_periods_total{{{labels}}} 100\n"
            f"nodetune_cpu_cfs_throttled_periods_total{{{labels}}} {throttled}\n",
            10,
        )
        return by_id(analyse(b, a, None, None, {}, "n", "live"))["cpu.throttling"].verdict

    assert (at(25), at(26), at(50), at(51)) == (OK, WARN, WARN, CRIT)  # above, as the rules' ">"
    assert T.THROTTLE_RATIO_WARN == 0.25


def test_cpu_window_shares() -> None:
    w = window(fixed.CPU_BEFORE, fixed.CPU_AFTER)
    assert [round(c.interrupts, 2) for c in w.cpus] == [0.95, 0.0]
    assert [round(c.busy, 2) for c in w.cpus] == [1.0, 0.25]
    # a CPU with no tick in the window is left out, not divided by zero
    same = CpuTimes(fixed.CPU_BEFORE.per_cpu[:1], 0.0)
    assert window(same, same).cpus == ()


def test_counter_increase_skips_label_sets_that_came_or_went_and_survives_a_restart() -> None:
    b = Reading.from_text('x_total{a="1"} 5\nx_total{a="2"} 9\n', 0)
    a = Reading.from_text('x_total{a="1"} 7\nx_total{a="3"} 1\nx_total{a="2"} 4\n', 1)
    assert increase(b, a, "x_total") == {(("a", "1"),): 2, (("a", "2"),): 4}


def test_quantile_interpolates_as_histogram_quantile() -> None:
    # 100 waits: 50 in (0, 1us], 50 in (1, 2us]: the median is 1 us, p75 1.5 us
    buckets = [(1e-6, 50), (2e-6, 50), (math.inf, 0)]
    assert quantile(0.5, buckets) == pytest.approx(1e-6)
    assert quantile(0.75, buckets) == pytest.approx(1.5e-6)
    assert quantile(0.99, [(1e-6, 1), (math.inf, 99)]) == 1e-6  # in +Inf: the largest finite bound
    assert quantile(0.99, [(1e-6, 0)]) is None


def test_histogram_buckets_of_the_window() -> None:
    b, a = fixed.readings()
    hists = bucket_increase(b, a, "nodetune_lock_contention_wait_seconds")
    spin = next(v for k, v in hists.items() if dict(k)["lock_type"] == "spinlock")
    assert len(spin) == 24 and math.isinf(spin[-1][0])
    assert {le: c for le, c in spin if c} == {8e-6: 2000, 16e-6: 5000, 32e-6: 1500, 64e-6: 500}


def judged(before: str, after: str, check: str, seconds: float = 10.0):
    b, a = Reading.from_text(before, 0), Reading.from_text(after, seconds)
    return by_id(analyse(b, a, None, None, {}, "n", "live"))[check]


def cfs(labels: str, periods: float, throttled: float, usage: float | None, limit: float | None) -> str:
    text = (
        f"nodetune_cpu_cfs_periods_total{{{labels}}} {periods}\n"
        f"nodetune_cpu_cfs_throttled_periods_total{{{labels}}} {throttled}\n"
    )
    if usage is not None:
        text += f"nodetune_cpu_usage_seconds_total{{{labels}}} {usage}\n"
    if limit is not None:
        text += f"nodetune_cpu_limit_cores{{{labels}}} {limit}\n"
    return text


def test_throttled_at_low_usage_is_judged_at_the_alerts_own_levels() -> None:
    """Review 3: throttled in 20 % of periods (under CPUThrottlingHigh's 25 %) at 0.1 of a 1-core limit
    is NodetuneCPUThrottledAtLowUsage (> 5 % throttled, < 50 % of the limit): WARN, with its fix."""
    c = 'cgroup="/burst"'
    thr = judged(cfs(c, 0, 0, 0, 1), cfs(c, 100, 20, 1.0, 1), "cpu.throttling")
    assert thr.verdict == WARN, thr
    assert "usage is low" in thr.offenders[0].detail and "CFS burst" in thr.fix
    assert "needs more CPU" not in thr.fix
    # a usage counter missing is not "low usage": that ratio is not judged without it
    thr = judged(cfs(c, 0, 0, None, 1), cfs(c, 100, 20, None, 1), "cpu.throttling")
    assert thr.verdict == OK and "usage is low" not in thr.offenders[0].detail, thr
    # at 5 % exactly the alert does not fire (its ">"), and neither does the doctor
    assert judged(cfs(c, 0, 0, 0, 1), cfs(c, 100, 5, 1.0, 1), "cpu.throttling").verdict == OK


def test_thresholds_are_the_alert_rules_own() -> None:
    """One source: scripts/gen_alerts.py renders the rules from the constants the doctor judges by."""
    import importlib.util

    from tests.conftest import REPO

    spec = importlib.util.spec_from_file_location("gen_alerts_for_doctor", REPO / "scripts/gen_alerts.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)  # type: ignore[union-attr]
    assert gen.THROTTLED_RATIO is T.THROTTLE_RATIO_WARN
    assert gen.LOW_USAGE_THROTTLED_RATIO is T.THROTTLED_LOW_USAGE_RATIO
    assert gen.LOW_USAGE_MAX_RATIO is T.THROTTLED_LOW_USAGE
    assert gen.RUNQUEUE_P99_S is T.RUNQ_P99_WARN_S
    assert (gen.PORTS_WARNING_RATIO, gen.PORTS_CRITICAL_RATIO) == (T.PORT_SATURATION_WARN, T.PORT_SATURATION_CRIT)
    assert gen.PORTS_CRITICAL_RATIO is T.PORT_SATURATION_CRIT


def listen(overflows: float, saturation: float) -> str:
    ns = 'namespace="",pod="",netns="web"'
    return (
        f"nodetune_tcp_listen_overflows_total{{{ns}}} {overflows}\n"
        f"nodetune_tcp_listen_drops_total{{{ns}}} {overflows}\n"
        f"nodetune_tcp_listen_queue_saturation_ratio{{{ns}}} {saturation}\n"
    )


def test_listen_overflows_warn_as_their_alert_and_one_full_sample_is_not_crit() -> None:
    """Review 6: NodetuneListenQueueOverflows is a warning; a queue full in one instantaneous sample
    (listen(0) with one connection pending reads 1.0) is no CRIT, and not even a WARN unless it was
    full at both ends of the window."""
    f = judged(listen(0, 0), listen(3, 0), "network.listen")
    assert f.verdict == WARN and f.value == 3 and f.warn == 0 and f.crit is None, f
    assert judged(listen(0, 0), listen(0, 1.0), "network.listen").verdict == OK
    full = judged(listen(0, 1.0), listen(0, 1.0), "network.listen")
    assert full.verdict == WARN and "somaxconn" in full.fix, full


def test_a_label_set_new_in_a_live_window_counts_from_zero() -> None:
    """Review 2: a BPF row made at a workload's first event after load (live) counts in full; from a
    remote agent's /metrics it is left out, as Prometheus' increase() has nothing before it."""
    b = Reading.from_text('x_total{a="1"} 5\n', 0)
    text = 'x_total{a="1"} 7\nx_total{a="3"} 40\n'
    assert increase(b, Reading.from_text(text, 1), "x_total") == {(("a", "1"),): 2}
    live_b = Reading(0, b.samples, new_from_zero=True)
    live_a = Reading(1, Reading.from_text(text, 1).samples, new_from_zero=True)
    assert increase(live_b, live_a, "x_total") == {(("a", "1"),): 2, (("a", "3"),): 40}
    fail = 'nodetune_connect_port_allocation_failures_total{cgroup="/new"} 40\n'
    w_b, w_a = Reading(0, {}, new_from_zero=True), Reading(10, Reading.from_text(fail, 10).samples, True)
    pf = by_id(analyse(w_b, w_a, None, None, {}, "n", "live"))["network.port_failures"]
    assert pf.verdict == CRIT and pf.value == 40 and pf.offenders[0].name == "/new"


def test_cpu_saturation_is_the_windows_pressure_not_the_load_average(tmp_path) -> None:
    """Lesser point: the 1-min load counts D-state tasks and is no window. PSI's ``cpu some`` over the
    window is judged when the kernel has it; without it the load, and the summary says so."""
    from agent.doctor.cpu import psi_some

    before, after = fixed.CPU_BEFORE, fixed.CPU_AFTER
    f = by_id(report())["cpu.saturation"]
    assert f.verdict == OK and f.value == pytest.approx(0.15) and "PSI" in f.summary
    # a node whose load is 8 per CPU from tasks in D state, none waiting for a CPU: OK
    d_state = [replace(before, load1=16.0, psi_some_us=0.0), replace(after, load1=16.0, psi_some_us=0.0)]
    b, a = fixed.readings()
    sat = by_id(analyse(b, a, window(*d_state), fixed.TUNING, {}, "n", "live"))["cpu.saturation"]
    assert sat.verdict == OK and sat.value == 0.0, sat
    busy = [replace(before, psi_some_us=0.0), replace(after, psi_some_us=6e6)]  # 6 s of 10: 60 %
    assert by_id(analyse(b, a, window(*busy), fixed.TUNING, {}, "n", "live"))["cpu.saturation"].verdict == CRIT
    no_psi = [replace(before, load1=5.0, psi_some_us=None), replace(after, load1=5.0, psi_some_us=None)]
    sat = by_id(analyse(b, a, window(*no_psi), fixed.TUNING, {}, "n", "live"))["cpu.saturation"]
    assert sat.verdict == CRIT and sat.unit == "load" and "no /proc/pressure/cpu" in sat.summary
    # the PSI file as the kernel writes it; absent: None
    psi = tmp_path / "cpu"
    psi.write_text(
        "some avg10=1.00 avg60=0.50 avg300=0.10 total=123456\nfull avg10=0.00 avg60=0.00 avg300=0.00 total=0\n"
    )
    assert psi_some(psi) == 123456.0 and psi_some(tmp_path / "none") is None


def test_pods_are_judged_as_the_alerts_aggregate_them() -> None:
    """Lesser points: throttling leaves out a pod's own cgroup (container="", as CPU_SELECTORS), which
    would name the pod a second time; run-queue p99 is per pod, its containers' waits summed (the
    alert's ``sum without (container, cgroup)``)."""
    pod = 'namespace="shop",pod="web-1",cgroup=""'
    text = cfs(pod + ',container="app"', 100, 40, 5, 1) + cfs(pod + ',container=""', 100, 40, 5, 1)
    zero = cfs(pod + ',container="app"', 0, 0, 0, 1) + cfs(pod + ',container=""', 0, 0, 0, 1)
    thr = judged(zero, text, "cpu.throttling")
    assert [o.name for o in thr.offenders] == ["shop/web-1/app"], thr.offenders
    # 15 fast waits in one container, 15 in another with 1 slow each: neither has 20 waits alone;
    # the pod has 30, and its p99 is in the slow bucket
    from metrics.histogram import BUCKET_LE

    def hist(container: str, slots: dict[int, int]) -> str:
        lines, total = [], 0
        for s, le in enumerate(BUCKET_LE):
            total += slots.get(s, 0)
            lines.append(f'nodetune_runqueue_latency_seconds_bucket{{{pod},container="{container}",le="{le}"}} {total}')
        return "\n".join(lines) + "\n"

    empty = hist("a", {}) + hist("b", {})
    rq = judged(empty, hist("a", {1: 15}) + hist("b", {1: 14, 15: 1}), "cpu.runqueue")
    assert [o.name for o in rq.offenders] == ["shop/web-1"] and "30 waits" in rq.offenders[0].detail, rq
    assert rq.verdict == WARN and rq.value > T.RUNQ_P99_WARN_S

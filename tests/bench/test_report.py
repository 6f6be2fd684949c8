"""bench/report.py's pure logic: summaries and confidence intervals, budget verdicts, figures from
each benchmark's JSON, rendering and the README block. No benchmark runs here."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

import pytest

from bench import report
from bench.report_stats import BOUND_ABOVE, MET, NOISE, NOT_MET, bootstrap_ci, percentile, summarize, verdict


def test_percentile_interpolates_between_ranks_like_numpy() -> None:
    assert percentile([4, 1, 3, 2], 25) == 1.75
    assert percentile([4, 1, 3, 2], 50) == 2.5
    assert percentile([1, 2, 3, 4], 100) == 4
    assert percentile([7], 99) == 7
    with pytest.raises(ValueError):
        percentile([], 50)


def test_bootstrap_interval_holds_the_median_and_is_reproducible() -> None:
    values = [1.00, 1.02, 0.98, 1.10, 1.04, 0.97, 1.01, 1.03, 1.06, 0.99]
    lo, hi = bootstrap_ci(values)
    assert min(values) <= lo <= statistics.median(values) <= hi <= max(values)
    assert (lo, hi) == bootstrap_ci(values), "seeded: the same report renders the same"
    assert bootstrap_ci([3.0, 3.0, 3.0]) == (3.0, 3.0)
    assert bootstrap_ci([5.0]) == (5.0, 5.0)
    # more rounds of the same spread give a narrower interval
    wide = bootstrap_ci(values[:4])
    narrow = bootstrap_ci(values * 10)
    assert narrow[1] - narrow[0] < wide[1] - wide[0]


def test_summary_of_p99_and_max() -> None:
    values = [float(v) for v in range(1, 101)]
    s = summarize(values, "p99")
    assert s["value"] == pytest.approx(99.01)
    assert s["median"] == 50.5 and s["n"] == 100 and s["min"] == 1 and s["max"] == 100
    assert s["ci95"][0] <= s["value"] <= s["ci95"][1]
    m = summarize([3.0, 9.0, 4.0], "max")
    assert m["value"] == 9.0 and m["ci95"][1] == 9.0
    with pytest.raises(ValueError):
        summarize([1.0], "mean")


@pytest.mark.parametrize(
    ("ci", "expected"),
    [([0.98, 1.04], MET), ([0.98, 1.05], MET), ([1.051, 1.2], NOT_MET), ([1.01, 1.08], NOISE)],
)
def test_verdict_against_a_limit(ci: list[float], expected: str) -> None:
    assert verdict({"ci95": ci}, 1.05) == expected


@pytest.mark.parametrize(
    ("ci", "expected"), [([0.98, 1.05], MET), ([1.051, 1.2], BOUND_ABOVE), ([1.01, 1.08], BOUND_ABOVE)]
)
def test_an_upper_bound_shows_a_budget_met_never_missed(ci: list[float], expected: str) -> None:
    assert verdict({"ci95": ci}, 1.05, upper_bound=True) == expected


def raw_runs() -> dict[str, dict[str, Any]]:
    """What each benchmark's --json writes, small: the shapes report.py reads."""
    start = {"healthz_s": 0.5, "settled_s": 1.0, "steps": {}, "anon_ready": 60, "anon_scraped": 62}
    samples = {
        "nodetune": [
            {"t": 5.0 * i, "scrape_s": 0.03, "rss_mib": 95 + i * 0.1, "anon_mib": 60, "cpu_s": 0.02 * i}
            for i in range(19)
        ],
        "node_exporter": [
            {"t": 5.0 * i, "scrape_s": 0.01, "rss_mib": 20, "anon_mib": 10, "cpu_s": 0.04 * i} for i in range(19)
        ],
    }
    lock = {"lockstat": [1.01, 1.03, 1.02, 1.00, 1.02], "empty programs": [1.0, 1.01, 0.99, 1.0, 1.0]}
    lock_storm = {
        "command": "bench/lock_storm 4 200000",
        "ratios": {**lock, "lockstat timing every wait": [1.2, 1.18, 1.22, 1.19, 1.21], "off": [1e6] * 5},
        "ns_per_event": {"defaults": {"lockstat:begin": [115, 10]}, "timed_waits=0": {"lockstat:begin": [176, 10]}},
        "bpf_bound": {"defaults": [1.10, 1.12, 1.09], "timed_waits=0": [1.3, 1.31, 1.29]},
    }
    connect = {
        "command": "bench/connect_storm 10000",
        "ratios": {"connect tracepoint": [1.1, 1.2, 1.15], "empty tracepoint": [1.0, 1.02, 1.01], "off": [1] * 3},
        "ns_per_event": {"tracepoint": {"connect:prog": [180, 60000]}},
        "bpf_bound": {"tracepoint": [1.011, 1.012, 1.010]},
        "refused": {"fexit": "EPERM"},
    }
    wl_round = {
        "off": {"pipe usecs_per_op": 10.0, "redis GET rps": 40000.0, "redis GET p99_ms": 1.0},
        "on": {"pipe usecs_per_op": 10.5, "redis GET rps": 38000.0, "redis GET p99_ms": 1.1},
    }
    pertool = {"nodetune": [140, 138, 141], "runqlat-bpfcc": [990, 1000, 980], "empty raw_tp": [74, 75, 73]}
    return {
        "footprint": {"command": "python bench/footprint.py", "ok": True, "raw": [
            {**start, "arm": "warm", "readyz_s": 1.5 + i / 10, "rss_ready": 93, "rss_scraped": 97, "idle_cpu_pct": 0.5}
            for i in range(3)
        ]},
        "scrape": {"command": "python bench/scrape_cost.py", "ok": True, "raw": {
            "workloads": 500, "series": 501, "cpus": 2, "seconds": [0.03 + i / 10000 for i in range(60)],
            "body_bytes": 3_260_000, "gzip_bytes": 85_000,
        }},
        "idle": {"command": "python bench/report_idle.py", "ok": True, "raw": {"interval_s": 5.0, "samples": samples}},
        "workloads": {"command": "python bench/report_workloads.py", "ok": True, "raw": {
            "commands": {"pipe": "perf bench sched pipe", "redis": "redis-benchmark -t set,get"},
            "rounds": [wl_round, wl_round],
            "bpf_ns_per_op": {"pipe": {"runqlat": [300.0, 310.0, 290.0], "lockstat": [5.0, 5.0, 5.0],
                                       "all": [305.0, 315.0, 295.0]}},
        }},
        "runqlat": {"command": "python bench/runqlat_overhead.py", "ok": True, "raw": {
            "rounds": 3,
            "bpf_cost": {"pipe": {"command": "perf bench sched pipe", "ns_per_switch": pertool,
                                  "programs": {"nodetune": {"switch": [60, 61, 62]}}, "ratios": [0.14, 0.14, 0.15]}},
            "pipe": {"command": "perf bench sched pipe",
                     "ratios": {"nodetune": [1.0, 1.1], "runqlat-bpfcc": [1.3, 1.2]}},
        }},
        "locks": {"command": "python bench/lock_connect_overhead.py", "ok": True, "raw": {
            "rounds": 5, "lock_storm": lock_storm, "connect_storm": connect,
            "syscall": {"command": "perf bench syscall basic", "ratios": {"all probes": [1.0, 1.01, 0.99]}},
        }},
        "network": {"command": "python bench/network_cost.py", "ok": False, "error": "exit 1: no netns"},
    }  # fmt: skip


META = {
    "command": "python bench/report.py --quick",
    "quick": True,
    "date": "2026-12-02 12:00 UTC",
    "commit": "abc",
    "machine": {"cpu_model": "CPU", "cpus": 2, "memory_gib": 24, "kernel": "6.1", "loadavg_start": 1, "loadavg_end": 2},
}


def built() -> dict[str, Any]:
    return report.build(raw_runs(), META)


def test_figures_and_verdicts_from_every_benchmark() -> None:
    rep = built()
    figures = {f["id"]: f for f in rep["figures"]}
    budgets = {b["figure"]: b for b in rep["budgets"]}
    assert budgets["footprint.readyz_warm"]["verdict"] == MET  # 1.5..1.7 s
    assert budgets["scrape.median"]["verdict"] == MET
    assert figures["scrape.p99"]["summary"]["value"] == pytest.approx(35.841)  # 30.0..35.9 ms, rank 58.41
    assert budgets["locks.lock_storm"]["verdict"] == MET  # 1.00..1.03
    assert budgets["locks.connect"]["verdict"] == NOT_MET  # every round 1.1 or more
    assert figures["locks.connect"]["floor"]["label"] == "empty tracepoint"
    # the programs' own time as a bound, judged on its own: within the budget it shows it met;
    # above it, nothing
    assert budgets["locks.connect_bpf"]["verdict"] == MET
    assert budgets["locks.lock_storm_bpf"]["verdict"] == BOUND_ABOVE
    assert budgets["runqlat.pipe.ratio"]["verdict"] == MET
    # idle: 6-scrape windows; the agent used 0.02 s per scrape, the exporter 0.04
    assert figures["idle.cpu_per_scrape"]["summary"]["median"] == pytest.approx(20.0)
    assert figures["idle.cpu_per_scrape"]["peer"]["summary"]["median"] == pytest.approx(40.0)
    assert figures["idle.cpu_ratio"]["values"] == pytest.approx([0.5, 0.5, 0.5])
    assert budgets["idle.cpu_ratio"]["verdict"] == MET
    assert figures["idle.cpu_pct"]["summary"]["median"] == pytest.approx(0.4)
    assert figures["idle.rss_max"]["summary"]["value"] == pytest.approx(96.8)
    # a rate's cost ratio is off/on, a time's on/off: both > 1 when the agent slows the workload
    assert figures["workloads.redis GET rps"]["values"] == pytest.approx([40000 / 38000] * 2)
    assert figures["workloads.pipe usecs_per_op"]["values"] == pytest.approx([1.05, 1.05])
    assert figures["workloads.pipe usecs_per_op"]["command"] == "perf bench sched pipe"
    bpf = figures["workloads.bpf.pipe"]
    assert bpf["summary"]["median"] == 305.0 and bpf["unit"] == "ns"
    assert "lockstat 5.0, runqlat 300.0" in bpf["note"]
    # the budget whose figure no run produced says why
    assert budgets["runqlat.messaging.ratio"]["verdict"] == "not measured"
    assert "no such figure" in budgets["runqlat.messaging.ratio"]["why"]


def test_a_failed_benchmark_is_reported_and_the_others_still_count() -> None:
    runs = raw_runs()
    runs["locks"] = {"command": "python bench/lock_connect_overhead.py", "ok": False, "error": "exit 1: BPF refused"}
    runs["scrape"]["raw"] = {"seconds": []}  # output it cannot read
    rep = report.build(runs, META)
    budgets = {b["figure"]: b for b in rep["budgets"]}
    assert budgets["locks.lock_storm"]["verdict"] == "not measured"
    assert "BPF refused" in budgets["locks.lock_storm"]["why"]
    assert budgets["scrape.median"]["verdict"] == "not measured"
    assert "could not be read" in rep["runs"]["scrape"]["error"]
    assert budgets["footprint.readyz_warm"]["verdict"] == MET
    runs["throttling"] = {"command": "python bench/throttling_cost.py", "ok": True, "output": "scrape: 12 ms\n"}
    md = report.render_md(report.build(runs, META), [])
    assert "**locks failed**" in md and "**scrape failed**" in md and "**network failed**" in md
    assert "<summary>throttling: <code>python bench/throttling_cost.py</code></summary>" in md
    assert "scrape: 12 ms" in md


def test_markdown_and_readme_block_render_from_report_json(tmp_path: Path) -> None:
    rep = json.loads(json.dumps(built()))  # as read back from report.json
    md = report.render_md(rep, [str(tmp_path / "ratios.png")])
    assert "| lock storm ≤ ×1.05 | ×1.02 (CI " in md
    assert "| connect storm ≤ ×1.05 | ×1.15 " in md and "**not met**" in md
    assert "![ratios](plots/ratios.png)" in md
    readme = "# x\n\n## Overhead\nhand-written\n" + report.BEGIN + "\nold\n" + report.END + "\nafter\n"
    new = report.update_readme(readme, report.readme_block(rep, []))
    assert new.startswith("# x\n\n## Overhead\nhand-written\n" + report.BEGIN)
    assert new.endswith(report.END + "\nafter\n")
    assert "old" not in new and "python bench/report.py --quick" in new
    assert report.update_readme(new, report.readme_block(rep, [])) == new, "rewriting is idempotent"
    with pytest.raises(ValueError):
        report.update_readme("# no markers\n", "block")


def test_idle_windows() -> None:
    samples = [{"t": 5.0 * i, "cpu_s": 0.1 * i} for i in range(13)]
    windows = report.idle_windows(samples, window=6)
    assert [(round(c, 6), w, n) for c, w, n in windows] == [(0.6, 30.0, 6), (0.6, 30.0, 6)]
    assert report.idle_windows(samples[:6], window=6) == []

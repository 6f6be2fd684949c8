"""One benchmark report: runs every benchmark, writes bench/report.json, bench/report.md, a plot per
family (bench/plots/*.png) and, with ``--readme``, the README's generated block. Not a test.

Each benchmark runs as its own process (``python bench/<script>.py ... --json <tmp>``), one after
the other, so a benchmark that fails (its exit status, its error) is reported as failed and the
others still run. From their per-round figures this script derives, for each figure, the median,
quartiles, min..max, the number of rounds and a bootstrap 95 % confidence interval
(bench/report_stats.py), and for each budget of the issue a verdict: met, not met, or not shown
beyond noise (the interval straddles the limit).

    make bench                              # full: python bench/report.py --readme README.md
    make bench BENCH_ARGS=--quick           # few rounds, a smoke run (about 10 minutes)
    python bench/report.py --from bench/report.json --readme README.md   # render again, no run

Run as root (the benchmarks load BPF programs). Rendering (``--from``) needs neither root nor BPF;
the plots need matplotlib (``make bench-deps``), and are skipped with a note without it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.report_stats import BOUND_ABOVE, MET, NOISE, NOT_MET, summarize, verdict

REPO = Path(__file__).resolve().parent.parent
BEGIN, END = "<!-- report:begin -->", "<!-- report:end -->"
IDLE_WINDOW = 6  # scrapes per CPU window of the idle run (30 s at 5 s: 3 ticks of 10 ms are 1 %)


@dataclass(frozen=True)
class Bench:
    script: str
    quick: tuple[str, ...]
    full: tuple[str, ...]
    what: str
    json: bool = True  # takes --json PATH; else only its output's tail is kept (no figures)
    quick_too: bool = True  # run in --quick mode as well


# In this order: footprint first warms the header cache the others start the agent with.
BENCHES: dict[str, Bench] = {
    "footprint": Bench(
        "bench/footprint.py",
        ("--rounds", "2", "--arms", "warm", "--idle-seconds", "20"),
        ("--rounds", "7", "--arms", "warm,cold", "--idle-seconds", "40"),
        "the agent's start, RSS and idle CPU (a scrape every 5 s)",
    ),
    "scrape": Bench(
        "bench/scrape_cost.py",
        ("--workloads", "500", "--scrapes", "60"),
        ("--workloads", "500", "--scrapes", "60"),
        "/metrics at 500 pod cgroups",
    ),
    "idle": Bench(
        "bench/report_idle.py",
        ("--seconds", "120"),
        ("--seconds", "900"),
        "the agent and prometheus-node-exporter on one node, both scraped every 5 s",
    ),
    "workloads": Bench(
        "bench/report_workloads.py",
        ("--rounds", "3", "--pipe-loops", "50000", "--syscalls", "2000000", "--redis-requests", "50000"),
        ("--rounds", "10"),
        "perf bench and redis-benchmark with the agent on vs off",
    ),
    "runqlat": Bench(
        "bench/runqlat_overhead.py",
        ("--rounds", "3", "--loops", "50000"),
        ("--rounds", "10"),
        "the runqlat probe against runqlat-bpfcc and an empty program",
    ),
    "locks": Bench(
        "bench/lock_connect_overhead.py",
        ("--rounds", "3", "--seconds", "1"),
        ("--rounds", "10", "--storm-rounds-factor", "10"),  # 100 storm rounds: a CI of a few per cent
        "lockstat and connect probes on their storms, the syscall tax",
    ),
    # No budget of the report's: their printed output is kept as it is (full mode only).
    "throttling": Bench(
        "bench/throttling_cost.py",
        (),
        (),
        "the CFS throttling collector at 500 containers",
        json=False,
        quick_too=False,
    ),
    "network": Bench(
        "bench/network_cost.py", (), (), "ephemeral ports and listen queues, 100 netns", json=False, quick_too=False
    ),
    "network_churn": Bench(
        "bench/network_cost.py",
        ("--churn",),
        ("--churn",),
        "the same with connection churn",
        json=False,
        quick_too=False,
    ),
    "api_storm": Bench("bench/api_storm.py", (), (), "300 agents against one API server", json=False, quick_too=False),
    "seed_000": Bench(
        "bench/seed_000.py",
        (),
        (),
        "seed 000: a proxy's workers connecting to one upstream",
        json=False,
        quick_too=False,
    ),
}

# (figure id, what the issue asks, limit): the figure's statistic must be <= limit.
BUDGETS: list[tuple[str, str, float]] = [
    ("footprint.readyz_warm", "start → /readyz ≤ 2 s", 2.0),
    ("footprint.rss_scraped", "RSS ≤ 150 MiB (aim ≤ 100)", 150.0),
    ("idle.rss_max", "RSS flat ≤ 150 MiB over the idle run (highest sample)", 150.0),
    ("footprint.idle_cpu", "idle CPU ≤ 1 % of a core, a scrape every 5 s", 1.0),
    ("idle.cpu_pct", "idle CPU ≤ 1 % of a core, next to node_exporter", 1.0),
    ("idle.cpu_ratio", "CPU per scrape on an idle node ≤ node_exporter's (ratio ≤ 1)", 1.0),
    ("scrape.median", "/metrics at 500 pod cgroups, median ≤ 50 ms", 50.0),
    ("scrape.p99", "/metrics at 500 pod cgroups, p99 ≤ 100 ms", 100.0),
    ("locks.lock_storm", "lock storm ≤ ×1.05", 1.05),
    ("locks.connect", "connect storm ≤ ×1.05", 1.05),
    ("locks.lock_storm_bpf", "lock storm ≤ ×1.05: lockstat's own BPF time, a worst-case bound", 1.05),
    ("locks.connect_bpf", "connect storm ≤ ×1.05: the connect probe's own BPF time, a worst-case bound", 1.05),
    ("runqlat.pipe.ratio", "runqlat per-event cost ≤ runqlat-bpfcc's (pipe)", 1.0),
    ("runqlat.messaging.ratio", "runqlat per-event cost ≤ runqlat-bpfcc's (hackbench)", 1.0),
]


# ---------------------------------------------------------------------------------------------
# Running


def machine() -> dict[str, Any]:
    cpuinfo = Path("/proc/cpuinfo").read_text()
    model = re.search(r"^model name\s*:\s*(.+)$", cpuinfo, re.M)
    mem = re.search(r"^MemTotal:\s*(\d+) kB", Path("/proc/meminfo").read_text(), re.M)
    return {
        "cpu_model": model.group(1).strip() if model else platform.processor(),
        "cpus": os.cpu_count(),
        "memory_gib": round(int(mem.group(1)) / 2**20, 1) if mem else None,
        "kernel": platform.release(),
        "loadavg_start": os.getloadavg()[0],
    }


def commit() -> str:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()

    try:
        head = git("rev-parse", "--short=12", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no", "--", "agent", "probes", "bench")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+changes" if dirty else "")


def run_bench(name: str, bench: Bench, quick: bool, timeout: float) -> dict[str, Any]:
    """Runs one benchmark; {"command", "ok", "seconds", "raw"} or {"command", "ok": False, "error"}."""
    args = bench.quick if quick else bench.full
    command = " ".join(["python", bench.script, *args])
    with tempfile.TemporaryDirectory(prefix=f"nodetune-report-{name}-") as tmp:
        out = Path(tmp) / "out.json"
        argv = [sys.executable, bench.script, *args] + (["--json", str(out)] if bench.json else [])
        t0, load0 = time.monotonic(), os.getloadavg()[0]
        print(f"report: {name}: {command}", flush=True)
        try:
            res = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as e:
            return {"command": command, "ok": False, "error": f"timed out after {timeout:.0f} s: {e.stdout!s:.500}"}
        seconds = time.monotonic() - t0
        load = {"loadavg": [load0, os.getloadavg()[0]]}
        print(res.stdout[-3000:], res.stderr[-2000:], sep="\n", flush=True)
        if res.returncode != 0 or (bench.json and not out.exists()):
            tail = (res.stderr.strip() or res.stdout.strip())[-1500:]
            error = f"exit {res.returncode}: {tail}"
            return {"command": command, "ok": False, "seconds": seconds, "error": error} | load
        if not bench.json:
            return {"command": command, "ok": True, "seconds": seconds, "output": res.stdout[-6000:]} | load
        return {"command": command, "ok": True, "seconds": seconds, "raw": json.loads(out.read_text())} | load


# ---------------------------------------------------------------------------------------------
# Figures (pure: from the benchmarks' raw JSON)


def figure(
    fid: str,
    label: str,
    unit: str,
    values: list[float],
    command: str,
    stat: str = "median",
    peer: tuple[str, list[float]] | None = None,
    floor: tuple[str, list[float]] | None = None,
    note: str = "",
    upper_bound: bool = False,
) -> dict[str, Any]:
    """``upper_bound``: the values bound the figure from above (it can show a budget met, never missed)."""
    f: dict[str, Any] = {"id": fid, "label": label, "unit": unit, "command": command, "note": note}
    if upper_bound:
        f["upper_bound"] = True
    f["summary"] = summarize(values, stat)
    f["values"] = values
    if peer:
        f["peer"] = {"label": peer[0], "summary": summarize(peer[1], stat), "values": peer[1]}
    if floor:
        f["floor"] = {"label": floor[0], "summary": summarize(floor[1], stat), "values": floor[1]}
    return f


def where_a_start_goes(starts: list[dict[str, Any]]) -> str:
    """Medians of a start's steps, from the agent's log: 'medians: /healthz at 0.47 s (...);
    headers 0.01 s (...); headers and probes 0.99 s'."""
    parts = []
    for key, text in (
        ("healthz_s", "/healthz at {:.2f} s (interpreter, imports, server)"),
        ("headers ready", "headers {:.2f} s (merged into the cache when cold)"),
        ("probes loaded", "headers and probes {:.2f} s"),
    ):
        values = [s[key] if key in s else s["steps"][key] for s in starts if key in s or key in s["steps"]]
        if values:
            parts.append(text.format(statistics.median(values)))
    return "medians: " + "; ".join(parts) if parts else ""


def footprint_figures(raw: list[dict[str, Any]], command: str) -> list[dict[str, Any]]:
    out = []
    for arm in ("warm", "cold"):
        starts = [s for s in raw if s["arm"] == arm]
        if not starts:
            continue
        out.append(
            figure(
                f"footprint.readyz_{arm}",
                f"start → /readyz 200, {arm} header cache",
                "s",
                [s["readyz_s"] for s in starts],
                command,
                note=where_a_start_goes(starts),
            )
        )
    warm = [s for s in raw if s["arm"] == "warm"] or raw
    out.append(
        figure(
            "footprint.rss_scraped",
            "RSS after 20 scrapes (warm start)",
            "MiB",
            [s["rss_scraped"] for s in warm],
            command,
        )
    )
    out.append(
        figure(
            "footprint.idle_cpu",
            "idle CPU, a scrape every 5 s",
            "% of a core",
            [s["idle_cpu_pct"] for s in warm],
            command,
        )
    )
    return out


def scrape_figures(raw: dict[str, Any], command: str) -> list[dict[str, Any]]:
    ms = [s * 1e3 for s in raw["seconds"]]
    what = f"/metrics at {raw['workloads']} pod cgroups ({raw['series']} runqlat series, {raw['cpus']} CPUs)"
    note = f"body {raw['body_bytes'] / 1e6:.2f} MB, {raw['gzip_bytes'] / 1e3:.0f} kB gzip"
    return [
        figure("scrape.median", what + ", median", "ms", ms, command, note=note),
        figure("scrape.p99", what + ", p99", "ms", ms, command, stat="p99", note=note),
    ]


def idle_windows(samples: list[dict[str, float]], window: int = IDLE_WINDOW) -> list[tuple[float, float, int]]:
    """(CPU seconds, wall seconds, scrapes) of each run of ``window`` consecutive scrapes."""
    out = []
    for i in range(window, len(samples), window):
        a, b = samples[i - window], samples[i]
        out.append((b["cpu_s"] - a["cpu_s"], b["t"] - a["t"], window))
    return out


def idle_figures(raw: dict[str, Any], command: str) -> list[dict[str, Any]]:
    agent, exporter = raw["samples"]["nodetune"], raw["samples"]["node_exporter"]
    wa, we = idle_windows(agent), idle_windows(exporter)
    if not wa:
        raise ValueError(f"idle run too short: {len(agent)} samples, need more than {IDLE_WINDOW}")
    per_scrape_a = [cpu / n * 1e3 for cpu, _, n in wa]
    per_scrape_e = [cpu / n * 1e3 for cpu, _, n in we]
    pct_a = [100 * cpu / wall for cpu, wall, _ in wa]
    pct_e = [100 * cpu / wall for cpu, wall, _ in we]
    pairs = [(a, e) for a, e in zip(per_scrape_a, per_scrape_e, strict=True) if e > 0]
    secs = raw["interval_s"] * IDLE_WINDOW
    note = f"per window of {IDLE_WINDOW} scrapes ({secs:.0f} s); CPU is utime+stime (10 ms ticks)"
    out = [
        figure(
            "idle.cpu_per_scrape",
            "CPU per scrape, idle node (CPU between scrapes included)",
            "ms",
            per_scrape_a,
            command,
            peer=("node_exporter", per_scrape_e),
            note=note,
        ),
        figure(
            "idle.cpu_pct",
            "idle CPU, a scrape every 5 s",
            "% of a core",
            pct_a,
            command,
            peer=("node_exporter", pct_e),
            note=note,
        ),
        figure(
            "idle.rss_max",
            "RSS over the idle run, highest sample",
            "MiB",
            [s["rss_mib"] for s in agent],
            command,
            stat="max",
            peer=("node_exporter", [s["rss_mib"] for s in exporter]),
        ),
        figure(
            "idle.scrape_ms",
            "scrape time, idle node",
            "ms",
            [s["scrape_s"] * 1e3 for s in agent],
            command,
            peer=("node_exporter", [s["scrape_s"] * 1e3 for s in exporter]),
        ),
    ]
    if pairs:
        skipped = len(per_scrape_a) - len(pairs)
        out.append(
            figure(
                "idle.cpu_ratio",
                "CPU per scrape, nodetune / node_exporter",
                "×",
                [a / e for a, e in pairs],
                command,
                note=note + (f"; {skipped} windows without exporter CPU left out" * bool(skipped)),
            )
        )
    rss = [s["rss_mib"] for s in agent]
    growth = rss[-1] - rss[0]
    out.append(
        figure(
            "idle.rss_growth", f"RSS growth over {agent[-1]['t']:.0f} s (last − first sample)", "MiB", [growth], command
        )
    )
    return out


WORKLOAD_LABELS = {
    "pipe usecs_per_op": "perf bench sched pipe (pinned), time per op",
    "syscall usecs_per_op": "perf bench syscall basic, time per op",
}


def workload_figures(raw: dict[str, Any], command: str) -> list[dict[str, Any]]:
    rounds = raw["rounds"]
    out = []
    for key in rounds[0]["off"]:
        ratios = []
        for r in rounds:
            on, off = r["on"][key], r["off"][key]
            ratios.append(off / on if key.endswith(" rps") else on / off)  # a cost ratio: > 1 is slower
        if key.endswith(" rps"):
            label = f"{key.removesuffix(' rps')} requests/s, off/on"
        elif key.endswith(" p99_ms"):
            label = f"{key.removesuffix(' p99_ms')} p99 latency, on/off"
        else:
            label = WORKLOAD_LABELS.get(key, key) + ", on/off"
        off = statistics.median(r["off"][key] for r in rounds)
        unit = "req/s" if key.endswith(" rps") else "ms" if key.endswith("_ms") else "µs/op"
        note = f"agent off: {off:,.4g} {unit}"
        base = key.split(" ")[0] if not key.startswith("redis -P") else "redis -P 16"
        cmd = raw["commands"].get(base, command)
        out.append(figure(f"workloads.{key}", label, "×", ratios, cmd, note=note))
    per_op = {"pipe": "pipe round trip", "syscall": "getppid()", "redis": "redis request", "redis -P 16": "request"}
    for name, probes in raw.get("bpf_ns_per_op", {}).items():
        parts = ", ".join(f"{p} {statistics.median(v):.1f}" for p, v in sorted(probes.items()) if p != "all")
        label = f"{name}: the agent's BPF time per {per_op.get(name, 'operation')} (bpf_stats)"
        note = f"medians per probe: {parts}; node-wide counters (other work's events during the run count too:"
        note += " an upper bound), and the timing itself adds about 70 ns per program run"
        out.append(
            figure(f"workloads.bpf.{name}", label, "ns", probes["all"], raw["commands"].get(name, command), note=note)
        )
    return out


def runqlat_figures(raw: dict[str, Any], command: str) -> list[dict[str, Any]]:
    out = []
    for workload, r in raw["bpf_cost"].items():
        per = r["ns_per_switch"]
        progs = ", ".join(f"{p} {sorted(v)[len(v) // 2]:.0f}" for p, v in sorted(r["programs"]["nodetune"].items()))
        out.append(
            figure(
                f"runqlat.{workload}.ns",
                f"runqlat BPF ns per context switch, {r['command']}",
                "ns",
                per["nodetune"],
                command,
                peer=("runqlat-bpfcc", per["runqlat-bpfcc"]),
                floor=("empty raw_tp", per["empty raw_tp"]),
                note=f"ns/event: {progs}",
            )
        )
        out.append(
            figure(
                f"runqlat.{workload}.ratio",
                f"runqlat / runqlat-bpfcc, BPF ns per switch ({workload})",
                "×",
                r["ratios"],
                command,
            )
        )
    pipe = raw["pipe"]
    out.append(
        figure(
            "runqlat.pipe_throughput",
            "perf bench sched pipe, runqlat probe on/off",
            "×",
            pipe["ratios"]["nodetune"],
            pipe["command"],
            peer=("runqlat-bpfcc", pipe["ratios"]["runqlat-bpfcc"]),
        )
    )
    return out


def _events(events: dict[str, list[float]]) -> str:
    return ", ".join(f"{label} {ns:.0f} ns" for label, (ns, _cnt) in events.items())


BOUND_NOTE = "per storm run, bpf_stats on: W/(W−B), W the run's time, B the programs' time in it"


def locks_figures(raw: dict[str, Any], command: str) -> list[dict[str, Any]]:
    out = []
    if "lock_storm" in raw:
        s = raw["lock_storm"]
        ev = s["ns_per_event"]
        out.append(
            figure(
                "locks.lock_storm",
                f"lock storm ({s['command']}), lockstat on/off",
                "×",
                s["ratios"]["lockstat"],
                command,
                floor=("empty programs", s["ratios"]["empty programs"]),
                note=f"bpf_stats: {_events(ev['defaults'])}",
            )
        )
        out.append(
            figure(
                "locks.lock_storm_timed",
                "lock storm, lockstat timing every wait, on/off",
                "×",
                s["ratios"]["lockstat timing every wait"],
                command,
                note=f"bpf_stats: {_events(ev['timed_waits=0'])}",
            )
        )
        if "bpf_bound" in s:  # reports from before 2026-12-03 have none
            out.append(
                figure(
                    "locks.lock_storm_bpf",
                    "lock storm: lockstat's own BPF time as a cost ratio, worst case (all of it on the critical path)",
                    "×",
                    s["bpf_bound"]["defaults"],
                    command,
                    note=BOUND_NOTE,
                    upper_bound=True,
                )
            )
    if "epoll" in raw:
        s = raw["epoll"]
        out.append(
            figure(
                "locks.epoll",
                f"{s['command']}, lockstat on/off",
                "×",
                s["ratios"]["lockstat"],
                command,
                floor=("empty programs", s["ratios"]["empty programs"]),
                note=f"bpf_stats: {_events(s['ns_per_event'])}",
            )
        )
    if "connect_storm" in raw:
        s = raw["connect_storm"]
        arms = [a for a in s["ratios"] if a.startswith("connect ")]
        for i, arm in enumerate(arms):
            strategy = arm.removeprefix("connect ")
            fid = "locks.connect" if i == 0 else f"locks.connect_{strategy}"
            label = f"connect storm ({s['command']}), connect probe on/off, {strategy}"
            note = (
                "the strategy auto takes here; " if i == 0 else ""
            ) + f"bpf_stats: {_events(s['ns_per_event'][strategy])}"
            out.append(
                figure(
                    fid,
                    label,
                    "×",
                    s["ratios"][arm],
                    command,
                    floor=(f"empty {strategy}", s["ratios"][f"empty {strategy}"]),
                    note=note,
                )
            )
            if strategy in s.get("bpf_bound", {}):
                out.append(
                    figure(
                        f"{fid}_bpf",
                        f"connect storm: the probe's own BPF time as a cost ratio, worst case, {strategy}",
                        "×",
                        s["bpf_bound"][strategy],
                        command,
                        note=BOUND_NOTE,
                        upper_bound=True,
                    )
                )
    if "syscall" in raw:
        s = raw["syscall"]
        out.append(
            figure(
                "locks.syscall",
                f"{s['command']}, all default probes (in-process) on/off",
                "×",
                s["ratios"]["all probes"],
                command,
            )
        )
    return out


EXTRACT = {
    "footprint": footprint_figures,
    "scrape": scrape_figures,
    "idle": idle_figures,
    "workloads": workload_figures,
    "runqlat": runqlat_figures,
    "locks": locks_figures,
}


def build(runs: dict[str, dict[str, Any]], meta: dict[str, Any]) -> dict[str, Any]:
    """The report: meta, every run (with its raw figures), the figures and the budgets' verdicts."""
    figures: list[dict[str, Any]] = []
    for name, run in runs.items():
        if not run.get("ok") or name not in EXTRACT:
            continue
        try:
            for f in EXTRACT[name](run["raw"], run["command"]):
                f["bench"] = name
                figures.append(f)
        except (KeyError, ValueError, TypeError, IndexError, ZeroDivisionError) as e:
            run["ok"] = False
            run["error"] = f"its output could not be read: {type(e).__name__}: {e}"
    by_id = {f["id"]: f for f in figures}
    budgets = []
    for fid, text, limit in BUDGETS:
        bench = fid.split(".")[0]
        b: dict[str, Any] = {"figure": fid, "budget": text, "limit": limit}
        if fid in by_id:
            f = by_id[fid]
            b["verdict"] = verdict(f["summary"], limit, upper_bound=f.get("upper_bound", False))
        else:
            run = runs.get(bench)
            b["verdict"] = "not measured"
            b["why"] = (
                "not run"
                if run is None
                else f"{bench} failed: {run.get('error', '')}"
                if not run.get("ok")
                else "no such figure in this run"
            )
        budgets.append(b)
    return {**meta, "runs": runs, "figures": figures, "budgets": budgets}


# ---------------------------------------------------------------------------------------------
# Rendering


def fmt(x: float) -> str:
    if x == 0:
        return "0"
    a = abs(x)
    if a >= 100:
        return f"{x:.0f}"
    if a >= 10:
        return f"{x:.1f}"
    if a >= 1:
        return f"{x:.2f}"
    return f"{x:.3f}"


def measured(s: dict[str, Any], unit: str) -> str:
    """'33.8 ms (CI 31.0–35.2; 29.1..43.2, n=60)'"""
    u = "" if unit == "×" else f" {unit}"
    head = f"×{fmt(s['value'])}" if unit == "×" else f"{fmt(s['value'])}{u}"
    if s["stat"] != "median":
        head = f"{s['stat']} {head}"
    if s["n"] == 1:
        return head + " (n=1)"
    lo, hi = s["ci95"]
    return f"{head} (CI {fmt(lo)}–{fmt(hi)}; {fmt(s['min'])}..{fmt(s['max'])}, n={s['n']})"


def compared(f: dict[str, Any]) -> str:
    parts = [f"{p['label']} {measured(p['summary'], f['unit'])}" for p in (f.get("peer"), f.get("floor")) if p]
    return "; ".join(parts) or "—"


VERDICT_MARK = {MET: "**met**", NOT_MET: "**not met**", NOISE: "not shown beyond noise", BOUND_ABOVE: BOUND_ABOVE}


def budget_table(report: dict[str, Any]) -> list[str]:
    by_id = {f["id"]: f for f in report["figures"]}
    lines = ["| budget | measured (median, 95 % CI; min..max, rounds) | peer / floor | verdict | notes |"]
    lines.append("|---|---|---|---|---|")
    for b in report["budgets"]:
        f = by_id.get(b["figure"])
        if f is None:
            why = b.get("why", "").replace("\n", " ").replace("|", "/")[:160]
            lines.append(f"| {b['budget']} | not measured: {why} | | not measured | |")
            continue
        lines.append(
            f"| {b['budget']} | {measured(f['summary'], f['unit'])} | {compared(f)} | "
            f"{VERDICT_MARK.get(b['verdict'], b['verdict'])} | {f['note']} |"
        )
    return lines


def figure_table(report: dict[str, Any]) -> list[str]:
    in_budget = {b["figure"] for b in report["budgets"]}
    lines = ["| figure | measured (median, 95 % CI; min..max, rounds) | peer / floor | notes |", "|---|---|---|---|"]
    for f in report["figures"]:
        if f["id"] in in_budget:
            continue
        lines.append(f"| {f['label']} | {measured(f['summary'], f['unit'])} | {compared(f)} | {f['note']} |")
    return lines


def header(report: dict[str, Any]) -> list[str]:
    m = report["machine"]
    modes: dict[str, list[str]] = {}
    for name, run in report["runs"].items():
        modes.setdefault(run.get("mode", "quick" if report["quick"] else "full"), []).append(name)
    if len(modes) == 1:
        mode = "quick mode (few rounds: a smoke run)" if "quick" in modes else "full mode"
    else:
        mode = "; ".join(f"{kind} mode for {', '.join(names)}" for kind, names in modes.items())
    return [
        f"`{report['command']}`, {mode}, {report['date']}, commit `{report['commit']}`.",
        f"Machine: {m['cpus']} × {m['cpu_model']}, {m['memory_gib']} GiB, kernel {m['kernel']}, "
        f"load average {m['loadavg_start']:.1f} at the start and {m.get('loadavg_end', 0):.1f} at the end "
        "(a shared machine: other work runs alongside).",
    ]


def failures(report: dict[str, Any]) -> list[str]:
    bad = [(n, r) for n, r in report["runs"].items() if not r.get("ok")]
    out = []
    for name, run in bad:
        err = run.get("error", "").strip().replace("\n", " ")[-600:]
        out.append(f"- **{name} failed** (`{run['command']}`): {err}")
    return out


def render_md(report: dict[str, Any], plots: list[str]) -> str:
    lines = ["# nodetune benchmark report", "", "Generated by `bench/report.py`: do not edit by hand.", ""]
    lines += [*header(report), "", "## Budgets", "", *budget_table(report), ""]
    lines += [
        "A ratio is a cost ratio per round (time with the agent or probe over time without it; for a rate,",
        "the rate without over the rate with), the rounds interleaved. *met*: the whole 95 % bootstrap",
        "interval of the median is within the budget; *not met*: all of it is beyond; otherwise",
        "*not shown beyond noise*. The floor is empty programs on the same hooks (what any tool pays there).",
        "Where the machine's swings hide a few per cent, a second row bounds the probe's cost by its programs'",
        "own run time (kernel bpf_stats, every storm run): removing B ns of work shortens a run of W ns by at",
        "most B, so W/(W−B) bounds the cost ratio those programs can cause, even with all of their time on",
        "the critical path. It leaves out effects beyond their own time (cache misses, a waiter put to sleep).",
        "A bound over the budget shows nothing either way: *not shown by the bound*.",
        "",
        "## Other figures",
        "",
        *figure_table(report),
        "",
    ]
    if fails := failures(report):
        lines += ["## Failed benchmarks", "", *fails, ""]
    if printed := [(n, r) for n, r in report["runs"].items() if r.get("ok") and "output" in r]:
        lines += ["## Printed output of the benchmarks without figures", ""]
        for name, run in printed:
            lines += [f"<details><summary>{name}: <code>{run['command']}</code></summary>", "", "```"]
            lines += [run["output"].rstrip(), "```", "", "</details>", ""]
    lines += ["## Commands", ""]
    for name, run in report["runs"].items():
        took = f", {run['seconds']:.0f} s" if "seconds" in run else ""
        mode = run.get("mode", "quick" if report["quick"] else "full")
        took += f", {mode} mode, {run['date']}" if "date" in run else ""
        took += ", load average {:.1f} → {:.1f}".format(*run["loadavg"]) if "loadavg" in run else ""
        lines.append(f"- {name}: `{run['command']}` ({BENCHES[name].what if name in BENCHES else ''}{took})")
    lines.append("")
    if plots:
        lines += ["## Plots", ""] + [f"![{Path(p).stem}](plots/{Path(p).name})" for p in plots] + [""]
    return "\n".join(lines)


def readme_block(report: dict[str, Any], plots: list[str]) -> str:
    lines = [
        BEGIN,
        "<!-- generated by bench/report.py --readme README.md; edit bench/report.py instead -->",
        "",
        *header(report),
        "Every figure, its rounds and command: [bench/report.md](bench/report.md) and `bench/report.json`.",
        "",
        *budget_table(report),
        "",
    ]
    if fails := failures(report):
        lines += [*fails, ""]
    if plots:
        lines += [" ".join(f"![{Path(p).stem}](bench/plots/{Path(p).name})" for p in plots), ""]
    lines.append(END)
    return "\n".join(lines)


def update_readme(text: str, block: str) -> str:
    """``text`` with the block between the markers replaced; the markers must be there once."""
    if text.count(BEGIN) != 1 or text.count(END) != 1 or text.index(BEGIN) > text.index(END):
        raise ValueError(f"README needs exactly one {BEGIN} ... {END} block")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return head + block + tail


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="few rounds of each benchmark (a smoke run)")
    ap.add_argument(
        "--only",
        action="append",
        choices=list(BENCHES),
        help="benchmarks to run (default: all); the others keep their figures from the last report.json",
    )
    ap.add_argument("--from", dest="source", type=Path, help="render this report.json again; run nothing")
    ap.add_argument("--out", type=Path, default=REPO / "bench", help="where report.json/.md and plots/ go")
    ap.add_argument("--readme", type=Path, help="rewrite this README's report block")
    ap.add_argument("--timeout", type=float, help="seconds per benchmark (default: 1800 quick, 7200 full)")
    args = ap.parse_args()
    if args.source:
        report = json.loads(args.source.read_text())
    else:
        if os.geteuid() != 0:
            sys.exit("run as root (the benchmarks load BPF programs)")
        meta = {
            "command": " ".join(["python bench/report.py", *sys.argv[1:]]),
            "quick": args.quick,
            "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "commit": commit(),
            "machine": machine(),
        }
        timeout = args.timeout or (1800 if args.quick else 7200)
        runs: dict[str, dict[str, Any]] = {}
        previous = args.out / "report.json"
        if args.only and previous.exists():  # the benchmarks not run again keep their last run
            last = json.loads(previous.read_text())
            runs = {n: r for n, r in last["runs"].items() if n in BENCHES}
            for r in runs.values():
                r.setdefault("mode", "quick" if last["quick"] else "full")
        for name in args.only or [n for n, b in BENCHES.items() if b.quick_too or not args.quick]:
            runs[name] = run_bench(name, BENCHES[name], args.quick, timeout)
            runs[name] |= {"date": meta["date"], "mode": "quick" if args.quick else "full"}
        runs = {n: runs[n] for n in BENCHES if n in runs}
        meta["machine"]["loadavg_end"] = os.getloadavg()[0]
        report = build(runs, meta)
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.source:  # first: whatever the rendering does, the measurements are kept
        (args.out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    from bench.report_plots import render_plots

    plots, note = render_plots(report, args.out / "plots")
    if note:
        print(f"report: {note}", file=sys.stderr)
    (args.out / "report.md").write_text(render_md(report, plots))
    if args.readme:
        args.readme.write_text(update_readme(args.readme.read_text(), readme_block(report, plots)))
    print("\n".join(budget_table(report)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

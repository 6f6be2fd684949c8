"""Workloads with the agent on (all default probes and collectors, scraped every 5 s) vs off.
Not a test.

Workloads, each timed in every state of every round:

* ``perf bench sched pipe`` pinned to CPU 0 (two context switches and two wakeups per op): usecs/op;
* ``perf bench syscall basic`` (getppid in a loop): usecs/op;
* a real ``redis-server`` (loopback, no persistence) under ``redis-benchmark -t set,get``, each
  not pipelined and pipelined (``-P 16``): requests per second and p99 latency of each command.

A round runs every workload with the agent off and with it on, the order alternating round by
round (off/on, on/off, ...); "on" is one real agent (``python -m agent.cli run``, its defaults),
started for that round, ready and settled before the first workload and ended by its pid after
the last. The report (bench/report.py) takes per-round on/off cost ratios and their median with a
bootstrap confidence interval.

On a busy machine those ratios swing far more than the agent costs, so a last pass measures what
noise cannot move: one agent with ``--bpf-stats`` (the kernel times each run of its programs; the
timing itself adds about 70 ns per run) runs every workload ``--stats-rounds`` times, and the
growth of ``nodetune_probe_bpf_run_seconds_total`` over a run, divided by the run's operations
(pipe round trips, getppid calls, redis requests), is the BPF time the agent's probes add per
operation, per probe.

Run as root: ``python bench/report_workloads.py --rounds 10 --json out.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.footprint import free_port
from bench.report_agent import running_agent, scrape_seconds, stop

SCRAPE_INTERVAL = 5.0


def perf_usecs(argv: list[str]) -> float:
    out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    m = re.search(r"([\d.]+)\s+usecs/op", out)
    if not m:
        raise RuntimeError(f"unexpected perf output: {out}")
    return float(m.group(1))


def redis_benchmark(argv: list[str]) -> dict[str, dict[str, float]]:
    """{"SET": {"rps": .., "p99_ms": ..}, "GET": ...} from ``redis-benchmark --csv``."""
    out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    rows = list(csv.DictReader(io.StringIO(out)))
    if not rows or "rps" not in rows[0] or "p99_latency_ms" not in rows[0]:
        raise RuntimeError(f"unexpected redis-benchmark output: {out[-1000:]}")
    return {row["test"]: {"rps": float(row["rps"]), "p99_ms": float(row["p99_latency_ms"])} for row in rows}


@contextlib.contextmanager
def redis_server() -> Iterator[int]:
    """A throwaway redis-server on a free loopback port; yields the port."""
    binary = shutil.which("redis-server")
    if binary is None or shutil.which("redis-benchmark") is None:
        raise RuntimeError("redis-server/redis-benchmark not installed (make bench-deps)")
    port = free_port()
    argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd="/tmp")
    try:
        deadline = time.monotonic() + 30
        while (
            subprocess.run(["redis-cli", "-p", str(port), "ping"], capture_output=True, text=True).stdout.strip()
            != "PONG"
        ):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("redis-server did not answer PING")
            time.sleep(0.1)
        yield port
    finally:
        stop(proc)


@contextlib.contextmanager
def scraped(url: str) -> Iterator[None]:
    """A scrape of ``url`` every 5 s in a thread, as Prometheus would, while the block runs."""
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(SCRAPE_INTERVAL):
            with contextlib.suppress(OSError):
                scrape_seconds(url)

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def workloads(args: argparse.Namespace, port: int) -> dict[str, list[str]]:
    redis = ["redis-benchmark", "-p", str(port), "-t", "set,get", "-n", str(args.redis_requests)]
    redis += ["-c", str(args.redis_clients), "--csv"]
    return {
        "pipe": ["taskset", "-c", "0", "perf", "bench", "sched", "pipe", "-l", str(args.pipe_loops)],
        "syscall": ["perf", "bench", "syscall", "basic", "-l", str(args.syscalls)],
        "redis": redis,
        "redis -P 16": [*redis, "-P", "16"],
    }


BPF_RUN = re.compile(r"^nodetune_probe_bpf_run_seconds_total\{([^}]*)\} (\S+)$", re.M)


def bpf_seconds(url: str) -> dict[str, float]:
    """Seconds the kernel has spent in each probe's programs (the agent's own counter)."""
    with urllib.request.urlopen(url + "/metrics", timeout=30) as r:
        body = r.read().decode()
    out: dict[str, float] = {}
    for labels, value in BPF_RUN.findall(body):
        probe = re.search(r'probe="([^"]+)"', labels)
        name = probe.group(1) if probe else "?"
        out[name] = out.get(name, 0.0) + float(value)
    return out


def operations(args: argparse.Namespace) -> dict[str, int]:
    """Operations of one run of each workload: pipe round trips, getppid calls, redis requests."""
    redis = 2 * args.redis_requests  # -t set,get
    return {"pipe": args.pipe_loops, "syscall": args.syscalls, "redis": redis, "redis -P 16": redis}


def bpf_cost(commands: dict[str, list[str]], ops: dict[str, int], rounds: int) -> dict[str, dict[str, list[float]]]:
    """{workload: {probe: [BPF ns per operation, one per run], "all": [...]}} under one agent with --bpf-stats."""
    out: dict[str, dict[str, list[float]]] = {name: {} for name in commands}
    with running_agent(["--bpf-stats"]) as agent:
        for _ in range(rounds):
            for name, argv in commands.items():
                before = bpf_seconds(agent.url)
                run_all({name: argv})
                after = bpf_seconds(agent.url)
                per_probe = {p: (after[p] - before.get(p, 0.0)) * 1e9 / ops[name] for p in after}
                for probe, ns in [*per_probe.items(), ("all", sum(per_probe.values()))]:
                    out[name].setdefault(probe, []).append(ns)
            print("bpf_stats ns/op: " + ", ".join(f"{n} {v['all'][-1]:.1f}" for n, v in out.items()), flush=True)
    return out


def run_all(commands: dict[str, list[str]]) -> dict[str, float]:
    """One run of every workload: {figure: value}."""
    out: dict[str, float] = {}
    for name, argv in commands.items():
        if name.startswith("redis"):
            for test, figures in redis_benchmark(argv).items():
                out[f"{name} {test} rps"] = figures["rps"]
                out[f"{name} {test} p99_ms"] = figures["p99_ms"]
        else:
            out[f"{name} usecs_per_op"] = perf_usecs(argv)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--pipe-loops", type=int, default=100000)
    ap.add_argument("--syscalls", type=int, default=5_000_000)
    ap.add_argument("--redis-requests", type=int, default=100000)
    ap.add_argument("--redis-clients", type=int, default=50)
    ap.add_argument("--stats-rounds", type=int, default=3, help="runs of each workload under --bpf-stats")
    ap.add_argument("--json", type=Path, help="write every round's figures here")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root (the agent loads BPF programs)")
    rounds: list[dict[str, dict[str, float]]] = []
    with redis_server() as port:
        commands = workloads(args, port)
        run_all(commands)  # warm-up, not counted: cold caches, redis's first allocations
        for r in range(args.rounds):
            results: dict[str, dict[str, float]] = {}
            for state in ("off", "on") if r % 2 == 0 else ("on", "off"):
                if state == "off":
                    results[state] = run_all(commands)
                    continue
                with running_agent() as agent, scraped(agent.url):
                    results[state] = run_all(commands)
            rounds.append(results)
            line = ", ".join(f"{k} {results['on'][k] / results['off'][k]:.3f}" for k in results["off"])
            print(f"round {r + 1}: on/off {line}", flush=True)
        stats = bpf_cost(commands, operations(args), args.stats_rounds) if args.stats_rounds else {}
    if args.json:
        out = {"commands": {k: " ".join(v) for k, v in commands.items()}, "rounds": rounds}
        out |= {"operations": operations(args), "bpf_ns_per_op": stats}
        args.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

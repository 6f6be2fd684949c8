"""Cost of the runqlat probe against Debian's stock runqlat-bpfcc (bpfcc-tools). Not a test.

1. BPF cost: kernel bpf_stats (``kernel.bpf_stats_enabled=1``; run_time_ns and run_cnt from each
   program fd's fdinfo). Each tool is attached alone during the same workload, the two tools
   alternating (A/B, B/A, ...) over rounds; we report the median. Because the tools hook different
   tracepoints (ours: sched_switch only; stock: sched_switch + sched_wakeup + sched_wakeup_new),
   the comparable figure is the BPF time a tool adds per context switch: sum of run_time_ns of all
   its programs / context switches (``ctxt`` in /proc/stat). Per-program ns/event is shown too.
   Workloads: ``perf bench sched pipe`` pinned to one CPU (two tasks), and ``perf bench sched
   messaging`` (hackbench: hundreds of tasks, cache pressure).
2. Throughput: ``perf bench sched pipe`` pinned to CPU 0 (every op is two context switches and two
   wakeups), probe off vs on, interleaved, median of the per-round on/off time-per-op ratios.

Run as root: ``make bench`` (``ARGS="--rounds 10"``). The bpf_stats setting is restored on exit;
every process started here is ended by its pid.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from probes import bpfsys
from probes.base import KernelFacts
from probes.runqlat import RunqlatProbe

STATS = Path("/proc/sys/kernel/bpf_stats_enabled")
PIPE = ["taskset", "-c", "0", "perf", "bench", "sched", "pipe"]
WORKLOADS = {
    "pipe": lambda loops: [*PIPE, "-l", str(loops)],
    "messaging": lambda loops: ["perf", "bench", "sched", "messaging", "-g", "4", "-l", str(max(loops // 500, 50))],
}


def prog_stats(pid: int) -> dict[int, tuple[int, int]]:
    """BPF programs held by ``pid``: fd -> (run_time_ns, run_cnt)."""
    out: dict[int, tuple[int, int]] = {}
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        stats = bpfsys.prog_stats(int(fd.name), f"/proc/{pid}")
        if stats is not None:
            out[int(fd.name)] = (stats.run_time_ns, stats.run_cnt)
    return out


def context_switches() -> int:
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith("ctxt "):
            return int(line.split()[1])
    raise RuntimeError("no ctxt in /proc/stat")


def wait_for_progs(pid: int, n: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if len(prog_stats(pid)) >= n:
            return
        time.sleep(0.2)
    raise RuntimeError(f"pid {pid} did not load {n} BPF programs in {timeout}s")


class Ours:
    name = "nodetune"

    def __enter__(self) -> Ours:
        self.probe = RunqlatProbe(KernelFacts())
        self.probe.load()
        self.pid = os.getpid()
        self.names = {fd: name for name, fd in self.probe.program_fds().items()}
        return self

    def __exit__(self, *exc: object) -> None:
        self.probe.close()


class Floor:
    """An empty program on the same raw tracepoint: what bpf_stats and the hook cost by themselves."""

    name = "empty raw_tp"

    def __enter__(self) -> Floor:
        from bcc import BPF

        self.bpf = BPF(text=b"RAW_TRACEPOINT_PROBE(sched_switch) { return 0; }")
        self.pid = os.getpid()
        self.names = {fn.fd: "empty" for fn in self.bpf.funcs.values()}
        return self

    def __exit__(self, *exc: object) -> None:
        self.bpf.cleanup()


class Stock:
    name = "runqlat-bpfcc"

    def __enter__(self) -> Stock:
        self.proc = subprocess.Popen(
            ["runqlat-bpfcc", "3600", "1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        self.pid = self.proc.pid
        wait_for_progs(self.pid, 3)
        self.names = {}
        return self

    def __exit__(self, *exc: object) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def measure(tool: Callable[[], Ours | Stock | Floor], argv: list[str]) -> tuple[float, dict[str, tuple[float, int]]]:
    """(BPF ns per context switch, {program: (ns/event, events)}) for one tool over one workload run."""
    with tool() as t:
        before, ctxt0 = prog_stats(t.pid), context_switches()
        subprocess.run(argv, capture_output=True, check=True)
        after, ctxt1 = prog_stats(t.pid), context_switches()
        names = t.names
    per_prog: dict[str, tuple[float, int]] = {}
    total_ns = 0
    for fd, (ns, cnt) in after.items():
        d_ns, d_cnt = ns - before.get(fd, (0, 0))[0], cnt - before.get(fd, (0, 0))[1]
        total_ns += d_ns
        if d_cnt:
            per_prog[names.get(fd, f"fd{fd}")] = (d_ns / d_cnt, d_cnt)
    return total_ns / max(ctxt1 - ctxt0, 1), per_prog


def bpf_cost(rounds: int, loops: int) -> dict[str, dict]:
    """Prints the table of each workload; returns every round's figures (for ``--json``)."""
    out: dict[str, dict] = {}
    for workload, make_argv in WORKLOADS.items():
        argv = make_argv(loops)
        tools = (Ours, Stock, Floor)
        per_switch: dict[str, list[float]] = {t.name: [] for t in tools}
        programs: dict[str, dict[str, list[float]]] = {t.name: {} for t in tools}
        ratios: list[float] = []
        for r in range(rounds):
            order = [Ours, Stock, Floor] if r % 2 == 0 else [Floor, Stock, Ours]
            for tool in order:
                cost, progs = measure(tool, argv)
                per_switch[tool.name].append(cost)
                for prog, (ns, _n) in progs.items():
                    programs[tool.name].setdefault(prog, []).append(ns)
            ratios.append(per_switch["nodetune"][-1] / per_switch["runqlat-bpfcc"][-1])
        ours, stock = statistics.median(per_switch["nodetune"]), statistics.median(per_switch["runqlat-bpfcc"])
        floor = statistics.median(per_switch["empty raw_tp"])
        print(f"\n### {workload}: {' '.join(argv)}  ({rounds} alternating rounds, medians)\n")
        print("| tool | BPF ns per context switch | programs (ns/event) |\n|---|---:|---|")
        for name, value in (("nodetune", ours), ("runqlat-bpfcc", stock), ("empty raw_tp", floor)):
            progs = ", ".join(f"{p} {statistics.median(v):.0f}" for p, v in sorted(programs[name].items()))
            print(f"| {name} | {value:.0f} | {progs} |")
        print(
            f"\nnodetune / runqlat-bpfcc = {ours / stock:.2f} (median of per-round ratios "
            f"{statistics.median(ratios):.2f}, range {min(ratios):.2f}-{max(ratios):.2f}); "
            f"nodetune above the empty program: {ours - floor:.0f} ns"
        )
        out[workload] = {"command": " ".join(argv), "ns_per_switch": per_switch, "programs": programs, "ratios": ratios}
    return out


def pipe_usecs_per_op(loops: int) -> float:
    out = subprocess.run([*PIPE, "-l", str(loops)], capture_output=True, text=True, check=True).stdout
    m = re.search(r"([\d.]+)\s+usecs/op", out)
    if not m:
        raise RuntimeError(f"unexpected perf output: {out}")
    return float(m.group(1))


def pipe_ratio(rounds: int, loops: int) -> dict[str, list[float]]:
    """Prints every round; returns the per-round on/off ratios of each tool (for ``--json``)."""
    ratios: dict[str, list[float]] = {"nodetune": [], "runqlat-bpfcc": []}
    print(f"\n### perf bench sched pipe -l {loops}, pinned to CPU 0: on/off time per op ({rounds} rounds)\n")
    for r in range(rounds):
        off = pipe_usecs_per_op(loops)
        line = [f"round {r + 1}: off {off:.3f} us/op"]
        for tool in [Ours, Stock] if r % 2 == 0 else [Stock, Ours]:
            with tool():
                on = pipe_usecs_per_op(loops)
            ratios[tool.name].append(on / off)
            line.append(f"{tool.name} x{on / off:.3f}")
        print("  " + ", ".join(line), flush=True)
    print()
    for name, values in ratios.items():
        print(f"{name}: median x{statistics.median(values):.3f} (min {min(values):.3f}, max {max(values):.3f})")
    return ratios


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=10, help="alternating rounds (default 10)")
    ap.add_argument("--loops", type=int, default=100000, help="perf bench sched pipe -l (default 100000)")
    ap.add_argument("--json", type=Path, help="write every round's figures here")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("bench needs root", file=sys.stderr)
        return 1
    headers = KernelFacts().headers
    headers.apply_env()  # runqlat-bpfcc inherits BCC_KERNEL_SOURCE
    print(f"kernel {os.uname().release}; {headers.describe()}; {os.cpu_count()} CPUs")
    saved = STATS.read_text()
    try:
        STATS.write_text("1\n")
        cost = bpf_cost(args.rounds, args.loops)
    finally:
        STATS.write_text(saved)
    pipe = {"command": " ".join([*PIPE, "-l", str(args.loops)]), "ratios": pipe_ratio(args.rounds, args.loops)}
    if args.json:
        args.json.write_text(json.dumps({"rounds": args.rounds, "bpf_cost": cost, "pipe": pipe}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

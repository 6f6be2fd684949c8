"""Cost of a /metrics scrape with many workloads. Not a test.

Makes N pod-like cgroups (``/<bench>/kubepods/burstable/pod<uid>/<container id>`` in the cgroup v2
hierarchy, as the cgroupfs driver lays them out), each with one task that sleeps and wakes every
50 ms so that every workload has a histogram row. Runs ``nodetune run`` as a real process with its
defaults (every probe and collector), scrapes /metrics ``--scrapes`` times, ``--interval`` seconds
apart (``Accept-Encoding: gzip`` over one kept-alive connection, as Prometheus does;
``--new-connection`` for one per scrape: bench/report_agent.py ``Scraper``), and reports the median, p99 and max
scrape time, the body size, and each collector's median share (the agent's own
``nodetune_scrape_collector_duration_seconds``). Then measures, in this process, what reading the
rows costs per row and per CPU (the part that grows with a node's CPU count).

Run as root: ``make bench-scrape`` (``SCRAPE_ARGS="--workloads 500 --scrapes 60"``). Every cgroup and
process made here is removed by its pid; cProfile of the agent's scrape with ``--profile``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.report_agent import Scraper
from host.paths import HostPaths
from probes import bpfsys

ROOT = Path(__file__).resolve().parent.parent


def make_workloads(root: Path, n: int) -> tuple[Path, list[int]]:
    top = root / f"nodetune-bench-{uuid.uuid4().hex[:8]}"
    pids: list[int] = []
    base = top / "kubepods" / "burstable"
    base.mkdir(parents=True)
    for i in range(n):
        uid = str(uuid.UUID(int=i + 1))
        cg = base / f"pod{uid}" / f"{i + 1:064x}"
        cg.mkdir(parents=True)
        pid = os.fork()
        if pid == 0:  # child: join the cgroup, then wake every 50 ms until killed
            try:
                (cg / "cgroup.procs").write_text(str(os.getpid()))
                while True:
                    time.sleep(0.05)
            finally:
                os._exit(0)
        pids.append(pid)
    return top, pids


def remove_workloads(top: Path, pids: list[int]) -> None:
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    for pid in pids:
        os.waitpid(pid, 0)
    for directory in sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
        for _ in range(50):
            try:
                directory.rmdir()
                break
            except OSError:
                time.sleep(0.05)
    top.rmdir()


DURATION = re.compile(rb'^nodetune_scrape_collector_duration_seconds\{collector="([^"]+)"\} (\S+)$', re.M)


def scrape(scraper: Scraper) -> tuple[float, int, int, dict[str, float]]:
    """(seconds, body bytes, bytes sent, collector -> its seconds by the agent's own count)."""
    got = scraper.scrape()
    durations = {m[1].decode(): float(m[2]) for m in DURATION.finditer(got.body)}
    return got.seconds, len(got.body), got.sent, durations


def agent_cpu_s(pid: int) -> float:
    """utime + stime of every thread of ``pid``."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def p99(values: list[float]) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[98]


def read_cost(rows_in_use: int) -> str:
    """Time of one batched read of the rows in use, per row and per row x CPU."""
    from probes.base import KernelFacts
    from probes.runqlat import HIST, RunqlatProbe

    probe = RunqlatProbe(KernelFacts(cache_dir=Path(tempfile.gettempdir()) / "nodetune-bench-cache"))
    probe.load()
    try:
        rows = probe.workload_tables[HIST].rows
        wanted = list(range(rows_in_use))
        times = []
        for _ in range(20):
            t = time.perf_counter()
            rows.read(wanted)
            times.append(time.perf_counter() - t)
    finally:
        probe.close()
    per = statistics.median(times)
    ncpu = bpfsys.possible_cpus()
    lines = [
        f"row read here: {per * 1e3:.2f} ms for {rows_in_use} rows x {ncpu} CPUs (one batched bpf(2) + sums)",
    ]
    # What grows with a node's CPUs is the summation over per-CPU values (and the kernel's copy of
    # them): time it on a synthetic buffer of the same layout for larger CPU counts.
    import numpy as np

    from metrics.histogram import ROW_WORDS
    from probes.row_table import sum_over_cpus

    for cpus in (2, 32, 96):
        values = np.arange(rows_in_use * cpus * ROW_WORDS, dtype=np.uint64).reshape(rows_in_use, cpus, ROW_WORDS)
        t = time.perf_counter()
        sum_over_cpus(values, list(range(rows_in_use)))
        el = time.perf_counter() - t
        lines.append(
            f"sum over CPUs, {rows_in_use} rows x {cpus} CPUs: {el * 1e3:.1f} ms "
            f"({el / rows_in_use / cpus * 1e9:.0f} ns per row x CPU)"
        )
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workloads", type=int, default=500)
    ap.add_argument("--scrapes", type=int, default=60)
    ap.add_argument("--interval", type=float, default=1.0, help="seconds between scrapes (the timer runs meanwhile)")
    ap.add_argument("--agent-dir", type=Path, default=ROOT, help="checkout whose agent runs (before/after)")
    ap.add_argument("--profile", action="store_true", help="run the agent under cProfile (to --profile-out)")
    ap.add_argument("--profile-out", default="/tmp/nodetune-scrape.prof")
    ap.add_argument("--json", type=Path, help="write every scrape's time and the body sizes here")
    ap.add_argument("--new-connection", action="store_true", help="a new connection per scrape (default: kept alive)")
    args = ap.parse_args()
    root = HostPaths().cgroup_v2()
    if root is None:
        print("no cgroup v2 hierarchy", file=sys.stderr)
        return 1
    top, pids = make_workloads(root, args.workloads)
    agent = None
    try:
        port = 19000 + os.getpid() % 1000
        cache = Path(tempfile.gettempdir()) / "nodetune-bench-cache"
        cmd = [sys.executable]
        if args.profile:
            cmd += ["-m", "cProfile", "-o", args.profile_out]
        cmd += ["-m", "agent.cli", "run", "--listen", f"127.0.0.1:{port}", "--cache-dir", str(cache)]
        cmd += ["--log-level", "warning"]
        agent = subprocess.Popen(cmd, cwd=args.agent_dir)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 300  # a loaded machine compiles slowly
        while True:
            try:
                if urllib.request.urlopen(url + "/readyz", timeout=1).status == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit("agent not ready")
            time.sleep(0.2)
        time.sleep(2)  # every workload has waited at least once
        scraper = Scraper(url, keep_alive=not args.new_connection)
        scrape(scraper)  # warm-up
        results = []
        cpu0, wall0 = agent_cpu_s(agent.pid), time.monotonic()
        for _ in range(args.scrapes):
            results.append(scrape(scraper))
            time.sleep(args.interval)
        scraper.close()
        cpu_pct = 100 * (agent_cpu_s(agent.pid) - cpu0) / (time.monotonic() - wall0)
        times = [r[0] for r in results]
        body = urllib.request.urlopen(url + "/metrics", timeout=30).read().decode()
        series = sum(1 for line in body.splitlines() if line.startswith("nodetune_runqueue_latency_seconds_count{"))
        tcp = Path("/proc/net/sockstat").read_text().split("TCP:")[1].split()
        print(
            f"workloads: {args.workloads}, runqlat series: {series}, CPUs: {os.cpu_count()}, load average "
            f"{os.getloadavg()[0]:.1f}, host TCP sockets (ports dumps them): inuse {tcp[tcp.index('inuse') + 1]} "
            f"tw {tcp[tcp.index('tw') + 1]}"
        )
        print(
            f"scrape: median {statistics.median(times) * 1e3:.1f} ms, p99 {p99(times) * 1e3:.1f} ms, "
            f"max {max(times) * 1e3:.1f} ms over {len(times)} scrapes, {args.interval} s apart "
            f"({'a new connection each' if args.new_connection else 'one kept-alive connection'}); "
            f"body {results[-1][1] / 1e6:.2f} MB ({results[-1][2] / 1e3:.0f} kB gzip)"
        )
        units = sorted({u for r in results for u in r[3]})
        shares = ", ".join(f"{u} {statistics.median(r[3].get(u, 0.0) for r in results) * 1e3:.1f}" for u in units)
        print(f"collector medians (ms, the agent's count): {shares}")
        print(
            f"agent CPU while scraped every {args.interval} s (scrapes and timer): {cpu_pct:.1f} % of a core, "
            f"{cpu_pct / 100 * args.interval * 1e3:.0f} ms per interval (less load-dependent than the wall times)"
        )
        if args.json:
            figures = {"workloads": args.workloads, "series": series, "cpus": os.cpu_count(), "seconds": times}
            figures |= {"body_bytes": results[-1][1], "gzip_bytes": results[-1][2]}
            args.json.write_text(json.dumps(figures, indent=1))
    finally:
        if agent is not None:
            agent.send_signal(signal.SIGTERM)
            agent.wait(30)
        remove_workloads(top, pids)
    print(read_cost(args.workloads))
    return 0


if __name__ == "__main__":
    sys.exit(main())

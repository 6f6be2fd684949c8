"""The agent's footprint with its defaults (every probe and collector): start time, RSS, idle CPU.
Not a test.

Starts the real agent (``python -m agent.cli run``, defaults but for the port and the header
cache) ``--rounds`` times per arm, the arms interleaved so that the load of a shared machine falls
on both alike, and reports medians with their spread (min..max):

* ``warm``: the header cache already holds the merged headers (every start after the first);
* ``cold``: an empty cache directory, so the headers are prepared first (a node's first start);
* ``base``: as ``warm``, but the agent of another checkout (``--baseline DIR``, e.g. ``git worktree
  add /tmp/base main``): an A/B of a change, rounds interleaved (``--arms warm,base``).

RSS "once ready" is read when the agent has logged that it gave back what loading left resident
(``Agent.give_back``, right after ``/readyz`` turns 200).

For each start: seconds from the process's exec to ``/healthz`` 200 (interpreter, imports,
collectors) and to ``/readyz`` 200 (every probe tried); where the probe-loading time went, from
the agent's own log (``headers ready in``, ``probe X loaded in``); RSS (``VmRSS``) and its
anonymous part (``/proc/<pid>/smaps_rollup``) once ready and after ``--scrapes`` scrapes of
``/metrics``; and the agent's CPU time over ``--idle-seconds`` with one scrape every
``--interval`` seconds (idle CPU, % of one core). ``--soak SECONDS`` adds one run that scrapes every
``--interval`` for that long and prints RSS over time (the "flat over an hour" check).

Run as root: ``make bench-footprint`` (``FOOTPRINT_ARGS="--rounds 5"``). Every agent started here
is stopped by its pid (SIGTERM, which detaches its probes); cold caches are removed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WARM_CACHE = Path(tempfile.gettempdir()) / "nodetune-bench-cache"
CLK_TCK = os.sysconf("SC_CLK_TCK")
GIVEN_BACK = "memory given back after loading"
STEP_LOG = re.compile(r"(headers ready|probe \S+ loaded|probes loaded) in ([0-9.]+)s")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def status_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


def scrape(url: str) -> int:
    req = urllib.request.Request(url + "/metrics", headers={"Accept-Encoding": "gzip"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return len(r.read())


def rss_mib(pid: int) -> tuple[float, float]:
    """(VmRSS, anonymous part) in MiB."""
    rss = anon = 0
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key == "Rss":
            rss = int(rest.split()[0])
        elif key == "Anonymous":
            anon = int(rest.split()[0])
    return rss / 1024, anon / 1024


def cpu_seconds(pid: int) -> float:
    """utime + stime of every thread of ``pid`` (and of children it waited for)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(f) for f in fields[11:15]) / CLK_TCK  # utime stime cutime cstime


@dataclass
class Start:
    arm: str
    healthz_s: float = 0.0
    readyz_s: float = 0.0
    settled_s: float = 0.0  # memory given back (the log line)
    steps: dict[str, float] = field(default_factory=dict)
    rss_ready: float = 0.0
    anon_ready: float = 0.0
    rss_scraped: float = 0.0
    anon_scraped: float = 0.0
    idle_cpu_pct: float = 0.0


def run_agent(arm: str, args: argparse.Namespace, soak: float = 0.0) -> Start:
    cache = WARM_CACHE if arm != "cold" else Path(tempfile.mkdtemp(prefix="nodetune-cold-"))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = Path(tempfile.mkstemp(prefix="nodetune-footprint-", suffix=".log")[1])
    cmd = [sys.executable, "-m", "agent.cli", "run", "--listen", f"127.0.0.1:{port}", "--cache-dir", str(cache)]
    result = Start(arm)
    with log_path.open("w") as log:
        t0 = time.monotonic()
        cwd = args.baseline if arm == "base" else ROOT
        agent = subprocess.Popen(cmd, cwd=cwd, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = t0 + args.timeout
        while not result.healthz_s or not result.readyz_s:
            if agent.poll() is not None:
                raise RuntimeError(f"agent exited with {agent.returncode}: {log_path.read_text()[-2000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"agent not ready within {args.timeout} s")
            if not result.healthz_s and status_ok(url + "/healthz"):
                result.healthz_s = time.monotonic() - t0
            if result.healthz_s and status_ok(url + "/readyz"):
                result.readyz_s = time.monotonic() - t0
            time.sleep(0.01)
        while GIVEN_BACK not in log_path.read_text():  # the agent gives memory back right after /readyz
            if time.monotonic() > deadline or agent.poll() is not None:
                raise RuntimeError(f"no '{GIVEN_BACK}' in the agent's log")
            time.sleep(0.01)
        result.settled_s = time.monotonic() - t0
        result.rss_ready, result.anon_ready = rss_mib(agent.pid)
        for _ in range(args.scrapes):
            scrape(url)
        result.rss_scraped, result.anon_scraped = rss_mib(agent.pid)
        cpu0, w0 = cpu_seconds(agent.pid), time.monotonic()
        end = w0 + (soak or args.idle_seconds)
        next_report = w0
        while (now := time.monotonic()) < end:
            scrape(url)
            if soak and now >= next_report:
                rss, anon = rss_mib(agent.pid)
                print(f"soak t={now - w0:7.0f}s rss={rss:6.1f} MiB anon={anon:6.1f} MiB", flush=True)
                next_report = now + max(60.0, args.interval)
            time.sleep(max(0.0, min(args.interval, end - time.monotonic())))
        result.idle_cpu_pct = 100 * (cpu_seconds(agent.pid) - cpu0) / (time.monotonic() - w0)
    finally:
        agent.send_signal(signal.SIGTERM)
        try:
            agent.wait(timeout=30)
        except subprocess.TimeoutExpired:
            agent.kill()
            agent.wait()
        for match in STEP_LOG.finditer(log_path.read_text()):
            result.steps[match.group(1)] = float(match.group(2))
        log_path.unlink()
        if arm == "cold":
            shutil.rmtree(cache, ignore_errors=True)
    return result


def summary(values: list[float]) -> str:
    return f"{statistics.median(values):7.2f} ({min(values):.2f}..{max(values):.2f})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3, help="starts per arm, interleaved")
    ap.add_argument("--arms", default="warm,cold", help="comma list of warm, cold, base")
    ap.add_argument("--baseline", type=Path, help="checkout whose agent the base arm runs")
    ap.add_argument("--scrapes", type=int, default=20, help="scrapes before the second RSS reading")
    ap.add_argument("--idle-seconds", type=float, default=20.0)
    ap.add_argument("--interval", type=float, default=5.0, help="scrape interval while idle, seconds")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for /readyz")
    ap.add_argument("--soak", type=float, default=0.0, help="seconds of one extra warm run scraped every --interval")
    ap.add_argument("--json", type=Path, help="write every start's figures here")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root (the agent loads BPF programs)")
    arms = args.arms.split(",")
    if "base" in arms and (args.baseline is None or not (args.baseline / "agent" / "cli.py").is_file()):
        sys.exit("the base arm needs --baseline DIR, a checkout of nodetune")
    if "warm" in arms and not WARM_CACHE.exists():
        print("warming the header cache (one start, not counted)", flush=True)
        run_agent("warm", argparse.Namespace(**{**vars(args), "scrapes": 0, "idle_seconds": 0}))
    starts: list[Start] = []
    for i in range(args.rounds):
        for arm in arms if i % 2 == 0 else reversed(arms):
            s = run_agent(arm, args)
            starts.append(s)
            steps = " ".join(f"{k}={v:.2f}s" for k, v in s.steps.items())
            print(
                f"round {i} {arm}: healthz {s.healthz_s:.2f}s readyz {s.readyz_s:.2f}s ({steps}) "
                f"rss {s.rss_ready:.1f}->{s.rss_scraped:.1f} MiB (anon {s.anon_ready:.1f}->{s.anon_scraped:.1f}) "
                f"idle cpu {s.idle_cpu_pct:.2f}%",
                flush=True,
            )
    if starts:
        print(f"\nmedians (min..max), {args.rounds} starts per arm, {args.scrapes} scrapes, idle {args.idle_seconds}s")
    for arm in arms if starts else []:
        mine = [s for s in starts if s.arm == arm]
        print(f"{arm}:")
        for label, attr in (
            ("start -> /healthz 200 (s)", "healthz_s"),
            ("start -> /readyz 200 (s)", "readyz_s"),
            ("start -> memory given back (s)", "settled_s"),
            ("RSS then (MiB)", "rss_ready"),
            ("  anonymous (MiB)", "anon_ready"),
            (f"RSS after {args.scrapes} scrapes (MiB)", "rss_scraped"),
            ("  anonymous (MiB)", "anon_scraped"),
            ("idle CPU (% of a core)", "idle_cpu_pct"),
        ):
            print(f"  {label:34s} {summary([getattr(s, attr) for s in mine])}")
        for step in dict.fromkeys(k for s in mine for k in s.steps):
            values = [s.steps[step] for s in mine if step in s.steps]
            print(f"  {step + ' (s)':34s} {summary(values)}")
    if args.soak:
        run_agent("warm", args, soak=args.soak)
    if args.json:
        args.json.write_text(json.dumps([vars(s) for s in starts], indent=1))


if __name__ == "__main__":
    main()

"""Soak: the agent under pod churn for a long time, scraped by two Prometheus-like scrapers.

What a node does for weeks, compressed: pods come and go (a cgroup in the v2 hierarchy and in the
v1 cpu/cpuacct controllers with a CPU quota, a process that wakes every 10 ms, its own network
namespace with a listener and connections to it; every fourth pod on the host's network), each
known to the agent through a local API server (``tests/fake_apiserver.py``). Two scrapers read
``/metrics`` every ``--scrape-s`` seconds, half a period apart.

Every ``--sample-s`` seconds: the agent's RSS, open fds, threads, the number of series and the
scrape times. Checked, and a failure makes the exit status 1:

* no counter of any label set goes back between two scrapes of the same scraper (histogram
  buckets, counts and sums included);
* once the churn stops and every pod is gone: fds and threads return to their baseline (taken
  before the first pod), and after the series grace no series of a gone pod is left;
* with ``--minutes`` of 20 or more: RSS at the end of the churn is within 5 % of RSS after the
  first 10 minutes (the issue's budget; shorter runs report the growth without judging it).

``make bench-soak`` runs an hour; ``tests/test_soak.py`` runs a short one in ``make test``. Run as
root: ``python bench/soak.py [--minutes 60] [--pods 40] [--out bench/soak.json]``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from host.paths import HostPaths  # noqa: E402
from tests.conftest import SpreadCgroup, wait_until  # noqa: E402
from tests.fake_apiserver import FakeAPIServer, pod  # noqa: E402

NODE = "soak-node"
# A pod's process: its own network namespace (made by `unshare -n` around it) with loopback up,
# a listener and a few connections to it; then it wakes every 10 ms (run-queue events) for ever.
POD = """
import socket, subprocess, sys, time
if sys.argv[1] == "netns":
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", 0)); s.listen(64)
held = []
for _ in range(4):
    c = socket.create_connection(s.getsockname()); held += [c, s.accept()[0]]
while True:
    time.sleep(0.01)
"""


def agent_stat(pid: int) -> dict[str, int]:
    status = Path(f"/proc/{pid}/status").read_text()
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    return {
        "rss_kib": int(fields["VmRSS"].split()[0]),
        "threads": int(fields["Threads"]),
        "fds": len(os.listdir(f"/proc/{pid}/fd")),
    }


def network_namespaces() -> set[int]:
    """Network namespaces any process holds: the agent keeps 8 descriptors open in each (its
    per-namespace handles), so other software making namespaces meanwhile moves its fd count."""
    found = set()
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                found.add(os.stat(f"/proc/{entry.name}/ns/net").st_ino)
            except OSError:
                continue
    return found


HANDLE_FDS = 8  # agent/identity/netns.py NetnsHandles: a netlink socket and seven procfs files


def parse(text: str) -> dict[tuple[str, tuple], float]:
    """Counter-like samples (``_total``, ``_bucket``, ``_count``, ``_sum``) -> value."""
    out: dict[tuple[str, tuple], float] = {}
    for line in text.splitlines():
        if not line or line[0] == "#":
            continue
        head, _, value = line.rpartition(" ")
        name, _, labels = head.partition("{")
        if name.endswith(("_total", "_bucket", "_count", "_sum")):
            out[(name, labels)] = float(value)
    return out


class Scraper(threading.Thread):
    """Scrapes every ``period`` s; keeps the scrape times and every counter that went back."""

    def __init__(self, url: str, period: float, offset: float, stop: threading.Event) -> None:
        super().__init__(daemon=True)
        self.url, self.period, self.offset, self.stop = url, period, offset, stop
        self.times: list[float] = []
        self.back: list[str] = []
        self.errors = 0
        self.last_text = ""
        self.series = 0

    def run(self) -> None:
        previous: dict[tuple[str, tuple], float] = {}
        if self.stop.wait(self.offset):
            return
        while not self.stop.is_set():
            started = time.monotonic()
            try:
                with urllib.request.urlopen(self.url, timeout=30) as r:
                    text = r.read().decode()
            except OSError:
                self.errors += 1
            else:
                self.times.append(time.monotonic() - started)
                self.last_text = text
                self.series = sum(1 for line in text.splitlines() if line and line[0] != "#")
                current = parse(text)
                for key, value in current.items():
                    old = previous.get(key)
                    if old is not None and value < old and len(self.back) < 50:
                        self.back.append(f"{key[0]}{{{key[1]} {old} -> {value}")
                previous = current
            self.stop.wait(max(0.0, self.period - (time.monotonic() - started)))


class Pods:
    """The churning pods: cgroups, processes, network namespaces and API objects."""

    def __init__(self, server: FakeAPIServer, top: str) -> None:
        paths = HostPaths()
        self.roots = [r for r in (paths.cgroup_v2(), paths.cgroup_v1("cpu"), paths.cgroup_v1("cpuacct")) if r]
        self.cpu_root = paths.cgroup_v1("cpu")
        self.server = server
        self.top = top
        self.parent = SpreadCgroup(self.roots, f"{top}/kubepods/burstable")  # shared by every pod
        self.live: list[tuple[str, str, SpreadCgroup]] = []  # (uid, name, cgroup)
        self.made = 0
        self.names: set[str] = set()

    def add(self) -> None:
        self.made += 1
        uid = str(uuid.uuid4())
        cid = uuid.uuid4().hex + uuid.uuid4().hex
        name = f"soak-{self.made}"
        cg = SpreadCgroup(self.roots, f"{self.top}/kubepods/burstable/pod{uid}/{cid}")
        if self.cpu_root is not None:
            quota = Path(str(self.cpu_root) + cg.rel) / "cpu.cfs_quota_us"
            quota.write_text("20000")  # 0.2 CPU: some pods get throttled
        netns = self.made % 4 != 0
        argv = [sys.executable, "-c", POD, "netns" if netns else "host"]
        cg.spawn(["unshare", "-n", *argv] if netns else argv)
        self.server.put("pods", pod(uid, name, NODE, {"app": cid}, namespace="soak"))
        self.live.append((uid, name, cg))
        self.names.add(name)

    def remove_oldest(self) -> None:
        uid, _name, cg = self.live.pop(0)
        self.server.delete("pods", uid)
        cg.remove()

    def remove_all(self) -> None:
        while self.live:
            self.remove_oldest()

    def close(self) -> None:
        self.remove_all()
        self.parent.remove()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=60.0, help="how long the churn lasts")
    parser.add_argument("--pods", type=int, default=40, help="pods alive at once")
    parser.add_argument("--churn-s", type=float, default=3.0, help="one pod replaced every this many seconds")
    parser.add_argument("--scrape-s", type=float, default=5.0, help="each scraper's interval")
    parser.add_argument("--sample-s", type=float, default=60.0, help="interval of the resource samples")
    parser.add_argument("--grace", type=float, default=60.0, help="the agent's --workload-series-grace")
    parser.add_argument("--probes", default="runqlat,lockstat,connect", help="the agent's --probes")
    parser.add_argument("--cache-dir", default=None, help="the agent's header cache (default: its own)")
    parser.add_argument("--out", default=str(REPO / "bench/soak.json"), help="where the samples go (JSON)")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("soak: needs root (cgroups, network namespaces, BPF)", file=sys.stderr)
        return 2
    top = f"/nodetune-soak-{uuid.uuid4().hex[:8]}"
    tmp = Path(tempfile.mkdtemp(prefix="nodetune-soak-"))
    server = FakeAPIServer().start()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [
        sys.executable, "-m", "agent.cli", "run", "--listen", f"127.0.0.1:{port}",
        "--kubeconfig", str(server.kubeconfig(tmp)), "--node-name", NODE, "--probes", args.probes,
        "--workload-series-grace", str(args.grace), "--log-level", "warning",
    ]  # fmt: skip
    if args.cache_dir:
        cmd += ["--cache-dir", args.cache_dir]
    log = open(tmp / "agent.log", "w")  # noqa: SIM115 - the agent's stderr for the run's length
    agent = subprocess.Popen(cmd, cwd=REPO, stderr=log)
    url = f"http://127.0.0.1:{port}"
    pods = Pods(server, top)
    stop = threading.Event()
    scrapers = [Scraper(url + "/metrics", args.scrape_s, i * args.scrape_s / 2, stop) for i in range(2)]
    samples: list[dict] = []
    failures: list[str] = []
    try:

        def ready() -> bool:
            if agent.poll() is not None:
                raise RuntimeError("the agent exited: " + (tmp / "agent.log").read_text()[-2000:])
            try:
                with urllib.request.urlopen(url + "/readyz", timeout=2) as r:
                    return r.status == 200
            except OSError:
                return False

        wait_until(ready, timeout=300, what="the agent becoming ready", every=0.2)
        for s in scrapers:
            s.start()
        wait_until(lambda: all(len(s.times) >= 2 for s in scrapers), timeout=120, what="two scrapes each", every=0.2)
        baseline = agent_stat(agent.pid)
        namespaces_before = network_namespaces()
        print(f"baseline: {baseline}", flush=True)
        started = time.monotonic()
        end = started + args.minutes * 60
        next_sample = started
        while time.monotonic() < end:
            if len(pods.live) >= args.pods:
                pods.remove_oldest()
            pods.add()
            now = time.monotonic()
            if now >= next_sample:
                stat = agent_stat(agent.pid)
                times = [t for s in scrapers for t in s.times[-20:]]
                sample = {
                    "minute": round((now - started) / 60, 2),
                    **stat,
                    "series": max(s.series for s in scrapers),
                    "scrape_median_ms": round(statistics.median(times) * 1e3, 1) if times else None,
                    "scrape_max_ms": round(max(times) * 1e3, 1) if times else None,
                    "pods_made": pods.made,
                }
                samples.append(sample)
                print(json.dumps(sample), flush=True)
                next_sample += args.sample_s
            time.sleep(args.churn_s)
        churn_end = agent_stat(agent.pid)
        pods.remove_all()
        # After the grace and two timer ticks (5 s each, jittered), every series of a gone pod is
        # dropped; fds and threads are back to the baseline.
        settle = args.grace + 30
        deadline = time.monotonic() + settle

        def gone_series() -> list[str]:
            text = scrapers[0].last_text
            return [line for line in text.splitlines() if 'namespace="soak"' in line or top in line]

        def fds_allowed() -> int:
            # 4 for connections (scrapers, API watches); others' namespaces made meanwhile
            # (tests or pods of other software on this machine) cost HANDLE_FDS each
            return baseline["fds"] + 4 + HANDLE_FDS * len(network_namespaces() - namespaces_before)

        while time.monotonic() < deadline and (gone_series() or agent_stat(agent.pid)["fds"] > fds_allowed()):
            time.sleep(1)
        time.sleep(2 * args.scrape_s)
        after = agent_stat(agent.pid)
        allowed = fds_allowed()
        left = gone_series()
        print(f"at the end of the churn: {churn_end}; {settle:.0f} s after the last pod went: {after}")
        if left:
            failures.append(f"{len(left)} series of gone pods left after the grace, e.g. {left[0]}")
        if after["fds"] > allowed:
            failures.append(f"fds {after['fds']} after the churn, baseline {baseline['fds']} (allowed {allowed})")
        if after["threads"] > baseline["threads"] + 2:
            failures.append(f"threads {after['threads']} after the churn, baseline {baseline['threads']}")
        for s in scrapers:
            failures += [f"counter went back: {b}" for b in s.back]
            if s.errors:
                failures.append(f"{s.errors} scrapes failed")
        ten = [x for x in samples if x["minute"] >= 10]
        growth = churn_end["rss_kib"] / ten[0]["rss_kib"] - 1 if ten else None
        if growth is not None:
            print(f"RSS growth after minute 10: {growth * 100:+.1f} %")
            if args.minutes >= 20 and growth > 0.05:
                failures.append(f"RSS grew {growth * 100:.1f} % after minute 10 (budget 5 %)")
        result = {
            "minutes": args.minutes,
            "pods": args.pods,
            "pods_made": pods.made,
            "baseline": baseline,
            "churn_end": churn_end,
            "after": after,
            "rss_growth_after_minute_10": growth,
            "samples": samples,
            "failures": failures,
        }
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    finally:
        stop.set()
        pods.close()
        agent.send_signal(signal.SIGTERM)
        try:
            agent.wait(timeout=30)
        except subprocess.TimeoutExpired:
            agent.kill()
            agent.wait()
        log.close()
        server.stop()
    for f in failures:
        print(f"FAIL: {f}")
    print("soak: " + ("failed" if failures else "passed") + f" ({pods.made} pods made)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

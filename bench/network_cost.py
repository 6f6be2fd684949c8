"""Agent CPU of the network collectors (ports + listen) with many namespaces and sockets. Not a test.

Makes ``--namespaces`` network namespaces (``ip netns add``), each with one process that listens on
127.0.0.1 and holds ``--connections`` connections to itself: 2 sockets per connection, so 100 x 100
gives 20,000 sockets plus 100 listeners. Then times one scrape of both collectors as the agent does
it (collect + render), in process CPU time, median and max of ``--scrapes``. A namespace whose
TCP counters did not move since its last dump is answered from memory (agent/collectors/ports.py),
so two cases are timed: ``steady`` (no new connection between scrapes) and ``--churn`` (every
namespace opens and closes one connection before each scrape: every one is dumped again, the
worst case). Run as root: ``make bench-network``. Every namespace and process made here is removed.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agent.collectors.listen import ListenCollector
from agent.collectors.ports import PortsCollector
from agent.exporter import render
from agent.identity.netns import NetnsIndex
from agent.identity.workloads import Workloads
from host.paths import HostPaths

HOLDER = """
import socket, sys, threading, time
n = int(sys.argv[1])
s = socket.socket(); s.bind(("127.0.0.1", 30000)); s.listen(4096)
accepted = []
threading.Thread(target=lambda: [accepted.append(s.accept()[0]) for _ in iter(int, 1)], daemon=True).start()
clients = [socket.create_connection(("127.0.0.1", 30000)) for _ in range(n)]
time.sleep(0.2)
print("ready", flush=True)
for line in sys.stdin:   # "c": open and close one more connection (churn), then answer
    socket.create_connection(("127.0.0.1", 30000)).close()
    print("ok", flush=True)
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--namespaces", type=int, default=100)
    ap.add_argument("--connections", type=int, default=100, help="per namespace (2 sockets each)")
    ap.add_argument("--scrapes", type=int, default=10)
    ap.add_argument("--churn", action="store_true", help="a new connection in every namespace before each scrape")
    ap.add_argument(
        "--child-ehash",
        type=int,
        default=0,
        help="set net.ipv4.tcp_child_ehash_entries before making the namespaces (6.1+; restored after)",
    )
    args = ap.parse_args()
    knob = Path("/proc/sys/net/ipv4/tcp_child_ehash_entries")
    saved = knob.read_text() if knob.exists() else None
    if args.child_ehash:
        knob.write_text(str(args.child_ehash))
    names = [f"nodetune-bench-{uuid.uuid4().hex[:8]}" for _ in range(args.namespaces)]
    procs: list[subprocess.Popen[str]] = []
    try:
        for name in names:
            subprocess.run(["ip", "netns", "add", name], check=True)
            subprocess.run(["ip", "netns", "exec", name, "ip", "link", "set", "lo", "up"], check=True)
            procs.append(
                subprocess.Popen(
                    ["ip", "netns", "exec", name, sys.executable, "-c", HOLDER, str(args.connections)],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    text=True,
                )
            )
        for p in procs:
            assert p.stdout.readline().strip() == "ready"
        netns = NetnsIndex(HostPaths(), Workloads(None))
        t = time.perf_counter()
        listen, ports = ListenCollector(netns), PortsCollector(netns)
        listen.maintain()  # opens each namespace's handles (setns on a thread), once
        opening = time.perf_counter() - t
        cpu, wall = [], []
        render([*listen.collect(), *ports.collect()])  # the first scrape dumps every namespace
        for _ in range(args.scrapes):
            if args.churn:
                for p in procs:
                    p.stdin.write("c\n")
                    p.stdin.flush()
                for p in procs:
                    assert p.stdout.readline().strip() == "ok"
            c0, w0 = time.process_time(), time.perf_counter()
            render([*listen.collect(), *ports.collect()])
            cpu.append(time.process_time() - c0)
            wall.append(time.perf_counter() - w0)
        sockets = 2 * args.connections * args.namespaces
        table = f"own {args.child_ehash}-bucket" if args.child_ehash else "the host's shared"
        print(
            f"namespaces: {len(netns.handles)} ({args.namespaces} made + the host's, {table} TCP table), "
            f"sockets: {sockets}, {'churn: every namespace changed' if args.churn else 'steady'} between scrapes"
        )
        print(
            f"one scrape of ports + listen: CPU median {statistics.median(cpu) * 1e3:.1f} ms, "
            f"max {max(cpu) * 1e3:.1f} ms; wall median {statistics.median(wall) * 1e3:.1f} ms "
            f"over {args.scrapes}; opening the handles once: {opening * 1e3:.0f} ms"
        )
        netns.close()
    finally:
        for p in procs:
            p.kill()
            p.wait()
        for name in names:
            subprocess.run(["ip", "netns", "delete", name], check=False)
        if saved is not None:
            knob.write_text(saved)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""sock_diag dumps: our hand-written parser (host/sockdiag.py) against pyroute2's DiagSocket.

Makes a network namespace holding N TCP connections to itself (2N sockets), then dumps every
non-listening IPv4 socket in it with each, interleaved, and prints the median CPU time of each and
their ratio. The issue that asked: use pyroute2 if it costs at most 1.5x ours. Run as root:
``python bench/sockdiag_pyroute2.py [--connections 10000] [--rounds 9]`` (pyroute2 must be
installed: ``pip install pyroute2``; the agent does not depend on it).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
HOLD = """
import socket, sys
s = socket.socket(); s.bind(("127.0.0.1", 0)); s.listen(4096)
port = s.getsockname()[1]; held = []
for _ in range(int(sys.argv[1])):
    c = socket.socket(); c.connect(("127.0.0.1", port)); held += [c, s.accept()[0]]
print("ready", flush=True); sys.stdin.readline()
"""
MEASURE = """
import socket, statistics, sys, time
sys.path.insert(0, sys.argv[2])
from host.sockdiag import ALL_STATES, TCP_LISTEN, SockDiag
from pyroute2 import DiagSocket
states = ALL_STATES & ~(1 << TCP_LISTEN)
ours = SockDiag(socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, 4))
theirs = DiagSocket(); theirs.bind()
runs = {"ours": lambda: len(ours.dump(socket.AF_INET, states)),
        "pyroute2": lambda: len(list(theirs.get_sock_stats(family=socket.AF_INET, states=states)))}
counts = {k: f() for k, f in runs.items()}
times = {k: [] for k in runs}
for _ in range(int(sys.argv[1])):
    for k, f in runs.items():
        t = time.process_time(); f(); times[k].append(time.process_time() - t)
a, b = statistics.median(times["ours"]), statistics.median(times["pyroute2"])
print(f"sockets {counts}; CPU per dump, median of {len(times['ours'])} interleaved: ours {a * 1e3:.1f} ms,"
      f" pyroute2 {b * 1e3:.1f} ms, ratio {b / a:.1f}")
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=10_000, help="connections held (2 sockets each)")
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("needs root (ip netns)", file=sys.stderr)
        return 1
    name = f"nodetune-bench-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    holders: list[subprocess.Popen[str]] = []
    try:
        run = ["ip", "netns", "exec", name]
        subprocess.run([*run, "ip", "link", "set", "lo", "up"], check=True)
        subprocess.run([*run, "sysctl", "-qw", "net.ipv4.ip_local_port_range=20000 60999"], check=True)
        per = 2500  # a process's open-file limit: 2 fds per connection
        for left in range(args.connections, 0, -per):
            holders.append(
                subprocess.Popen(
                    [*run, sys.executable, "-c", HOLD, str(min(per, left))],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    text=True,
                )
            )
        for h in holders:
            assert h.stdout.readline().strip() == "ready"
        started = time.monotonic()
        subprocess.run([*run, sys.executable, "-c", MEASURE, str(args.rounds), str(REPO)], check=True)
        print(f"({time.monotonic() - started:.1f} s)")
    finally:
        for h in holders:
            h.kill()
            h.wait()
        subprocess.run(["ip", "netns", "delete", name], check=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())

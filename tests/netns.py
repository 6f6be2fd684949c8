"""Network namespaces made by tests (``ip netns``), with a process that holds connections in them.

``Netns(port_range)`` makes a namespace with loopback up and its own ephemeral port range;
``hold(n, *targets)`` starts HOLDER inside it (optionally in a test cgroup). ``remove()`` ends the
processes it started, by pid, and deletes the namespace. The ``netns`` fixture is in conftest.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from functools import partial

from agent.collectors.ports import destination

# Listens on the given addresses (unless another holder does, or the address starts with "!": no
# listener, connects are refused), accepts forever (so connections reach ESTABLISHED), opens N
# client connections to each listener, then makes EXTRA more attempts to the first; prints "ok" or
# the errno of the first failed connect, the count held, and the extra attempts' outcomes
# ("EADDRNOTAVAIL=5").
HOLDER = """
import errno, socket, sys, threading, time
n, extra = int(sys.argv[1]), int(sys.argv[2])
unheard = {t.lstrip("!") for t in sys.argv[3:] if t.startswith("!")}
targets = [t.lstrip("!") for t in sys.argv[3:]]
servers = []
for t in targets:
    if t in unheard: continue
    host, port = t.rsplit(":", 1)
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(fam); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind((host.strip("[]"), int(port)))
    except OSError as e:   # another holder listens there already: connect to it
        if e.errno != errno.EADDRINUSE: raise
        s.close(); continue
    s.listen(4096); servers.append(s)
accepted = []
def accept(s):
    while True:
        accepted.append(s.accept()[0])
for s in servers:
    threading.Thread(target=accept, args=(s,), daemon=True).start()
clients, result = [], "ok"
for t in targets:
    host, port = t.rsplit(":", 1)
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    for _ in range(n):
        c = socket.socket(fam)
        try:
            c.connect((host.strip("[]"), int(port)))
        except OSError as e:
            result = errno.errorcode.get(e.errno, str(e.errno)); c.close(); break
        clients.append(c)
outcomes = {}
for _ in range(extra):   # further attempts towards the first target, each closed at once
    host, port = targets[0].rsplit(":", 1)
    c = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    try:
        c.connect((host.strip("[]"), int(port))); key = "ok"
    except OSError as e:
        key = errno.errorcode.get(e.errno, str(e.errno))
    c.close()
    outcomes[key] = outcomes.get(key, 0) + 1
print(result, len(clients), *(f"{k}={v}" for k, v in sorted(outcomes.items())), flush=True)
cmd = sys.stdin.readline().strip()
if cmd == "close":
    for c in clients: c.close()   # clients close first: they hold the TIME_WAIT
    time.sleep(0.1)
    for a in accepted: a.close()
    time.sleep(0.1)
    print("closed", flush=True)
    sys.stdin.readline()
"""


def enter_cgroup(cgroup: str | None) -> None:
    """Between fork and exec: move this process into ``cgroup`` (ip and python inherit it)."""
    if cgroup:
        with open(f"{cgroup}/cgroup.procs", "w") as f:
            f.write(str(os.getpid()))


class Netns:
    def __init__(self, port_range: str, reserved: str = "") -> None:
        self.name = f"nodetune-test-{uuid.uuid4().hex[:8]}"
        subprocess.run(["ip", "netns", "add", self.name], check=True)
        self.exec(["ip", "link", "set", "lo", "up"])
        self.exec(["sysctl", "-qw", f"net.ipv4.ip_local_port_range={port_range}"])
        if reserved:
            self.exec(["sysctl", "-qw", f"net.ipv4.ip_local_reserved_ports={reserved}"])
        self.procs: list[subprocess.Popen[str]] = []

    def exec(self, argv: list[str]) -> str:
        return subprocess.run(
            ["ip", "netns", "exec", self.name, *argv], capture_output=True, text=True, check=True
        ).stdout

    def hold(
        self, n: int, *targets: str, extra: int = 0, cgroup: str | None = None
    ) -> tuple[subprocess.Popen[str], str]:
        """HOLDER in the namespace: ``n`` connections per target held open, then ``extra`` more
        attempts (counted by outcome). ``cgroup``: a cgroup directory to run it in."""

        p = subprocess.Popen(
            ["ip", "netns", "exec", self.name, sys.executable, "-c", HOLDER, str(n), str(extra), *targets],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            preexec_fn=partial(enter_cgroup, cgroup),
        )
        self.procs.append(p)
        return p, p.stdout.readline().strip()

    def run(self, code: str, cgroup: str | None = None) -> str:
        """``python -c code`` in the namespace (in ``cgroup``, a cgroup directory, if given); its
        stdout once it exited."""
        p = subprocess.Popen(
            ["ip", "netns", "exec", self.name, sys.executable, "-c", code],
            stdout=subprocess.PIPE,
            text=True,
            preexec_fn=partial(enter_cgroup, cgroup),
        )
        self.procs.append(p)
        out, _ = p.communicate(timeout=60)
        return out.strip()

    def ss_in_use(self, low: int, high: int) -> dict[str, int]:
        """``ss -tan`` in the namespace: distinct local ports in [low, high] per destination."""
        ports: dict[str, set[int]] = {}
        for line in self.exec(["ss", "-tanH"]).splitlines():
            fields = line.split()
            state, local, peer = fields[0], fields[3], fields[4]
            sport = int(local.rsplit(":", 1)[1])
            if state == "LISTEN" or not low <= sport <= high:
                continue
            host, port = peer.rsplit(":", 1)
            host = host.strip("[]")
            fam = 10 if ":" in host else 2
            ports.setdefault(destination(fam, host, int(port)), set()).add(sport)
        return {d: len(p) for d, p in ports.items()}

    def remove(self) -> None:
        for p in self.procs:
            p.kill()
            p.wait()
        subprocess.run(["ip", "netns", "delete", self.name], check=False)

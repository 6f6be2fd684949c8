"""The capabilities-only variant proved on the running kernel, outside any container.

The agent (``nodetune run``, all probes and collectors) is started under ``setpriv`` with a bounding
set of exactly the capabilities that ``manifests/components/capabilities-only`` adds (root keeps
no other capability: permitted = effective = the bounding set), then once more with each of them
removed in turn. A network namespace made here holds a listener and connections, so that the
collectors that must enter other namespaces have one to enter. For each run the units that did
not work are listed with how the agent reported it.

``python -m tests.e2e.capabilities`` prints the table (README "Deploy on Kubernetes");
tests/e2e/test_capabilities.py asserts it.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from tests.conftest import free_port, http_get, parse_metrics

REPO = Path(__file__).resolve().parents[2]
COMPONENT = REPO / "manifests/components/capabilities-only/kustomization.yaml"


def component_capabilities(path: Path = COMPONENT) -> list[str]:
    """The capability names the component adds (its patch's container securityContext)."""
    doc = yaml.safe_load(path.read_text())
    for patch in doc["patches"]:
        body = yaml.safe_load(patch["patch"])
        for container in body["spec"]["template"]["spec"]["containers"]:
            caps = container.get("securityContext", {}).get("capabilities", {})
            if "add" in caps:
                assert caps.get("drop") == ["ALL"], "the component must drop ALL before adding"
                return list(caps["add"])
    raise AssertionError(f"{path}: no capabilities.add in any patch")


@dataclass
class Run:
    """What one agent run under a bounding set could do: unit -> how its failure showed."""

    bounding: list[str]
    failures: dict[str, str] = field(default_factory=dict)
    log: str = ""


def run_agent(bounding: list[str], netns: str, cache_dir: Path, log_path: Path, timeout: float = 120) -> Run:
    """Start the agent with exactly ``bounding`` (names like SYS_ADMIN), wait for /readyz and two
    housekeeping ticks, read /metrics once, stop it (SIGTERM) and judge each unit."""
    port = free_port()
    caps = ",".join(["-all", *(f"+{c.lower()}" for c in bounding)])
    cmd = [
        "setpriv",
        f"--bounding-set={caps}",
        "--inh-caps=-all",
        sys.executable,
        "-m",
        "agent.cli",
        "run",
        "--listen",
        f"127.0.0.1:{port}",
        "--cache-dir",
        str(cache_dir),
    ]
    url = f"http://127.0.0.1:{port}"
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen(cmd, cwd=REPO, stderr=log_file, stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + timeout
        families: dict[str, list] = {}
        while time.monotonic() < deadline:
            assert proc.poll() is None, log_path.read_text()
            try:
                ready = http_get(url + "/readyz", timeout=2)[0] == 200
            except OSError:
                ready = False
            if ready:
                families = parse_metrics(http_get(url + "/metrics")[1])
                # the namespace index is refreshed on the agent's timer (5 s +- 20 %): wait until
                # the test's namespace is in, or for 15 s at most (it never is when not permitted)
                if all(_seen(families, f, n) for f in NETNS_FAMILIES for n in (netns, "host")):
                    break
                if time.monotonic() > ready_at(deadline, timeout):
                    break
            time.sleep(0.5)
        else:
            raise AssertionError(f"agent under {caps} not ready in {timeout} s: {log_path.read_text()}")
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    run = Run(bounding, log=log_path.read_text())
    judge(run, families, netns)
    return run


_ready_since: dict[float, float] = {}


def ready_at(deadline: float, timeout: float) -> float:
    """15 s after the first time this run was ready (keyed by its deadline)."""
    return _ready_since.setdefault(deadline, time.monotonic() + 15)


# a series per network namespace that each collector exports (family names without _total)
NETNS_FAMILIES = {"ports": "nodetune_ephemeral_ports_in_use", "listen": "nodetune_tcp_listen_overflows"}


def _seen(families: dict[str, list], family: str, netns: str) -> bool:
    return any(s.labels.get("netns") == netns for s in families.get(family, []))


def judge(run: Run, families: dict[str, list], netns: str) -> None:
    for s in families.get("nodetune_probe_up", []):
        if s.value != 1:
            probe = s.labels["probe"]
            m = re.search(rf"probe {probe} unavailable: (.*)", run.log)
            run.failures[f"probe {probe}"] = f"nodetune_probe_up 0; log: {m.group(1)[:160] if m else '?'}"
    for s in families.get("nodetune_scrape_collector_success", []):
        if s.value != 1:
            run.failures[f"collector {s.labels['collector']}"] = "nodetune_scrape_collector_success 0"
    for unit, family in NETNS_FAMILIES.items():
        if not _seen(families, family, netns):
            run.failures[f"{unit} (a pod's netns)"] = f"no {family} series for it; collector success stays 1"
        if not _seen(families, family, "host"):
            run.failures[f"{unit} (host netns)"] = f'no {family}{{netns="host"}}; success stays 1'


# A pod's stand-in: a network namespace held only by a process of another user (no /run/netns
# name), listening and holding connections, like a container's. The agent finds it by scanning
# /proc/<pid>/ns/net, which needs ptrace read access to that process.
HOLDER = """
import socket, sys
s = socket.socket(); s.bind(("127.0.0.1", 7000)); s.listen(16)
held = [socket.create_connection(("127.0.0.1", 7000)) for _ in range(3)]
print("ok", flush=True)
sys.stdin.read()
"""


class PodLikeNetns:
    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [
                "unshare",
                "--net",
                "--",
                "sh",
                "-c",
                'ip link set lo up && exec setpriv --reuid=65534 --regid=65534 --clear-groups "$0" -c "$1"',
                sys.executable,
                HOLDER,
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        line = self.proc.stdout.readline().strip()
        assert line == "ok", line
        inode = os.readlink(f"/proc/{self.proc.pid}/ns/net")  # net:[4026532...]
        self.label = inode

    def remove(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=10)


def prove(cache_dir: Path, log_dir: Path) -> list[Run]:
    """The full set, then each capability removed in turn (in the component's order)."""
    caps = component_capabilities()
    ns = PodLikeNetns()
    try:
        runs = [run_agent(caps, ns.label, cache_dir, log_dir / "all.log")]
        for cap in caps:
            rest = [c for c in caps if c != cap]
            runs.append(run_agent(rest, ns.label, cache_dir, log_dir / f"without-{cap}.log"))
        return runs
    finally:
        ns.remove()


def table(runs: list[Run]) -> str:
    full = set(runs[0].bounding)
    lines = ["| capability removed | unit that fails | how it is reported |", "|---|---|---|"]
    for run in runs:
        removed = ", ".join(sorted(full - set(run.bounding))) or "none (the component's set)"
        if not run.failures:
            lines.append(f"| {removed} | none | every probe up, every collector succeeds |")
        for unit, how in sorted(run.failures.items()):
            lines.append(f"| {removed} | {unit} | {how} |")
    return "\n".join(lines)


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        runs = prove(Path(tmp) / "cache", Path(tmp))
        print(table(runs))

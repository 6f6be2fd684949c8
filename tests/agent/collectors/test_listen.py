"""Listen queues per network namespace, on a real namespace made by the test: overflows equal
nstat's in that namespace, saturation reaches 1.0, small backlogs are reported by port."""

from __future__ import annotations

import subprocess
import sys
import uuid

import pytest

from agent.collectors.listen import ListenCollector, tcpext
from agent.identity.netns import NetnsIndex
from agent.identity.workloads import Workloads
from host.paths import HostPaths
from tests.conftest import wait_until

LISTENER = """
import socket, sys, time
s = socket.socket(); s.bind(("127.0.0.1", 0)); s.listen(1)
print(s.getsockname()[1], flush=True)
time.sleep(120)
"""
FLOOD = """
import socket, sys, time
port = int(sys.argv[1]); socks = []
for _ in range(40):
    c = socket.socket(); c.setblocking(False)
    try: c.connect(("127.0.0.1", port))
    except BlockingIOError: pass
    socks.append(c)
sys.stdin.read()  # held until the test closes our stdin
"""


def test_tcpext_parse() -> None:
    text = "TcpExt: SyncookiesSent ListenOverflows ListenDrops\nTcpExt: 0 7 9\nIpExt: InNoRoutes\nIpExt: 1\n"
    assert tcpext(text) == {"SyncookiesSent": 0, "ListenOverflows": 7, "ListenDrops": 9}


def nstat(ns: str, name: str) -> int:
    out = subprocess.run(["ip", "netns", "exec", ns, "nstat", "-asz", name], capture_output=True, text=True, check=True)
    for line in out.stdout.splitlines():
        if line.split()[:1] == [name]:
            return int(line.split()[1])
    raise AssertionError(f"{name} not in nstat output: {out.stdout}")


def metric(collector: ListenCollector, name: str) -> dict[tuple[str, ...], float]:
    for family in collector.collect():
        if family.name == name:
            return {tuple(s.labels[k] for k in sorted(s.labels)): s.value for s in family.samples}
    return {}


@pytest.mark.root
def test_backlog_one_listener_flooded(tmp_path) -> None:
    ns = f"nodetune-test-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    subprocess.run(["ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up"], check=True)
    listener = subprocess.Popen(
        ["ip", "netns", "exec", ns, sys.executable, "-c", LISTENER], stdout=subprocess.PIPE, text=True
    )
    collector = flood = None
    try:
        port = int(listener.stdout.readline())
        paths = HostPaths()
        collector = ListenCollector(NetnsIndex(paths, Workloads(None)))
        collector.maintain()
        labels = ("", ns, "")  # sorted label names: namespace, netns, pod
        assert metric(collector, "nodetune_tcp_listen_overflows").get(labels) == 0
        flood = subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, "-c", FLOOD, str(port)], stdin=subprocess.PIPE
        )
        # backlog 1: the queue is full with 2 connections, saturation 1.0
        wait_until(
            lambda: metric(collector, "nodetune_tcp_listen_queue_saturation_ratio").get(labels) == 1.0,
            what="saturation 1.0",
        )
        backlog = metric(collector, "nodetune_tcp_listen_backlog")
        flood.stdin.close()
        flood.wait(10)  # its sockets closed: no more SYN retransmissions, the counters stay
        ours = metric(collector, "nodetune_tcp_listen_overflows")[labels]
        theirs = nstat(ns, "TcpExtListenOverflows")
        drops = metric(collector, "nodetune_tcp_listen_drops")[labels]
    finally:
        for proc in (listener, flood):
            if proc is not None:
                proc.kill()
                proc.wait()
        if collector is not None:
            collector.netns.close()
        subprocess.run(["ip", "netns", "delete", ns], check=True)
    print(f"overflows: nodetune {ours}, nstat {theirs}")
    assert theirs > 0 and ours == theirs
    assert drops >= ours
    assert {k: v for k, v in backlog.items() if k[1] == ns} == {("", ns, "", str(port)): 1.0}

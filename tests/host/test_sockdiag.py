"""sock_diag under concurrency: one namespace's socket shared by the ports and listen collectors,
the timer and several scrapers at once; every answer equals ``ss`` in that namespace, a dump cut
short never desyncs the next one, and a namespace that could not be read is counted, never
reported empty."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator

import pytest

from agent.collectors.listen import ListenCollector
from agent.collectors.ports import PortsCollector
from agent.identity.netns import NetnsIndex
from agent.identity.workloads import Workloads
from host.paths import HostPaths
from host.sockdiag import _NLMSG, _REQ, NLM_F_DUMP, NLM_F_REQUEST, SOCK_DIAG_BY_FAMILY, TCP_LISTEN

# 20 listeners with backlog 64, 20 connections accepted by each: 400 established client sockets.
SERVERS = """
import socket, sys, time
servers, clients, accepted = [], [], []
for _ in range(20):
    s = socket.socket(); s.bind(("127.0.0.1", 0)); s.listen(64); servers.append(s)
for s in servers:
    for _ in range(20):
        c = socket.socket(); c.connect(s.getsockname()); clients.append(c); accepted.append(s.accept()[0])
print(" ".join(str(s.getsockname()[1]) for s in servers), flush=True)
sys.stdin.readline()
"""


@pytest.fixture
def busy_namespace() -> Iterator[tuple[str, list[int]]]:
    name = f"nodetune-test-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    proc = None
    try:
        subprocess.run(["ip", "netns", "exec", name, "ip", "link", "set", "lo", "up"], check=True)
        proc = subprocess.Popen(
            ["ip", "netns", "exec", name, sys.executable, "-c", SERVERS],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        ports = [int(p) for p in proc.stdout.readline().split()]
        assert len(ports) == 20
        yield name, ports
    finally:
        if proc is not None:
            proc.kill()
            proc.wait()
        subprocess.run(["ip", "netns", "delete", name], check=False)


def ss(name: str, *args: str) -> list[list[str]]:
    out = subprocess.run(["ip", "netns", "exec", name, "ss", "-tnH", *args], capture_output=True, text=True, check=True)
    return [line.split() for line in out.stdout.splitlines()]


def by_netns(families, name: str, metric: str, key: str | None = None) -> dict[str, float]:
    for family in families:
        if family.name == metric:
            return {(s.labels[key] if key else ""): s.value for s in family.samples if s.labels["netns"] == name}
    return {}


@pytest.mark.root
def test_concurrent_scrapers_each_see_what_ss_sees(busy_namespace) -> None:
    name, ports = busy_namespace
    listening = {int(f[3].rsplit(":", 1)[1]): int(f[2]) for f in ss(name, "-l")}  # Send-Q = backlog
    assert {p: listening[p] for p in ports} == dict.fromkeys(ports, 64)
    established = ss(name, "state", "established")
    per_dest: dict[str, int] = {}
    for f in established:  # Recv-Q Send-Q Local Peer (no State column with a state filter)
        if int(f[2].rsplit(":", 1)[1]) not in ports:  # the client side: towards a listener
            per_dest[f[3]] = per_dest.get(f[3], 0) + 1
    top5 = sum(sorted(per_dest.values(), reverse=True)[:5])
    assert top5 == 100

    index = NetnsIndex(HostPaths(), Workloads(None))
    listen = ListenCollector(index)
    failures: list[str] = []
    rounds = 15

    def hammer(worker: int) -> None:
        for i in range(rounds):
            if (worker + i) % 2:
                families = list(listen.collect())
                backlog = by_netns(families, name, "nodetune_tcp_listen_backlog", "port")
                if backlog != {str(p): 64.0 for p in ports}:
                    failures.append(f"listen: {len(backlog)} backlog series")
            else:
                families = list(PortsCollector(index).collect())  # a new memo: a dump every time
                in_use = by_netns(families, name, "nodetune_ephemeral_ports_in_use", "destination")
                if sum(in_use.values()) != top5:
                    failures.append(f"ports: in use {sum(in_use.values())}")
            errors = by_netns(families, name, "nodetune_netns_read_errors", "collector")
            if errors:
                failures.append(f"read errors {errors}")

    threads = [threading.Thread(target=hammer, args=(w,)) for w in range(4)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
    finally:
        index.close()
    assert not any(t.is_alive() for t in threads)
    assert failures == [], failures[:10]


def _request(seq: int) -> bytes:
    body = _REQ.pack(socket.AF_INET, socket.IPPROTO_TCP, 0, 0, 0xFFF) + b"\0" * 48
    return _NLMSG.pack(_NLMSG.size + len(body), SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | NLM_F_DUMP, seq, 0) + body


@pytest.mark.root
def test_a_dump_cut_short_does_not_desync_the_next(busy_namespace) -> None:
    name, ports = busy_namespace
    index = NetnsIndex(HostPaths(), Workloads(None))
    try:
        ns = next(i for i in index.handles if index.labels(i)[2] == name)
        diag = index.handles[ns].diag
        # A dump of all 840 sockets, abandoned after its first reply (as a reader that timed out
        # or raised would leave it): the rest of it is still on the socket.
        diag.sock.send(_request(4242))
        assert diag.sock.recv(4096)
        diag._dirty = True  # what an interrupted SockDiag.dump leaves behind
        found = diag.listeners()
        assert sorted(s.sport for s in found if s.state == TCP_LISTEN) == sorted(ports)
        assert all(s.state == TCP_LISTEN for s in found) and diag.stale_dropped > 0
        # Replies of another request still queued are told apart by their sequence number.
        diag.sock.send(_request(4343))
        again = diag.listeners()
        assert sorted(s.sport for s in again) == sorted(ports)
    finally:
        index.close()


@pytest.mark.root
def test_a_namespace_that_cannot_be_read_is_counted_not_reported_empty(busy_namespace) -> None:
    name, _ports = busy_namespace
    index = NetnsIndex(HostPaths(), Workloads(None))
    try:
        ns = next(i for i in index.handles if index.labels(i)[2] == name)
        index.handles[ns].diag.sock.close()  # every dump through it now fails (EBADF)
        listen, ports = ListenCollector(index), PortsCollector(index)
        for collector, gauge, label in (
            (listen, "nodetune_tcp_listen_backlog", "listen"),
            (ports, "nodetune_ephemeral_port_range_size", "ports"),
        ):
            families = list(collector.collect())
            assert by_netns(families, name, gauge, "port" if label == "listen" else None) == {}
            errors = by_netns(families, name, "nodetune_netns_read_errors", "collector")
            assert errors == {label: 1.0}
            families = list(collector.collect())
            assert by_netns(families, name, "nodetune_netns_read_errors", "collector") == {label: 2.0}
            host = by_netns(families, "host", gauge, "port" if label == "listen" else None)
            assert label == "listen" or host  # the other namespaces are still reported
    finally:
        index.close()

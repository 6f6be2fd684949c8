"""Ephemeral ports per network namespace and destination, on namespaces made by the tests;
checked against ``ss -tan`` run inside the same namespace."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from agent.collectors.ports import PortsCollector, destination, families_with_sockets, parse_reserved
from agent.identity.netns import NetnsIndex
from agent.identity.workloads import Workloads
from host.paths import HostPaths
from tests.netns import HOLDER


def scrape(collector: PortsCollector) -> dict[str, dict[tuple[str, ...], float]]:
    out: dict[str, dict[tuple[str, ...], float]] = {}
    for family in collector.collect():
        for s in family.samples:
            out.setdefault(family.name, {})[tuple(s.labels.get(k, "") for k in ("netns", "destination"))] = s.value
    return out


def collector(top_k: int = 5) -> PortsCollector:
    return PortsCollector(NetnsIndex(HostPaths(), Workloads(None)), top_k)


def test_empty_families_are_not_dumped() -> None:
    v4 = "sockets: used 5\nTCP: inuse 3 orphan 0 tw 0 alloc 4 mem 1\nUDP: inuse 0 mem 0\n"
    v6_none = "TCP6: inuse 0\nUDP6: inuse 0\n"
    assert families_with_sockets(v4, v6_none) == (2,)
    assert families_with_sockets(v4, "TCP6: inuse 2\n") == (2, 10)
    tw = "TCP: inuse 0 orphan 0 tw 4 alloc 0 mem 0\n"
    assert families_with_sockets(tw, v6_none) == (2, 10)  # TIME_WAIT of either family: both dumped
    assert families_with_sockets("TCP: inuse 0 orphan 0 tw 0 alloc 0 mem 0\n", v6_none) == ()


def test_reserved_and_destinations_parse() -> None:
    assert parse_reserved("", 100, 200) == 0
    assert parse_reserved("8080,150-160,190-250", 100, 200) == 11 + 11
    assert destination(10, "::ffff:10.1.2.3", 80) == "10.1.2.3:80"  # v4-mapped counted as IPv4
    assert destination(10, "::1", 80) == "[::1]:80" and destination(2, "10.0.0.1", 5) == "10.0.0.1:5"


@pytest.mark.root
def test_seed_scenario_ten_port_range_exhausted_then_time_wait(netns) -> None:
    ns = netns("40000 40009")
    holder, result = ns.hold(11, "127.0.0.1:30000")
    assert result == "EADDRNOTAVAIL 10", result  # the 11th connect failed: the range is exhausted
    c = collector()
    try:
        c.netns.refresh()
        m = scrape(c)
        assert m["nodetune_ephemeral_port_range_size"][(ns.name, "")] == 10
        assert m["nodetune_ephemeral_ports_in_use"][(ns.name, "127.0.0.1:30000")] == 10
        assert m["nodetune_ephemeral_port_saturation_ratio"][(ns.name, "")] == 1.0
        holder.stdin.write("close\n")
        holder.stdin.flush()
        assert holder.stdout.readline().strip() == "closed"
        time.sleep(0.2)
        m = scrape(c)
        ss = ns.ss_in_use(40000, 40009)
        states = {line.split()[0] for line in ns.exec(["ss", "-tanH"]).splitlines()}
        assert "TIME-WAIT" in states  # the closed clients wait, and still hold their ports
        assert m["nodetune_ephemeral_ports_in_use"][(ns.name, "127.0.0.1:30000")] == ss["127.0.0.1:30000"] == 10
    finally:
        c.netns.close()


@pytest.mark.root
def test_reserved_ports_ipv6_and_two_destinations_sharing_ports(netns) -> None:
    ns = netns("40000 40009", reserved="40002-40003")
    _p, result = ns.hold(5, "127.0.0.1:30000", "127.0.0.1:30001", "[::1]:30002")
    assert result == "ok 15"
    c = collector()
    try:
        c.netns.refresh()
        m = scrape(c)
        assert m["nodetune_ephemeral_port_range_size"][(ns.name, "")] == 8  # 10 minus 2 reserved
        used = {d: v for (n, d), v in m["nodetune_ephemeral_ports_in_use"].items() if n == ns.name}
        assert used == {"127.0.0.1:30000": 5, "127.0.0.1:30001": 5, "[::1]:30002": 5} == ns.ss_in_use(40000, 40009)
        # 15 connections over 8 usable ports: local ports are shared between destinations
        assert m["nodetune_ephemeral_port_saturation_ratio"][(ns.name, "")] == 5 / 8
    finally:
        c.netns.close()


@pytest.mark.root
def test_empty_namespace_and_one_deleted_between_scrapes(netns) -> None:
    ns = netns("50000 50099")
    c = collector()
    try:
        c.netns.refresh()
        m = scrape(c)
        assert m["nodetune_ephemeral_port_range_size"][(ns.name, "")] == 100
        assert m["nodetune_ephemeral_port_saturation_ratio"][(ns.name, "")] == 0.0
        assert not [k for k in m.get("nodetune_ephemeral_ports_in_use", {}) if k[0] == ns.name]
        ns.remove()  # deleted between scrapes: its handles still read the (now unnamed) namespace
        scrape(c)
        c.netns.refresh()  # the next tick forgets it
        m = scrape(c)
        assert not [k for k in m["nodetune_ephemeral_port_range_size"] if k[0] == ns.name]
    finally:
        c.netns.close()


@pytest.mark.root
def test_agrees_with_ss_on_thousands_of_sockets_in_mixed_states(netns) -> None:
    ns = netns("40000 60999")
    holders = [ns.hold(700, f"127.0.0.1:{port}") for port in (30000, 30001, 30002)]
    assert all(r == "ok 700" for _p, r in holders)
    closing, _ = holders[0]
    closing.stdin.write("close\n")  # one destination's 700 go to TIME_WAIT
    closing.stdin.flush()
    assert closing.stdout.readline().strip() == "closed"
    time.sleep(0.2)
    c = collector(top_k=10)
    try:
        c.netns.refresh()
        t = time.perf_counter()
        m = scrape(c)
        elapsed = time.perf_counter() - t
        ss = ns.ss_in_use(40000, 60999)
    finally:
        c.netns.close()
    ours = {d: v for (n, d), v in m["nodetune_ephemeral_ports_in_use"].items() if n == ns.name}
    print(f"{sum(ours.values())} client sockets in range, scrape {elapsed * 1e3:.1f} ms; ss: {ss}")
    assert ours == ss and sum(ours.values()) == 2100


@pytest.mark.root
def test_namespace_held_only_by_a_process_is_found_by_the_scan() -> None:
    """No name, no pod: found by the /proc scan, labelled net:[inode]."""
    script = f"ip link set lo up && exec {sys.executable} -c '{HOLDER}' 3 0 127.0.0.1:30000"
    p = subprocess.Popen(
        ["unshare", "-n", "sh", "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    c = PortsCollector(NetnsIndex(HostPaths(), Workloads(None), scan_s=0))
    try:
        assert p.stdout.readline().strip() == "ok 3"
        inode = int(os.readlink(f"/proc/{p.pid}/ns/net")[5:-1])
        c.netns.refresh()
        m = scrape(c)
        label = f"net:[{inode}]"
        assert m["nodetune_ephemeral_ports_in_use"][(label, "127.0.0.1:30000")] == 3
    finally:
        p.kill()
        p.wait()
        c.netns.close()


@pytest.mark.root
def test_a_namespace_is_dumped_again_only_when_its_port_usage_can_have_changed(netns) -> None:
    """Fingerprint: port range, reserved ports, TCP inuse/tw, TCP6 inuse, ActiveOpens/PassiveOpens.
    Unchanged -> the memo is the answer (no walk of the shared table); every change shows."""
    ns = netns("40000 40999")
    holder, result = ns.hold(5, "127.0.0.1:30000")
    assert result == "ok 5"
    c = collector()
    try:
        c.netns.refresh()
        inode = next(i for i in c.netns.handles if c.netns.labels(i)[2] == ns.name)

        m = scrape(c)
        assert m["nodetune_ephemeral_ports_in_use"][(ns.name, "127.0.0.1:30000")] == 5
        memo_before = c._memo[inode]
        assert scrape(c) and c._memo[inode] is memo_before  # nothing changed: not dumped again
        # a new connection: ActiveOpens and inuse move -> dumped, and counted
        ns.exec(
            [
                sys.executable,
                "-c",
                "import socket,time; s=socket.create_connection(('127.0.0.1',30000)); time.sleep(0.05)",
            ]
        )
        scrape(c)
        assert c._memo[inode] is not memo_before
        # the range changes: the size follows at once
        ns.exec(["sysctl", "-qw", "net.ipv4.ip_local_port_range=39000 40999"])  # still covers the ports held
        assert scrape(c)["nodetune_ephemeral_port_range_size"][(ns.name, "")] == 2000
        # the holders close: TIME_WAIT (tw moves) -> still 5 ports held, as ss says
        holder.stdin.write("close\n")
        holder.stdin.flush()
        assert holder.stdout.readline().strip() == "closed"
        m = scrape(c)
        assert (
            m["nodetune_ephemeral_ports_in_use"][(ns.name, "127.0.0.1:30000")]
            == ns.ss_in_use(39000, 40999)["127.0.0.1:30000"]
        )
    finally:
        c.netns.close()

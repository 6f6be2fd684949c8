"""Ephemeral-port saturation per network namespace and destination.

connect() picks a local port from ``net.ipv4.ip_local_port_range`` (minus
``ip_local_reserved_ports``) that is free *for that destination*. The kernel may reuse a local port
towards a different destination ``ip:port``, so exhaustion happens per destination: nginx
opening connections to one upstream runs out when that one destination holds every port of the
range, in any state (TIME_WAIT included). That was seed 000, where the pod's range (32768–61000)
was narrower than the VM's. Both sysctls are per network namespace.

Kernel interfaces, per namespace, through handles opened once inside it (``agent/identity/netns.py``):
the two sysctls, and a sock_diag dump of TCP sockets in every state but LISTEN whose local port
is in the range. Both the state and the port filter run in the kernel (``host/sockdiag.py``
``ephemeral``). IPv4 and IPv6; an IPv6 socket talking to a v4-mapped address is counted under the
IPv4 destination.

A dump walks the namespace's whole established table, by default the host's, shared by every
namespace (README, Ephemeral ports): 1.4 ms per namespace with 20,000 sockets on the node. So a
namespace is dumped again only when something that decides its port usage changed since its last
dump: a socket was opened (the Tcp MIB's ActiveOpens or PassiveOpens, counters that only grow), a
socket left or entered the table or TIME_WAIT (sockstat's TCP inuse and tw, TCP6 inuse), or the
range or reserved ports changed. Ports are taken only by opening a socket, and given back only by
one leaving ``inuse`` or ``tw``, so an unchanged fingerprint means unchanged port usage; the cached
answer is what the dump would return (the cache is a memo of kernel state: two scrapers still see
the same data).

Exported per namespace: ``nodetune_ephemeral_port_range_size`` (usable ports),
``nodetune_ephemeral_ports_in_use{destination}`` for the top ``top_k`` destinations, and
``nodetune_ephemeral_port_saturation_ratio`` = max over destinations of in use / range size.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterable

from prometheus_client.metrics_core import Metric

from agent.identity.netns import NETNS_LABELS, NetnsHandles, NetnsIndex, ReadErrors
from host.sockdiag import address
from metrics.exposition import CompactScalar


def parse_reserved(text: str, low: int, high: int) -> int:
    """How many ports of [low, high] ``ip_local_reserved_ports`` (``8080,9000-9010``) reserves."""
    count = 0
    for part in text.strip().split(","):
        if not part:
            continue
        a, _, b = part.partition("-")
        start, end = int(a), int(b or a)
        count += max(0, min(end, high) - max(start, low) + 1)
    return count


def destination(family: int, address: str, port: int) -> str:
    if family == socket.AF_INET6 and address.startswith("::ffff:") and "." in address:
        address = address[7:]  # v4-mapped: the same destination as the IPv4 one
        family = socket.AF_INET
    return f"{address}:{port}" if family == socket.AF_INET else f"[{address}]:{port}"


def _words(text: str, prefix: str, names: tuple[str, ...]) -> tuple[int, ...]:
    """Values of ``names`` on the line starting with ``prefix`` in sockstat's "name value" form."""
    for line in text.splitlines():
        if line.startswith(prefix):
            words = line.split()
            return tuple(int(words[words.index(n) + 1]) if n in words else 0 for n in names)
    return (0,) * len(names)


def families_with_sockets(sockstat: str, sockstat6: str) -> tuple[int, ...]:
    """Which families a dump can find anything in. A dump walks the namespace's whole established
    table (by default the host's: README, Ephemeral ports), so an empty family is skipped: no IPv6
    dump when ``TCP6: inuse`` is 0 and no socket is in TIME_WAIT (``tw`` counts both families)."""
    inuse, tw = _words(sockstat, "TCP:", ("inuse", "tw"))
    v4 = inuse + tw
    v6 = _words(sockstat6, "TCP6:", ("inuse",))[0] + tw
    return tuple(f for f, n in ((socket.AF_INET, v4), (socket.AF_INET6, v6)) if n > 0)


def tcp_opens(snmp: str) -> tuple[int, int]:
    """(ActiveOpens, PassiveOpens) from /proc/net/snmp's two "Tcp:" lines (names, then values)."""
    lines = [line.split() for line in snmp.splitlines() if line.startswith("Tcp:")]
    if len(lines) < 2:
        return (0, 0)
    row = dict(zip(lines[0][1:], lines[1][1:], strict=False))
    return int(row.get("ActiveOpens", 0)), int(row.get("PassiveOpens", 0))


def fingerprint(h: NetnsHandles) -> tuple:
    """What decides the namespace's port usage (module docstring); reads five small files."""
    return (
        h.read(h.port_range_fd),
        h.read(h.reserved_fd),
        _words(h.read(h.sockstat_fd), "TCP:", ("inuse", "tw")),
        _words(h.read(h.sockstat6_fd), "TCP6:", ("inuse",)),
        tcp_opens(h.read(h.snmp_fd)),
    )


def read_namespace(h: NetnsHandles) -> tuple[int, dict[str, int]]:
    """(usable range size, destination -> distinct local ports in use towards it)."""
    low, high = (int(x) for x in h.read(h.port_range_fd).split())
    size = high - low + 1 - parse_reserved(h.read(h.reserved_fd), low, high)
    families = families_with_sockets(h.read(h.sockstat_fd), h.read(h.sockstat6_fd))
    by_peer: dict[tuple[int, int, bytes], set[int]] = {}  # raw (family, dport, dst) -> local ports
    for family, sport, dport, dst in h.diag.ephemeral(low, high, families):
        if dport:
            by_peer.setdefault((family, dport, dst), set()).add(sport)
    ports: dict[str, set[int]] = {}  # formatted once per peer: v4 and v4-mapped v6 peers merge here
    for (family, dport, dst), sports in by_peer.items():
        ports.setdefault(destination(family, address(family, dst), dport), set()).update(sports)
    return size, {d: len(p) for d, p in ports.items()}


class PortsCollector:
    """See module docstring."""

    def __init__(self, netns: NetnsIndex, top_k: int = 5) -> None:
        self.netns = netns
        self.top_k = top_k
        self._memo: dict[int, tuple[tuple, int, dict[str, int]]] = {}  # inode -> (fingerprint, result)
        self._lock = threading.Lock()
        self.dumps = 0  # namespaces dumped (for tests and the bench)
        self.errors = ReadErrors("ports")

    def _usage(self, inode: int, h: NetnsHandles) -> tuple[int, dict[str, int]]:
        fp = fingerprint(h)
        with self._lock:
            memo = self._memo.get(inode)
        if memo is not None and memo[0] == fp:
            return memo[1], memo[2]
        usable, per_dest = read_namespace(h)
        with self._lock:
            self._memo[inode] = (fp, usable, per_dest)
            self.dumps += 1
        return usable, per_dest

    def collect(self) -> Iterable[Metric]:
        size = CompactScalar(
            "nodetune_ephemeral_port_range_size",
            "Usable ephemeral ports of the namespace: ip_local_port_range minus ip_local_reserved_ports.",
            "gauge",
            NETNS_LABELS,
        )
        in_use = CompactScalar(
            "nodetune_ephemeral_ports_in_use",
            "Local ports of the range in use towards a destination, any TCP state (top destinations).",
            "gauge",
            (*NETNS_LABELS, "destination"),
        )
        saturation = CompactScalar(
            "nodetune_ephemeral_port_saturation_ratio",
            "Max over destinations of ports in use / usable range: 1 = connect() fails with EADDRNOTAVAIL.",
            "gauge",
            NETNS_LABELS,
        )
        rows = []
        with self.netns.borrow() as namespaces:
            for inode, h in namespaces.items():
                try:
                    usable, per_dest = self._usage(inode, h)
                except (OSError, ValueError) as e:  # counted, never reported as an empty namespace
                    self.errors.count(inode, e)
                    continue
                rows.append((self.netns.labels(inode), usable, per_dest))
        with self._lock:
            for gone in set(self._memo) - set(namespaces):
                del self._memo[gone]
        self.errors.forget_except(set(namespaces))
        for labels, usable, per_dest in sorted(rows, key=lambda r: r[0]):
            size.rows.append((labels, usable))
            top = sorted(per_dest.items(), key=lambda kv: (-kv[1], kv[0]))[: self.top_k]
            for dest, n in top:
                in_use.rows.append(((*labels, dest), n))
            busiest = top[0][1] if top else 0
            saturation.rows.append((labels, busiest / usable if usable > 0 else 0.0))
        unreadable = CompactScalar(
            "nodetune_netns_unreadable",
            "1 for a live network namespace the agent may not enter (its values are missing; see the log).",
            "gauge",
            NETNS_LABELS,
        )
        for labels in sorted(self.netns.labels(inode) for inode in dict(self.netns.unreadable)):
            unreadable.add(labels, 1)
        return [size, in_use, saturation, self.errors.family(self.netns.labels), unreadable]

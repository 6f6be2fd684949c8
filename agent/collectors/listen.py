"""TCP listen-queue overflows and saturation per network namespace (pod, host, named, other).

Kernel interfaces, per namespace, through handles opened once inside it (``agent/identity/netns.py``):

* ``/proc/net/netstat`` ``TcpExt: ListenOverflows ListenDrops``: connections dropped because an
  accept queue was full (and all listen drops): ``netstat -s``'s "times the listen queue of a
  socket overflowed" (seed 003), per namespace.
* sock_diag LISTEN sockets (``host/sockdiag.py``): for a listener, ``idiag_rqueue`` is the accept
  queue's length and ``idiag_wqueue`` its backlog (``min(listen() backlog, somaxconn)``). The queue
  is full when it holds backlog + 1 (include/net/sock.h ``sk_acceptq_is_full``: ack_backlog >
  max_ack_backlog), so saturation = queue / (backlog + 1) reaches 1.0 exactly when full.
* ``net.core.somaxconn`` of that namespace: a listener whose backlog is below it was capped by
  its own ``listen()`` call, which is what seed 001's fix raised (and a pod's namespace does not
  inherit the host's value).

Counters go through the label-set accounting (``metrics/workload_series.py``): a pod whose sandbox is
recreated (a new namespace, same names) continues its counters. Labels: ``namespace, pod, netns``.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterable

from prometheus_client.metrics_core import Metric

from agent.identity.netns import NETNS_LABELS, NetnsHandles, NetnsIndex, ReadErrors
from metrics.exposition import CompactScalar
from metrics.workload_series import Lookup, WorkloadSeries

OVERFLOWS, DROPS = 0, 1


def tcpext(text: str) -> dict[str, int]:
    """``TcpExt:`` name and value lines of /proc/net/netstat -> {name: value}."""
    lines = [line.split() for line in text.splitlines() if line.startswith("TcpExt:")]
    if len(lines) < 2:
        return {}
    return dict(zip(lines[0][1:], (int(v) for v in lines[1][1:]), strict=False))


def read_namespace(h: NetnsHandles) -> tuple[list[int], int, list[tuple[int, int, int]]]:
    """(counters [overflows, drops], somaxconn, [(port, queue, backlog)] of its listeners)."""
    ext = tcpext(os.pread(h.netstat_fd, 1 << 16, 0).decode())
    somaxconn = int(os.pread(h.somaxconn_fd, 64, 0))
    socks = [(s.sport, s.rqueue, s.wqueue) for s in h.diag.listeners()]
    return [ext.get("ListenOverflows", 0), ext.get("ListenDrops", 0)], somaxconn, socks


class ListenCollector:
    """See module docstring."""

    def __init__(self, netns: NetnsIndex, grace_s: float = 300.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.netns = netns
        self.series = WorkloadSeries(2, grace_s, clock)
        self._last: dict[int, list[int]] = {}
        self._lock = threading.Lock()
        self.errors = ReadErrors("listen")

    def maintain(self) -> None:
        """Timer (after the namespace index's refresh): retire vanished namespaces, follow labels."""
        with self._lock, self.netns.borrow() as handles:
            for inode in set(self._last) - set(handles):
                self.series.retire(inode, self._last.pop(inode))
            self.errors.forget_except(set(handles))
            for inode, h in handles.items():
                try:
                    counters, _s, _l = read_namespace(h)
                except (OSError, ValueError) as e:
                    self.errors.count(inode, e)
                    continue
                self._last[inode] = counters
                self.series.observe(inode, counters, Lookup(self.netns.labels(inode)))
            self.series.expire()

    def collect(self) -> Iterable[Metric]:
        with self._lock:
            values: dict[int, list[int]] = {}
            gauges: dict[tuple[str, ...], tuple[int, list[tuple[int, int, int]]]] = {}
            with self.netns.borrow() as handles:
                for inode, h in handles.items():
                    try:
                        counters, somaxconn, socks = read_namespace(h)
                    except (OSError, ValueError) as e:  # counted; its counters' last values stand
                        self.errors.count(inode, e)
                        continue
                    self._last[inode] = counters  # a cache of kernel state: final values if it goes
                    values[inode] = counters
                    gauges[self.netns.labels(inode)] = (somaxconn, socks)
            for inode, last in self._last.items():
                values.setdefault(inode, last)
            totals = self.series.totals(values, lambda inode: Lookup(self.netns.labels(inode)))
        overflows = CompactScalar(
            "nodetune_tcp_listen_overflows",
            "Connections dropped because a listener's accept queue was full (TcpExt ListenOverflows).",
            "counter",
            NETNS_LABELS,
        )
        drops = CompactScalar(
            "nodetune_tcp_listen_drops",
            "SYNs and connections listeners dropped (TcpExt ListenDrops).",
            "counter",
            NETNS_LABELS,
        )
        for labels, v in sorted(totals.items()):
            overflows.rows.append((labels, v[OVERFLOWS]))
            drops.rows.append((labels, v[DROPS]))
        saturation = CompactScalar(
            "nodetune_tcp_listen_queue_saturation_ratio",
            "Fullest accept queue of the namespace's listeners: queue / (backlog + 1), 1 = full.",
            "gauge",
            NETNS_LABELS,
        )
        backlog = CompactScalar(
            "nodetune_tcp_listen_backlog",
            "Backlog of listeners whose backlog is below the namespace's net.core.somaxconn, by port.",
            "gauge",
            (*NETNS_LABELS, "port"),
        )
        for labels, (somaxconn, socks) in sorted(gauges.items()):
            if socks:
                saturation.rows.append((labels, max(q / (b + 1) for _p, q, b in socks)))
            small: dict[int, int] = {}
            for port, _q, b in socks:
                if b < somaxconn:
                    small[port] = min(b, small.get(port, b))
            for port, b in sorted(small.items()):
                backlog.rows.append(((*labels, str(port)), b))
        return [overflows, drops, saturation, backlog, self.errors.family(self.netns.labels)]

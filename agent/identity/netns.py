"""Network namespaces -> the contract's netns labels: a pod's gets its names, the host's ``host``,
a named one (``ip netns add X``) ``X``, any other ``net:[<inode>]``.

Kernel interfaces: a network namespace is identified by the inode of its nsfs file
(``readlink /proc/<pid>/ns/net`` = ``net:[<inode>]``; ``stat`` of a bind mount under
``/run/netns`` gives the same inode). A pod's namespace is found through one process of the pod,
taken from ``cgroup.procs`` of the pod's cgroups in the workload hierarchy. Those cgroups are
followed through the hierarchy's shared index (``agent/identity/cgroup_hierarchy.py``, inotify),
so a refresh reads the ``cgroup.procs`` of the pod's first container (the children come from the
index, not from listing directories) and one ``readlink`` per pod, never every
``/proc/<pid>/ns/net``. Names come from the identity service (``agent/identity/workloads.py``),
the one place that parses cgroup paths.

Churn. A pod's namespace is looked up again on every refresh, so a recreated sandbox (same pod,
new namespace) moves the pod's labels to the new namespace, and the old one is released: our
handles are what kept it alive (an open netlink socket or procfs file pins its namespace). A
namespace is entered by a path that names a process (``/proc/<pid>/ns/net``); the pid can be
recycled between the lookup and the open, so the opened nsfs file's inode is checked against the
one looked up before anything is read through it. Handles are reference-counted: ``borrow()``
gives a scrape the current namespaces and keeps their handles open until it is done, even if a
refresh retires them meanwhile (their descriptor numbers are not reused under the scrape).
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from agent.identity.workloads import Workloads, parse_cgroup_path
from host import libc
from host.paths import HostPaths, read_small
from host.sockdiag import SockDiag
from metrics.exposition import CompactScalar

log = logging.getLogger(__name__)

NETNS_LABELS = ("namespace", "pod", "netns")
CLONE_NEWNET = 0x40000000
# Reading one cgroup's cgroup.procs may fail for that cgroup alone: removed meanwhile (ENOENT,
# ENODEV), not ours to read (EACCES), a threaded cgroup (EOPNOTSUPP, kernel/cgroup/cgroup.c
# cgroup_procs_start): that cgroup is skipped. Running out of descriptors or memory is the agent's
# trouble, not the pod's: the refresh fails and the daemon logs it.
AGENT_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM})


@dataclass
class NetnsHandles:
    """What the collectors read in one namespace, opened once from inside it and then read from
    any thread: a sock_diag socket (a netlink socket belongs to the namespace it was made in), the
    namespace's ``/proc/net/netstat`` (procfs net files keep the namespace of their opener) and
    its ``net.core.somaxconn`` (per namespace since 4.x). No setns and no fork per scrape."""

    diag: SockDiag
    netstat_fd: int
    somaxconn_fd: int
    port_range_fd: int  # net.ipv4.ip_local_port_range (per namespace)
    reserved_fd: int  # net.ipv4.ip_local_reserved_ports (per namespace)
    sockstat_fd: int  # /proc/net/sockstat: "TCP: inuse N orphan N tw N ..." of the namespace
    sockstat6_fd: int  # /proc/net/sockstat6: "TCP6: inuse N"
    snmp_fd: int  # /proc/net/snmp: the Tcp MIB (ActiveOpens, PassiveOpens; shared by IPv4 and IPv6)
    _users: int = 0
    _retired: bool = False
    _closed: bool = False
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def read(self, fd: int) -> str:
        return os.pread(fd, 1 << 16, 0).decode()

    def acquire(self) -> bool:
        """One more user; False if the handles are already closed."""
        with self._lock:
            if self._closed:
                return False
            self._users += 1
            return True

    def release(self) -> None:
        with self._lock:
            self._users -= 1
            last = self._retired and self._users == 0 and not self._closed
            if last:
                self._closed = True
        if last:
            self._close()

    def close(self) -> None:
        """Retire: closed now if nobody uses the handles, else when the last user releases them."""
        with self._lock:
            self._retired = True
            now = self._users == 0 and not self._closed
            if now:
                self._closed = True
        if now:
            self._close()

    @property
    def closed(self) -> bool:
        return self._closed

    def _close(self) -> None:
        self.diag.close()
        for fd in (
            self.netstat_fd,
            self.somaxconn_fd,
            self.port_range_fd,
            self.reserved_fd,
            self.sockstat_fd,
            self.sockstat6_fd,
            self.snmp_fd,
        ):
            os.close(fd)


def open_handles(ns_path: str, inode: int | None = None) -> NetnsHandles:
    """Enter the namespace at ``ns_path`` on a short-lived thread of its own and open the handles.
    With ``inode``, the namespace opened must be that one (the path may name a recycled pid):
    ``ProcessLookupError`` otherwise."""
    result: dict[str, object] = {}

    def enter() -> None:
        try:
            fd = os.open(ns_path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                found = os.fstat(fd).st_ino  # an nsfs file's inode is its namespace's
                if inode is not None and found != inode:
                    raise ProcessLookupError(f"{ns_path} is net:[{found}] now, not net:[{inode}]")
                try:
                    libc.setns(fd, CLONE_NEWNET)
                except OSError as e:
                    raise OSError(e.errno, f"setns {ns_path}: {e.strerror}") from None
            finally:
                os.close(fd)
            diag = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, 4)
            netstat = os.open("/proc/thread-self/net/netstat", os.O_RDONLY | os.O_CLOEXEC)
            flags = os.O_RDONLY | os.O_CLOEXEC
            somaxconn = os.open("/proc/sys/net/core/somaxconn", flags)
            port_range = os.open("/proc/sys/net/ipv4/ip_local_port_range", flags)
            reserved = os.open("/proc/sys/net/ipv4/ip_local_reserved_ports", flags)
            sockstat = os.open("/proc/thread-self/net/sockstat", flags)
            sockstat6 = os.open("/proc/thread-self/net/sockstat6", flags)
            snmp = os.open("/proc/thread-self/net/snmp", flags)
            result["handles"] = NetnsHandles(
                SockDiag(diag), netstat, somaxconn, port_range, reserved, sockstat, sockstat6, snmp
            )
        except OSError as e:
            result["error"] = e

    thread = threading.Thread(target=enter, name="netns-open", daemon=True)
    thread.start()
    thread.join()
    if "error" in result:
        raise result["error"]  # type: ignore[misc]
    return result["handles"]  # type: ignore[return-value]


class ReadErrors:
    """Failed reads of a namespace by one collector, counted per namespace: a collector that could
    not read a namespace says so (``nodetune_netns_read_errors_total``) instead of reporting it
    empty. Logged once per namespace and distinct error. Counts of a namespace that is gone are
    dropped with it (the series ends; it never goes back while exported)."""

    def __init__(self, collector: str) -> None:
        self.collector = collector
        self._counts: dict[int, int] = {}
        self._last: dict[int, str] = {}
        self._lock = threading.Lock()

    def count(self, inode: int, error: BaseException) -> None:
        text = f"{type(error).__name__}: {error}"
        with self._lock:
            self._counts[inode] = self._counts.get(inode, 0) + 1
            new = self._last.get(inode) != text
            self._last[inode] = text
        if new:
            log.warning("%s: reading net:[%s] failed: %s", self.collector, inode, text)

    def forget_except(self, live: set[int]) -> None:
        with self._lock:
            for inode in set(self._counts) - live:
                del self._counts[inode]
                self._last.pop(inode, None)

    def family(self, labels: Callable[[int], tuple[str, str, str]]) -> CompactScalar:
        out = CompactScalar(
            "nodetune_netns_read_errors",
            "Reads of a network namespace by a collector that failed (its values were left out).",
            "counter",
            (*NETNS_LABELS, "collector"),
        )
        with self._lock:
            counts = dict(self._counts)
        for labels_of_ns, n in sorted((labels(inode), n) for inode, n in counts.items()):
            out.add((*labels_of_ns, self.collector), n)
        return out


def netns_inode(link: str) -> int | None:
    """``net:[4026531840]`` -> 4026531840."""
    if link.startswith("net:[") and link.endswith("]"):
        return int(link[5:-1])
    return None


class NetnsIndex:
    """netns inode -> pod UID (and named / host namespaces); ``refresh()`` on the agent's timer."""

    def __init__(self, paths: HostPaths, workloads: Workloads, scan_s: float = 60.0) -> None:
        """Pods are found below the identity service's hierarchy (``workloads.hierarchy``), through
        its shared index: no tree of its own."""
        self.paths = paths
        self._proc = str(paths.proc)  # a str: a Path built per pod per refresh cost more than the readlink
        self.scan_s = scan_s
        self._scanned_at = float("-inf")
        self.others: dict[int, str] = {}  # inode -> /proc/<pid>/ns/net of a process holding it
        self.handles: dict[int, NetnsHandles] = {}
        self.workloads = workloads
        self.hierarchy = workloads.hierarchy
        self.changes = self.hierarchy.subscribe() if self.hierarchy is not None else None
        self.host: int | None = None
        self.named: dict[int, str] = {}
        self.pods: dict[int, str] = {}  # netns inode -> a cgroup path of the pod (for its labels)
        self._by_pod: dict[str, int] = {}  # pod UID -> netns inode (kept while the pod's cgroup lives)
        self._pod_uid: dict[str, str | None] = {}  # cgroup path -> its pod's UID if pod level (parsed once)
        self._children: dict[str, list[str]] = {}  # pod-level cgroup path -> its child cgroups, by name
        self._host_path = "/proc/self/ns/net"
        self.unreadable: dict[int, str] = {}  # live namespaces the agent may not enter -> why
        self._lock = threading.Lock()
        try:
            self.refresh()
        except BaseException:  # the shared index must not keep a log for an index nobody has
            self.close()
            raise

    def _pid_of(self, rel: str) -> int | None:
        """A process of the pod whose pod-level cgroup is ``rel``: the first pid in its child
        cgroups' ``cgroup.procs`` (the containers', in name order) or its own. The children come
        from the hierarchy's index (``self._children``, made by ``refresh()``), not from listing
        the directory: a cgroup directory holds some 60 control files, and telling the child
        directories among them took 30,000 stats per refresh at 500 pods (40 % of the agent's
        CPU while scraped, py-spy)."""
        root = str(self.hierarchy.root)  # type: ignore[union-attr]
        # The containers first: the pod's own cgroup.procs is empty under cgroup v2 (no processes
        # in an inner cgroup that has controllers enabled for its children) and under the
        # kubelet's v1 layout, so one read per pod finds its pid.
        for path in (*self._children.get(rel, ()), rel):
            try:
                first = (read_small(f"{root}{path.rstrip('/')}/cgroup.procs") or "").split(maxsplit=1)
            except OSError as e:
                if e.errno in AGENT_ERRNOS:
                    raise
                continue
            if first:
                try:
                    return int(first[0])
                except ValueError:
                    continue
        return None

    def _ns_of(self, pid: int) -> int | None:
        try:
            return netns_inode(os.readlink(f"{self._proc}/{pid}/ns/net"))
        except OSError:
            return None

    def _host_ns(self) -> int | None:
        """PID 1's namespace; where it cannot be read (a sandbox's init, no CAP_SYS_PTRACE) the
        agent's own, which is the host's in the DaemonSet (hostNetwork: true). Sets the path to
        enter it by."""
        host = self._ns_of(1)
        if host is not None:
            self._host_path = str(self.paths.proc / "1" / "ns" / "net")
            return host
        self._host_path = "/proc/self/ns/net"
        try:
            return netns_inode(os.readlink(self._host_path))
        except OSError:
            return None

    def _pod_level_uid(self, path: str) -> str | None:
        if path not in self._pod_uid:
            ident = parse_cgroup_path(path)
            self._pod_uid[path] = ident.pod_uid if ident.is_pod and not ident.container_id else None
        return self._pod_uid[path]

    def _entry_path(self, inode: int, host: int | None, named: dict[int, str], pods: dict[int, str]) -> str | None:
        """A path to enter a namespace by (only needed the first time it is opened)."""
        if inode == host:
            return self._host_path
        if inode in named:
            return str(self.paths.root / "run" / "netns" / named[inode])
        if inode in pods:
            pid = self._pid_of(pods[inode])
            return None if pid is None else str(self.paths.proc / str(pid) / "ns" / "net")
        return self.others.get(inode)

    def _scan_processes(self) -> dict[int, str]:
        """Namespaces held by any process (the slow path, every ``scan_s``): one readlink per pid."""
        found: dict[int, str] = {}
        try:
            entries = os.scandir(self.paths.proc)
        except OSError:
            return found
        with entries:
            for entry in entries:
                if entry.name.isdigit():
                    inode = self._ns_of(int(entry.name))
                    if inode is not None and inode not in found:
                        found[inode] = f"{entry.path}/ns/net"
        return found

    def refresh(self) -> None:
        host = self._host_ns()
        named: dict[int, str] = {}
        netns_dir = self.paths.root / "run" / "netns"
        try:
            for entry in os.scandir(netns_dir):
                try:
                    named[os.stat(entry.path).st_ino] = entry.name
                except OSError:
                    continue
        except OSError:
            pass
        pods: dict[int, str] = {}
        by_pod: dict[str, int] = {}
        if self.hierarchy is not None and self.changes is not None:
            taken = self.changes.take()
            if taken.overflowed:  # too many changes to list: keep what is still there
                live_paths = self.hierarchy.paths
                self._pod_uid = {p: u for p, u in self._pod_uid.items() if p in live_paths}
            for path in taken.removed:
                self._pod_uid.pop(path, None)
            pod_cgroups: dict[str, str] = {}  # pod UID -> its pod-level cgroup path
            paths = self.hierarchy.paths
            for path in paths:
                uid = self._pod_level_uid(path)
                if uid is not None and uid not in pod_cgroups:
                    pod_cgroups[uid] = path
            pod_paths = set(pod_cgroups.values())
            children: dict[str, list[str]] = {}
            for path in paths:
                parent, _, name = path.rpartition("/")
                # CRI-O's conmon (conmon_cgroup = "pod": crio-conmon-<id>.scope) runs in the host's
                # namespace: found first, it would make the pod look hostNetwork.
                if (parent or "/") in pod_paths and "conmon" not in name:
                    children.setdefault(parent or "/", []).append(path)
            self._children = {parent: sorted(kids) for parent, kids in children.items()}
            for uid, path in pod_cgroups.items():
                # Looked up again every refresh: a recreated sandbox gives the pod a new namespace.
                # The last one found is kept while the pod has no process to look it up by.
                pid = self._pid_of(path)
                inode = self._ns_of(pid) if pid is not None else None
                if inode is None:
                    inode = self._by_pod.get(uid)
                if inode is not None and inode != host:  # a hostNetwork pod shares the host's
                    pods[inode] = path
                    by_pod[uid] = inode
        if time.monotonic() - self._scanned_at >= self.scan_s:
            self.others = self._scan_processes()
            self._scanned_at = time.monotonic()
        # live: a pod's or named one found now, the host's, or any other whose holder is alive
        live = set(pods) | set(named) | ({host} if host is not None else set())
        live |= {inode for inode, path in self.others.items() if os.path.exists(path)}
        opened = dict(self.handles)
        unreadable: dict[int, str] = {}
        for inode in set(opened) - live:
            opened.pop(inode).close()
        for inode in live - set(opened):
            path = self._entry_path(inode, host, named, pods)
            if path is None:
                continue
            try:
                opened[inode] = open_handles(path, inode)
            except (FileNotFoundError, ProcessLookupError) as e:  # gone meanwhile: tried next tick
                log.debug("netns %s: %s", inode, e)
            except OSError as e:  # not permitted (no CAP_SYS_ADMIN / SYS_PTRACE): said, tried next tick
                unreadable[inode] = f"{type(e).__name__}: {e}"
                if self.unreadable.get(inode) != unreadable[inode]:
                    log.warning("netns net:[%s] cannot be entered, its values are missing: %s", inode, e)
        with self._lock:
            self.unreadable = unreadable
            self.host, self.named, self.pods, self._by_pod = host, named, pods, by_pod
            self.handles = opened

    def labels(self, inode: int) -> tuple[str, str, str]:
        """(namespace, pod, netns) of a network namespace, per the contract."""
        with self._lock:
            pod_path = self.pods.get(inode)
            if pod_path is not None:
                namespace, pod, _container, _cgroup = self.workloads.labels_for_path(pod_path)
                if pod:
                    return (namespace, pod, "")
            if inode == self.host:
                return ("", "", "host")
            name = self.named.get(inode)
            if name is not None:
                return ("", "", name)
            return ("", "", f"net:[{inode}]")

    @contextmanager
    def borrow(self) -> Iterator[dict[int, NetnsHandles]]:
        """The current namespaces' handles, kept open until the ``with`` block ends (module
        docstring): a refresh that retires one meanwhile closes it only after that."""
        with self._lock:
            held = {inode: h for inode, h in self.handles.items() if h.acquire()}
        try:
            yield held
        finally:
            for h in held.values():
                h.release()

    def close(self) -> None:
        if self.changes is not None:
            self.changes.close()  # the hierarchy's index is its owner's to close
        for handles in self.handles.values():
            handles.close()
        self.handles = {}

"""Network namespaces -> the contract's netns labels: a pod's gets its names, the host's ``host``,
a named one (``ip netns add X``) ``X``, any other ``net:[<inode>]``.

Kernel interfaces: a network namespace is identified by the inode of its nsfs file
(``readlink /proc/<pid>/ns/net`` = ``net:[<inode>]``; ``stat`` of a bind mount under
``/run/netns`` gives the same inode). A pod's namespace is found through one process of the pod,
taken from ``cgroup.procs`` of the pod's cgroups in the workload hierarchy. Those cgroups are
followed with inotify (``agent/cgroup_tree.py``), so a refresh reads one ``cgroup.procs`` and one
``readlink`` per pod, never every ``/proc/<pid>/ns/net``. Names come from the identity service
(``agent/workloads.py``), the one place that parses cgroup paths.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from agent.cgroup_tree import CgroupTree
from agent.paths import HostPaths
from agent.workloads import Workloads, parse_cgroup_path

log = logging.getLogger(__name__)

NETNS_LABELS = ("namespace", "pod", "netns")
CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


@dataclass
class NetnsHandles:
    """What the collectors read in one namespace, opened once from inside it and then read from
    any thread: a sock_diag socket (a netlink socket belongs to the namespace it was made in), the
    namespace's ``/proc/net/netstat`` (procfs net files keep the namespace of their opener) and
    its ``net.core.somaxconn`` (per namespace since 4.x). No setns and no fork per scrape."""

    diag: socket.socket
    netstat_fd: int
    somaxconn_fd: int
    port_range_fd: int  # net.ipv4.ip_local_port_range (per namespace)
    reserved_fd: int  # net.ipv4.ip_local_reserved_ports (per namespace)
    sockstat_fd: int  # /proc/net/sockstat: "TCP: inuse N orphan N tw N ..." of the namespace
    sockstat6_fd: int  # /proc/net/sockstat6: "TCP6: inuse N"
    snmp_fd: int  # /proc/net/snmp: the Tcp MIB (ActiveOpens, PassiveOpens; shared by IPv4 and IPv6)

    def read(self, fd: int) -> str:
        return os.pread(fd, 1 << 16, 0).decode()

    def close(self) -> None:
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


def open_handles(ns_path: str) -> NetnsHandles:
    """Enter the namespace at ``ns_path`` on a short-lived thread of its own and open the handles."""
    result: dict[str, object] = {}

    def enter() -> None:
        try:
            fd = os.open(ns_path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                if _libc.setns(fd, CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns {ns_path}: {os.strerror(err)}")
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
            result["handles"] = NetnsHandles(diag, netstat, somaxconn, port_range, reserved, sockstat, sockstat6, snmp)
        except OSError as e:
            result["error"] = e

    thread = threading.Thread(target=enter, name="netns-open", daemon=True)
    thread.start()
    thread.join()
    if "error" in result:
        raise result["error"]  # type: ignore[misc]
    return result["handles"]  # type: ignore[return-value]


def netns_inode(link: str) -> int | None:
    """``net:[4026531840]`` -> 4026531840."""
    if link.startswith("net:[") and link.endswith("]"):
        return int(link[5:-1])
    return None


class NetnsIndex:
    """netns inode -> pod UID (and named / host namespaces); ``refresh()`` on the agent's timer."""

    def __init__(
        self, paths: HostPaths, workloads: Workloads, hierarchy_root: Path | None, scan_s: float = 60.0
    ) -> None:
        self.paths = paths
        self.scan_s = scan_s
        self._scanned_at = float("-inf")
        self.others: dict[int, str] = {}  # inode -> /proc/<pid>/ns/net of a process holding it
        self.handles: dict[int, NetnsHandles] = {}
        self.workloads = workloads
        self.tree = CgroupTree(hierarchy_root) if hierarchy_root is not None else None
        self.root = hierarchy_root
        self.host: int | None = None
        self.named: dict[int, str] = {}
        self.pods: dict[int, str] = {}  # netns inode -> a cgroup path of the pod (for its labels)
        self._by_pod: dict[str, int] = {}  # pod UID -> netns inode (kept while the pod's cgroup lives)
        self._pod_uid: dict[str, str | None] = {}  # cgroup path -> its pod's UID if pod level (parsed once)
        self._host_path = "/proc/self/ns/net"
        self._lock = threading.Lock()
        self.refresh()

    def _pid_of(self, rel: str) -> int | None:
        base = self.root / rel.lstrip("/")  # type: ignore[operator]
        candidates = [base, *sorted(p for p in base.iterdir() if p.is_dir())] if base.is_dir() else []
        for directory in candidates:
            try:
                for line in (directory / "cgroup.procs").read_text().split():
                    return int(line)
            except (OSError, ValueError):
                continue
        return None

    def _ns_of(self, pid: int) -> int | None:
        try:
            return netns_inode(os.readlink(self.paths.proc / str(pid) / "ns" / "net"))
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
        if self.tree is not None:
            _added, removed = self.tree.refresh()
            for path in removed:
                self._pod_uid.pop(path, None)
            pod_cgroups: dict[str, str] = {}  # pod UID -> its pod-level cgroup path
            for path in self.tree.paths:
                uid = self._pod_level_uid(path)
                if uid is not None and uid not in pod_cgroups:
                    pod_cgroups[uid] = path
            for uid, path in pod_cgroups.items():
                inode = self._by_pod.get(uid)
                if inode is None:
                    pid = self._pid_of(path)
                    inode = self._ns_of(pid) if pid is not None else None
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
        for inode in set(opened) - live:
            opened.pop(inode).close()
        for inode in live - set(opened):
            path = self._entry_path(inode, host, named, pods)
            if path is None:
                continue
            try:
                opened[inode] = open_handles(path)
            except OSError as e:  # gone meanwhile, or not permitted: skipped, tried next tick
                log.debug("netns %s: %s", inode, e)
        with self._lock:
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

    def snapshot(self) -> dict[int, NetnsHandles]:
        with self._lock:
            return dict(self.handles)

    def close(self) -> None:
        if self.tree is not None:
            self.tree.close()
        for handles in self.handles.values():
            handles.close()
        self.handles = {}

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

import logging
import os
import threading
from pathlib import Path

from agent.cgroup_tree import CgroupTree
from agent.paths import HostPaths
from agent.workloads import Workloads, parse_cgroup_path

log = logging.getLogger(__name__)

NETNS_LABELS = ("namespace", "pod", "netns")


def netns_inode(link: str) -> int | None:
    """``net:[4026531840]`` -> 4026531840."""
    if link.startswith("net:[") and link.endswith("]"):
        return int(link[5:-1])
    return None


class NetnsIndex:
    """netns inode -> pod UID (and named / host namespaces); ``refresh()`` on the agent's timer."""

    def __init__(self, paths: HostPaths, workloads: Workloads, hierarchy_root: Path | None) -> None:
        self.paths = paths
        self.workloads = workloads
        self.tree = CgroupTree(hierarchy_root) if hierarchy_root is not None else None
        self.root = hierarchy_root
        self.host: int | None = None
        self.named: dict[int, str] = {}
        self.pods: dict[int, str] = {}  # netns inode -> a cgroup path of the pod (for its labels)
        self._by_pod: dict[str, int] = {}  # pod UID -> netns inode (kept while the pod's cgroup lives)
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
        agent's own, which is the host's in the DaemonSet (hostNetwork: true)."""
        host = self._ns_of(1)
        if host is None:
            try:
                host = netns_inode(os.readlink("/proc/self/ns/net"))
            except OSError:
                return None
        return host

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
            self.tree.refresh()
            pod_cgroups: dict[str, str] = {}  # pod UID -> its pod-level cgroup path
            for path in self.tree.paths:
                ident = parse_cgroup_path(path)
                if ident.is_pod and not ident.container_id and ident.pod_uid not in pod_cgroups:
                    pod_cgroups[ident.pod_uid] = path
            for uid, path in pod_cgroups.items():
                inode = self._by_pod.get(uid)
                if inode is None:
                    pid = self._pid_of(path)
                    inode = self._ns_of(pid) if pid is not None else None
                if inode is not None and inode != host:  # a hostNetwork pod shares the host's
                    pods[inode] = path
                    by_pod[uid] = inode
        with self._lock:
            self.host, self.named, self.pods, self._by_pod = host, named, pods, by_pod

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

    def close(self) -> None:
        if self.tree is not None:
            self.tree.close()

"""Workload identity: cgroup id / cgroup path -> the contract's workload labels.

The one place that parses cgroup paths. Kernel interface: the cgroup v2 hierarchy, where a
cgroup's id (``bpf_get_current_cgroup_id()``) is the inode number of its directory (kernfs node
id; on 64-bit kernels ino == id, fs/kernfs/dir.c). The v1 controllers (``cpu``) use the same path
layout below their own roots, so path parsing serves both.

Kubernetes pod cgroups are recognised for both kubelet cgroup drivers:

* cgroupfs: ``/kubepods[/burstable|/besteffort]/pod<uid>/<container id>``
* systemd:  ``/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid_with_underscores>.slice/
  cri-containerd-<id>.scope`` (also ``crio-<id>.scope``, ``docker-<id>.scope``)

possibly below a prefix (kubelet ``--cgroup-root``, kind's ``/kubelet.slice/kubelet-kubepods.slice``).
Labels (contract): a container of a pod whose names are known gets namespace/pod/container and
``cgroup=""``; anything else gets empty names and ``cgroup`` = its path, cut to two levels below the
root for non-pod cgroups (``/system.slice/redis.service``).
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from probes.base import CgroupLabeler, CgroupLabels

log = logging.getLogger(__name__)

WORKLOAD_LABELS = ("namespace", "pod", "container", "cgroup")
HOST_CGROUP_DEPTH = 2

_UID = r"[0-9a-f]{8}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{12}|[0-9a-f]{32}"  # static pods: md5
# systemd slices repeat their parents' names: [kubelet-]kubepods-burstable-pod<uid>.slice
_POD_SEGMENT = re.compile(rf"^(?:[a-z-]*kubepods-(?:(besteffort|burstable)-)?)?pod({_UID})(?:\.slice)?$")
_QOS_SEGMENT = re.compile(r"^(?:[a-z-]*kubepods-)?(besteffort|burstable)(?:\.slice)?$")
_CONTAINER_SEGMENT = re.compile(r"^(?:(cri-containerd|crio|docker|cri-o)-)?([0-9a-f]{64})(?:\.scope)?$")
_CONMON_SEGMENT = re.compile(r"^crio-conmon-([0-9a-f]{64})\.scope$")
_RUNTIMES = {"cri-containerd": "containerd", "crio": "cri-o", "cri-o": "cri-o", "docker": "docker"}


@dataclass(frozen=True)
class CgroupIdentity:
    """What a cgroup path says about its owner. Pod fields are empty for non-pod cgroups."""

    path: str  # relative to the hierarchy root, "/" for the root itself
    pod_uid: str = ""  # with dashes, as in the API
    container_id: str = ""  # runtime's container id (64 hex), "" for pod-level cgroups
    runtime: str = ""  # containerd, cri-o, docker; "" when the path does not say (cgroupfs driver)
    qos: str = ""  # guaranteed, burstable, besteffort

    @property
    def is_pod(self) -> bool:
        return bool(self.pod_uid)


def parse_cgroup_path(path: str) -> CgroupIdentity:
    """Classify a cgroup path (relative to its hierarchy root). Pure."""
    path = "/" + path.strip("/") if path.strip("/") else "/"
    segments = [s for s in path.split("/") if s]
    for i, segment in enumerate(segments):
        m = _POD_SEGMENT.match(segment)
        if not m or not any("kubepods" in s for s in segments[: i + 1]):
            continue
        qos = m.group(1) or ""
        if not qos:
            for s in segments[:i]:
                q = _QOS_SEGMENT.match(s)
                qos = q.group(1) if q else qos
        qos = qos or "guaranteed"
        uid = m.group(2).replace("_", "-")
        container_id = runtime = ""
        if i + 1 < len(segments):
            c = _CONTAINER_SEGMENT.match(segments[i + 1])
            if c:
                container_id, runtime = c.group(2), _RUNTIMES.get(c.group(1) or "", "")
            elif _CONMON_SEGMENT.match(segments[i + 1]):
                runtime = "cri-o"  # CRI-O's per-container monitor process: pod level, no container
        return CgroupIdentity(path, uid, container_id, runtime, qos)
    return CgroupIdentity(path)


def host_cgroup_label(path: str, depth: int = HOST_CGROUP_DEPTH) -> str:
    """A non-pod cgroup path cut to ``depth`` levels: /system.slice/redis.service/x -> /system.slice/redis.service."""
    segments = [s for s in path.split("/") if s][:depth]
    return "/" + "/".join(segments)


class PodNames(Protocol):
    """Source of pod names (the Kubernetes watch); returns None for pods it does not know."""

    def names(self, pod_uid: str, container_id: str) -> tuple[str, str, str] | None: ...


class CgroupIdIndex:
    """cgroup v2 id -> path, by walking the hierarchy; rescanned on a miss, at most every ``min_rescan_s``."""

    def __init__(self, root: Path, min_rescan_s: float = 0.5) -> None:
        self.root = root
        self.min_rescan_s = min_rescan_s
        self._paths: dict[int, str] = {}
        self._scanned_at = float("-inf")
        self._lock = threading.Lock()

    def _walk(self) -> dict[int, str]:
        # scandir's d_ino is the kernfs id for cgroupfs, so no stat() per directory is needed.
        found: dict[int, str] = {}
        try:
            found[os.stat(self.root).st_ino] = "/"
        except OSError:
            return found
        stack = [(str(self.root), "")]
        while stack:
            directory, rel = stack.pop()
            try:
                with os.scandir(directory) as it:
                    for entry in it:
                        if entry.is_dir(follow_symlinks=False):
                            child = f"{rel}/{entry.name}"
                            found[entry.inode()] = child
                            stack.append((entry.path, child))
            except OSError:  # removed while walking
                continue
        return found

    def rescan(self) -> None:
        paths = self._walk()
        with self._lock:
            self._paths = paths
            self._scanned_at = time.monotonic()

    def path_of(self, cgroup_id: int) -> str | None:
        path = self._paths.get(cgroup_id)
        if path is None and time.monotonic() - self._scanned_at >= self.min_rescan_s:
            self.rescan()
            path = self._paths.get(cgroup_id)
        return path


class Workloads(CgroupLabeler):
    """The identity service: labels for cgroup ids (BPF) and cgroup paths (cgroupfs collectors)."""

    label_names = WORKLOAD_LABELS

    def __init__(self, cgroup_v2_root: Path | None, pod_names: PodNames | None = None) -> None:
        self.index = CgroupIdIndex(cgroup_v2_root) if cgroup_v2_root is not None else None
        self.pod_names = pod_names

    def identity(self, path: str) -> CgroupIdentity:
        return parse_cgroup_path(path)

    def labels_for_path(self, path: str) -> tuple[str, str, str, str]:
        ident = parse_cgroup_path(path)
        if not ident.is_pod:
            return ("", "", "", host_cgroup_label(ident.path))
        names = self.pod_names.names(ident.pod_uid, ident.container_id) if self.pod_names else None
        if names is None:
            return ("", "", "", ident.path)
        return (*names, "")

    def labels_for_cgroup_id(self, cgroup_id: int) -> CgroupLabels:
        if self.index is None:
            return None
        path = self.index.path_of(cgroup_id)
        return None if path is None else self.labels_for_path(path)

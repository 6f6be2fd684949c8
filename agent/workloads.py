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

import ctypes
import ctypes.util
import errno
import logging
import os
import re
import struct
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from probes.base import CgroupLabeler
from probes.series import Lookup

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
    """Source of pod names (the Kubernetes watch); returns None for pods it does not know.
    ``version`` changes whenever any answer may have changed (cached labels are then recomputed)."""

    version: int

    def names(self, pod_uid: str, container_id: str) -> tuple[str, str, str] | None: ...


_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
FILEID_KERNFS = 0xFE  # include/linux/exportfs.h: a kernfs handle is the node's u64 id


class CgroupIdIndex:
    """cgroup id -> path in one hierarchy (v2, or a v1 controller), and whether an id is gone.

    Kernel interface: cgroupfs is exportable (kernfs ``kernfs_export_ops``), so
    ``open_by_handle_at(2)`` with the 8-byte id as a ``FILEID_KERNFS`` handle opens the cgroup's
    directory, or fails with ESTALE once it is removed: one lookup per id, no walk, and "gone" is
    certain. It needs CAP_DAC_READ_SEARCH; it is checked once on the hierarchy's root and, where it
    does not work (no capability, not a cgroupfs, e.g. a fixture tree), the index walks the tree
    instead: on a miss (at most every ``min_rescan_s``) and when its last walk is older than
    ``max_age_s``. Then an id is gone when a walk that began after the id was first asked for does
    not find it. Paths of gone ids are remembered (bounded) so their last labels stay known.
    """

    GONE_MEMORY = 8192

    def __init__(self, root: Path, min_rescan_s: float = 0.5, max_age_s: float = 30.0) -> None:
        self.root = root
        self.min_rescan_s = min_rescan_s
        self.max_age_s = max_age_s
        self._prefix = os.path.realpath(root)
        self._paths: dict[int, str] = {}
        self._gone: dict[int, str | None] = {}  # insertion-ordered: oldest evicted first
        self._asked: dict[int, float] = {}  # walk mode: when an unknown id was first asked for
        self._scanned_at = float("-inf")
        self._scan_started = float("-inf")
        self._lock = threading.RLock()
        self._mount_fd: int | None = None
        self.by_handle = self._probe_by_handle()

    # --- open_by_handle_at ----------------------------------------------------------------
    def _probe_by_handle(self) -> bool:
        try:
            self._mount_fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            root_id = os.fstat(self._mount_fd).st_ino
        except OSError:
            return False
        ok = self._open_by_id(root_id) == "/"
        if not ok:
            os.close(self._mount_fd)
            self._mount_fd = None
        return ok

    def _open_by_id(self, cgroup_id: int) -> str | OSError | None:
        """Path of a live id; None if gone (ESTALE/ENOENT); the OSError for anything else."""
        handle = ctypes.create_string_buffer(struct.pack("<IiQ", 8, FILEID_KERNFS, cgroup_id))
        fd = _libc.open_by_handle_at(self._mount_fd, handle, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        if fd < 0:
            err = ctypes.get_errno()
            return None if err in (errno.ESTALE, errno.ENOENT) else OSError(err, os.strerror(err))
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError as e:
            return e
        finally:
            os.close(fd)
        if target.endswith(" (deleted)"):
            return None
        if target == self._prefix:
            return "/"
        if not target.startswith(self._prefix + "/"):
            return OSError(errno.EXDEV, f"{target} is outside {self._prefix}")
        return target[len(self._prefix) :]

    # --- walking --------------------------------------------------------------------------
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
        started = time.monotonic()
        paths = self._walk()
        with self._lock:
            for cgroup_id, path in self._paths.items():
                if cgroup_id not in paths:
                    self._remember_gone(cgroup_id, path)
            self._paths = paths
            self._scan_started, self._scanned_at = started, time.monotonic()

    def _remember_gone(self, cgroup_id: int, path: str | None) -> None:
        self._gone[cgroup_id] = path
        self._asked.pop(cgroup_id, None)
        while len(self._gone) > self.GONE_MEMORY:
            self._gone.pop(next(iter(self._gone)))

    def _lookup_walking(self, cgroup_id: int) -> tuple[str | None, bool]:
        now = time.monotonic()
        path = self._paths.get(cgroup_id)
        stale = now - self._scanned_at >= self.max_age_s
        if stale or (path is None and cgroup_id not in self._gone and now - self._scanned_at >= self.min_rescan_s):
            self._asked.setdefault(cgroup_id, now)
            self.rescan()
            path = self._paths.get(cgroup_id)
        if path is not None:
            self._asked.pop(cgroup_id, None)
            return path, False
        if cgroup_id in self._gone:
            return self._gone[cgroup_id], True
        asked = self._asked.setdefault(cgroup_id, now)
        if asked < self._scan_started:  # a whole walk since it was asked for did not find it
            self._remember_gone(cgroup_id, None)
            return None, True
        return None, False

    # --- the lookup -----------------------------------------------------------------------
    def lookup(self, cgroup_id: int, check_gone: bool = True) -> tuple[str | None, bool]:
        """(path or last known path or None, gone for certain). With ``check_gone=False`` a path
        already known is returned without asking the kernel again (scrapes need labels only)."""
        with self._lock:
            if cgroup_id in self._gone:
                return self._gone[cgroup_id], True
            if not check_gone and cgroup_id in self._paths:
                return self._paths[cgroup_id], False
            if not self.by_handle:
                return self._lookup_walking(cgroup_id)
            found = self._open_by_id(cgroup_id)
            if isinstance(found, OSError):
                log.warning("cgroup id lookups by handle failed (%s); walking %s instead", found, self.root)
                self.by_handle = False
                return self._lookup_walking(cgroup_id)
            if found is None:
                self._remember_gone(cgroup_id, self._paths.pop(cgroup_id, None))
                return self._gone[cgroup_id], True
            self._paths[cgroup_id] = found
            return found, False

    def path_of(self, cgroup_id: int) -> str | None:
        path, gone = self.lookup(cgroup_id)
        return None if gone else path


class Workloads(CgroupLabeler):
    """The identity service: labels for cgroup ids (BPF) and cgroup paths (cgroupfs collectors).

    ``hierarchy_root`` is the hierarchy the probes charge (``--cgroup-hierarchy``): cgroup v2, or the
    v1 ``cpu`` controller on hosts whose pods live only in v1 controllers. Labels are computed once
    per path and recomputed when the pod-name source's ``version`` changes.
    """

    label_names = WORKLOAD_LABELS

    def __init__(self, hierarchy_root: Path | None, pod_names: PodNames | None = None) -> None:
        self.index = CgroupIdIndex(hierarchy_root) if hierarchy_root is not None else None
        self.pod_names = pod_names
        self._labels: dict[str, tuple[str, str, str, str]] = {}
        self._labels_version = -1

    def identity(self, path: str) -> CgroupIdentity:
        return parse_cgroup_path(path)

    def labels_for_path(self, path: str) -> tuple[str, str, str, str]:
        version = self.pod_names.version if self.pod_names else 0
        if version != self._labels_version or len(self._labels) > 65536:
            self._labels, self._labels_version = {}, version
        labels = self._labels.get(path)
        if labels is None:
            labels = self._labels[path] = self._compute_labels(path)
        return labels

    def _compute_labels(self, path: str) -> tuple[str, str, str, str]:
        ident = parse_cgroup_path(path)
        if not ident.is_pod:
            return ("", "", "", host_cgroup_label(ident.path))
        names = self.pod_names.names(ident.pod_uid, ident.container_id) if self.pod_names else None
        if names is None:
            return ("", "", "", ident.path)
        return (*names, "")

    def resolve(self, cgroup_id: int, check_gone: bool = True) -> Lookup:
        if self.index is None:
            return Lookup(None)
        path, gone = self.index.lookup(cgroup_id, check_gone)
        return Lookup(None if path is None else self.labels_for_path(path), gone)

    def labels_for_cgroup_id(self, cgroup_id: int) -> tuple[str, str, str, str] | None:
        """Labels of a live cgroup id, None if unknown or gone."""
        found = self.resolve(cgroup_id)
        return None if found.gone else found.labels  # type: ignore[return-value]

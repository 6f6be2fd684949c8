"""Workload identity: cgroup id / cgroup path -> the contract's workload labels.

The one place that parses cgroup paths. A cgroup id (``bpf_get_current_cgroup_id()``) is turned
into its path by the hierarchy's shared index (``agent/identity/cgroup_hierarchy.py``). The v1
controllers (``cpu``) lay out the same paths below their own roots, so path parsing serves both.

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

import re
from dataclasses import dataclass
from typing import Protocol

from agent.identity.cgroup_hierarchy import CgroupHierarchy
from metrics.workload_series import Lookup
from probes.base import CgroupLabeler

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


def label_value(path: str) -> str:
    """A cgroup path as a label value. A cgroup name may be any bytes but "/" (cgroupfs takes what
    mkdir(2) takes), and the tree decodes names with os.fsdecode(), so bytes that are not UTF-8
    arrive as surrogate escapes, which the exposition cannot encode: one such cgroup would fail
    every scrape. They are written as ``\\xNN`` instead; a valid name is returned as it is."""
    try:
        path.encode()
    except UnicodeEncodeError:
        return path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return path


class PodNames(Protocol):
    """Source of pod names (the Kubernetes watch); returns None for pods it does not know.
    ``version`` changes whenever any answer may have changed (cached labels are then recomputed)."""

    version: int

    def names(self, pod_uid: str, container_id: str) -> tuple[str, str, str] | None: ...


class Workloads(CgroupLabeler):
    """The identity service: labels for cgroup ids (BPF) and cgroup paths (cgroupfs collectors).

    ``hierarchy`` is the index of the hierarchy the probes charge (``--cgroup-hierarchy``): cgroup
    v2, or the v1 ``cpu`` controller on hosts whose pods live only in v1 controllers; its id
    lookups say which cgroup an id is and whether it is gone (``agent/identity/cgroup_hierarchy.py``).
    Labels are computed once per path and recomputed when the pod-name source's ``version`` changes.
    """

    label_names = WORKLOAD_LABELS

    def __init__(self, hierarchy: CgroupHierarchy | None, pod_names: PodNames | None = None) -> None:
        self.hierarchy = hierarchy
        self.pod_names = pod_names
        # (pod-name version, path -> labels), replaced as a whole: a reader takes the pair once
        self._labels: tuple[int, dict[str, tuple[str, str, str, str]]] = (-1, {})

    def labels_for_path(self, path: str) -> tuple[str, str, str, str]:
        version = self.pod_names.version if self.pod_names else 0  # read before the names
        cached_version, labels_of = self._labels
        if version != cached_version or len(labels_of) > 65536:
            labels_of = {}
            self._labels = (version, labels_of)
        labels = labels_of.get(path)
        if labels is None:
            # stored only into the dict of the version read above: when the names changed
            # meanwhile, another thread has replaced that dict and this entry goes with it
            labels = labels_of[path] = self._compute_labels(path)
        return labels

    def _compute_labels(self, path: str) -> tuple[str, str, str, str]:
        ident = parse_cgroup_path(path)
        if not ident.is_pod:
            return ("", "", "", label_value(host_cgroup_label(ident.path)))
        names = self.pod_names.names(ident.pod_uid, ident.container_id) if self.pod_names else None
        if names is None:
            return ("", "", "", label_value(ident.path))
        return (*names, "")

    def resolve(self, cgroup_id: int, check_gone: bool = True) -> Lookup:
        if self.hierarchy is None:
            return Lookup(None)
        path, gone = self.hierarchy.lookup(cgroup_id, check_gone)
        return Lookup(None if path is None else self.labels_for_path(path), gone)

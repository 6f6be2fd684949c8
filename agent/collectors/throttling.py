"""CFS bandwidth (quota) throttling and CPU usage per container, pod and limited host cgroup.

Kernel interfaces (read at scrape time only):

* cgroup v2, when the ``cpu`` controller is on the unified hierarchy: ``cpu.stat``
  (``usage_usec``, ``nr_periods``, ``nr_throttled``, ``throttled_usec``, and since 5.14
  ``nr_bursts``, ``burst_usec``), ``cpu.max`` (``$QUOTA $PERIOD`` or ``max $PERIOD``) and
  ``cpu.max.burst`` (µs, 5.14+).
* cgroup v1 ``cpu`` controller: ``cpu.stat`` (``nr_periods``, ``nr_throttled``, ``throttled_time``
  in ns, and since 5.14 ``nr_bursts``, ``burst_time`` in ns), ``cpu.cfs_quota_us`` (-1 = no
  limit), ``cpu.cfs_period_us``, ``cpu.cfs_burst_us`` (5.14+); usage from the ``cpuacct``
  controller's ``cpuacct.usage`` (ns) at the same path (co-mounted or not).

Exported: every pod container cgroup and pod-level cgroup (``container=""``, as cAdvisor does), and
every non-pod cgroup that has a quota (several under one two-level host label: the shallowest
one, so nested quotas are not counted twice). Labels come from the identity service only. The
list of cgroups is the hierarchy's shared index (``agent/identity/cgroup_hierarchy.py``: inotify,
no walk per scrape; the one the identity service and netns index use when they read the same
hierarchy), and counters go
through the same label-set accounting as the probes (``metrics/workload_series.py``): a restarted
container's new cgroup continues its label set's counters, which never go back. A scrape refreshes
caches of kernel state (the tree, each cgroup's last values) and changes nothing else; retiring
vanished cgroups and following label changes is ``maintain()``'s, on the agent's timer.
"""

from __future__ import annotations

import errno
import logging
import os
import resource
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from prometheus_client.metrics_core import Metric

from agent.identity.cgroup_hierarchy import CgroupHierarchies
from agent.identity.workloads import WORKLOAD_LABELS, Workloads, parse_cgroup_path
from host.paths import HostPaths, read_small
from metrics.exposition import CompactScalar
from metrics.workload_series import Lookup, WorkloadSeries

log = logging.getLogger(__name__)

# Counter vector layout (what the series accounting keeps per cgroup).
PERIODS, THROTTLED, THROTTLED_NS, USAGE_NS, BURSTS, BURST_NS = range(6)
WIDTH = 6
Key = tuple[str, int]  # a cgroup: (path, identity), see KeptFiles.ident


class KeptFiles:
    """Open pseudo-files kept per cgroup and re-read with ``pread(fd, n, 0)``: a kernfs seq_file
    regenerates its text on a read at offset 0. An open by path walks every component of a long
    cgroup path (14 us here); a pread on a kept fd costs 2.3 us. Each cgroup's fds are closed when
    it leaves the tree; reading a removed cgroup's file fails with ENODEV, which means gone. If the
    process runs out of descriptors, files are opened per read instead (logged once).

    ``ident()`` tells cgroups apart that had the same path: every kernfs node has an inode number
    of its own (fs/kernfs/dir.c, ``kernfs_new_node`` allocates it from an idr), so a cgroup removed
    and made again at the same path has files with new inode numbers."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._fds: dict[str, dict[str, int]] = {}
        self._inos: dict[tuple[str, str], int] = {}
        self._keep = True
        self._cached: dict[str, dict[str, tuple[float, str | None]]] = {}  # directory -> name -> (t, text)
        self.clock = clock

    def read_settled(self, directory: str, name: str, max_age_s: float = 5.0) -> str | None:
        """A setting that changes only when someone reconfigures the cgroup (quota, period, burst):
        read at most every ``max_age_s``, which saves three of five reads per cgroup per scrape.
        A limit change (an in-place pod resize) therefore shows within 5 s; counters are always read.
        A miss (no such file: no burst support, no cpu controller) is kept as well, and dropped
        with the directory by ``forget()``."""
        now = self.clock()
        cached = self._cached.setdefault(directory, {})
        hit = cached.get(name)
        if hit is not None and now - hit[0] < max_age_s:
            return hit[1]
        text = self.read(directory, name)
        if directory in self._cached:  # not forgotten by the read (the cgroup went away)
            cached[name] = (now, text)
        return text

    def ident(self, directory: str, name: str) -> int:
        """The inode of the file last read as ``directory/name`` (0 if it never was)."""
        return self._inos.get((directory, name), 0)

    def read(self, directory: str, name: str) -> str | None:
        files = self._fds.setdefault(directory, {})
        fd = files.get(name)
        if fd is None:
            try:
                fd = os.open(f"{directory}/{name}", os.O_RDONLY | os.O_CLOEXEC)
            except OSError as e:
                if e.errno in (errno.ENOENT, errno.ENODEV, errno.ENOTDIR):
                    return None
                raise
            self._inos[(directory, name)] = os.fstat(fd).st_ino
            if not self._keep:
                try:
                    return os.read(fd, 4096).decode()
                finally:
                    os.close(fd)
            files[name] = fd
            if len(files) == 1 and self._near_limit():
                self._keep = False
                log.warning("throttling: close to the open-file limit; cgroup files are now opened per read")
        try:
            return os.pread(fd, 4096, 0).decode()
        except OSError as e:
            if e.errno not in (errno.ENODEV, errno.ENOENT):
                raise
            # The cgroup was removed (maybe made again at the same path): drop its stale fds and
            # settings, so a new cgroup there is read afresh.
            self.forget(directory)
            return None

    def _near_limit(self) -> bool:
        soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        return soft != resource.RLIM_INFINITY and sum(len(f) for f in self._fds.values()) > soft // 2

    def forget(self, directory: str) -> None:
        """Close a cgroup's files and drop all that is kept of it (settings and misses included)."""
        for name, fd in self._fds.pop(directory, {}).items():
            os.close(fd)
            self._inos.pop((directory, name), None)
        self._cached.pop(directory, None)

    def kept(self) -> int:
        """Directories with anything kept (tests: nothing outlives its cgroup)."""
        return len(set(self._fds) | set(self._cached))

    def close(self) -> None:
        for directory in list(set(self._fds) | set(self._cached)):
            self.forget(directory)


def raise_open_file_limit() -> None:
    """Soft RLIMIT_NOFILE up to the hard one (Go's runtime does the same): kept cgroup files need
    a few descriptors per container."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def parse_stat(text: str) -> dict[str, int]:
    """``key value`` lines (cpu.stat) -> {key: value}."""
    words = iter(text.split())
    return {key: int(value) for key, value in zip(words, words, strict=False)}


@dataclass(frozen=True)
class Sample:
    """One cgroup's numbers at one read: counters (WIDTH, ns and counts) and limits (cores)."""

    counters: list[int]
    ident: int  # which cgroup was read: its cpu.stat's inode (two cgroups can have had one path)
    has_burst: bool
    limit_cores: float | None  # None: no quota
    burst_cores: float | None  # None: the kernel has no CFS burst


class CgroupV2Reader:
    """cgroup v2 files of one cgroup directory."""

    def __init__(self, root: Path) -> None:
        self.root = str(root)
        self.files = KeptFiles()

    def forget(self, rel: str) -> None:
        self.files.forget(self.root + (rel if rel != "/" else ""))

    def read(self, rel: str, limited_only: bool = False) -> Sample | None:
        """None when gone, or (``limited_only``) when the cgroup has no quota: one read then."""
        base = self.root + (rel if rel != "/" else "")
        read_small = self.files.read
        max_text = self.files.read_settled(base, "cpu.max")
        if max_text is None:  # gone, or the root (no cpu.max)
            return None
        quota_text, _, period_text = max_text.strip().partition(" ")
        if limited_only and quota_text == "max":
            return None
        stat_text = read_small(base, "cpu.stat")
        if stat_text is None:
            return None
        stat = parse_stat(stat_text)
        period = int(period_text or 100000)
        limit = None if quota_text == "max" else int(quota_text) / period
        burst_text = self.files.read_settled(base, "cpu.max.burst")
        burst = None if burst_text is None else int(burst_text) / period
        counters = [
            stat.get("nr_periods", 0),
            stat.get("nr_throttled", 0),
            stat.get("throttled_usec", 0) * 1000,
            stat.get("usage_usec", 0) * 1000,
            stat.get("nr_bursts", 0),
            stat.get("burst_usec", 0) * 1000,
        ]
        return Sample(counters, self.files.ident(base, "cpu.stat"), "nr_bursts" in stat, limit, burst)


class CgroupV1Reader:
    """cgroup v1 ``cpu`` files of one cgroup, with usage from ``cpuacct`` at the same path."""

    def __init__(self, cpu_root: Path, cpuacct_root: Path | None) -> None:
        self.root = str(cpu_root)
        self.cpuacct = str(cpuacct_root) if cpuacct_root is not None else None
        self.files = KeptFiles()

    def forget(self, rel: str) -> None:
        suffix = rel if rel != "/" else ""
        self.files.forget(self.root + suffix)
        if self.cpuacct:
            self.files.forget(self.cpuacct + suffix)

    def read(self, rel: str, limited_only: bool = False) -> Sample | None:
        """None when gone, or (``limited_only``) when the cgroup has no quota: one read then."""
        suffix = rel if rel != "/" else ""
        base = self.root + suffix
        read_small = self.files.read
        quota_text = self.files.read_settled(base, "cpu.cfs_quota_us")
        if quota_text is None:  # gone (or not a cpu cgroup)
            return None
        quota = int(quota_text)
        if limited_only and quota < 0:
            return None
        stat_text = read_small(base, "cpu.stat")
        if stat_text is None:
            return None
        stat = parse_stat(stat_text)
        period = int(self.files.read_settled(base, "cpu.cfs_period_us") or 100000)
        burst_text = self.files.read_settled(base, "cpu.cfs_burst_us")
        usage_text = read_small(self.cpuacct + suffix, "cpuacct.usage") if self.cpuacct else None
        counters = [
            stat.get("nr_periods", 0),
            stat.get("nr_throttled", 0),
            stat.get("throttled_time", 0),
            int(usage_text) if usage_text else 0,
            stat.get("nr_bursts", 0),
            stat.get("burst_time", 0),
        ]
        return Sample(
            counters,
            self.files.ident(base, "cpu.stat"),
            "nr_bursts" in stat,
            None if quota < 0 else quota / period,
            None if burst_text is None else int(burst_text) / period,
        )


def cpu_hierarchy(paths: HostPaths) -> tuple[str, Path, Path | None] | None:
    """Where CFS bandwidth lives: ("unified", v2 root, None) when the cpu controller is on v2,
    else ("cpu", v1 cpu root, v1 cpuacct root); None when there is neither."""
    v2 = paths.cgroup_v2()
    if v2 is not None:
        controllers = read_small(str(v2 / "cgroup.controllers")) or ""
        if "cpu" in controllers.split():
            return "unified", v2, None
    cpu = paths.cgroup_v1("cpu")
    if cpu is not None:
        return "cpu", cpu, paths.cgroup_v1("cpuacct")
    return None


class ThrottlingCollector:
    """See module docstring."""

    def __init__(
        self,
        paths: HostPaths,
        workloads: Workloads,
        grace_s: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
        hierarchies: CgroupHierarchies | None = None,
    ) -> None:
        """``hierarchies``: the agent's shared indexes (one per hierarchy root); without them the
        collector keeps its own."""
        found = cpu_hierarchy(paths)
        if found is None:
            raise FileNotFoundError(f"no cgroup cpu controller under {paths.cgroup}")
        self.hierarchy, root, cpuacct = found
        self.reader = CgroupV2Reader(root) if self.hierarchy == "unified" else CgroupV1Reader(root, cpuacct)
        raise_open_file_limit()
        self.workloads = workloads
        self.series = WorkloadSeries(WIDTH, grace_s, clock)
        self._last: dict[Key, Sample] = {}  # newest read of each cgroup (its final values when it goes)
        self._kind: dict[str, bool | None] = {}  # path -> is_pod, None = skipped (parsed once per path)
        self._lock = threading.Lock()
        self._own = hierarchies is None
        self.hierarchies = CgroupHierarchies() if hierarchies is None else hierarchies
        self.cgroups = self.hierarchies.get(root)
        self.changes = self.cgroups.subscribe()  # last: a constructor that failed leaves no log behind
        log.info(
            "throttling: reading the %s hierarchy at %s (%d cgroups)", self.hierarchy, root, len(self.cgroups.paths)
        )

    # --- which cgroups ----------------------------------------------------------------------
    def _classify(self, path: str) -> bool | None:
        kind = self._kind.get(path, False)
        if kind is False and path not in self._kind:
            ident = parse_cgroup_path(path)
            # CRI-O's monitor cgroup is pod level again: it would count the pod twice.
            skip = path == "/" or (ident.is_pod and path.rsplit("/", 1)[-1].startswith("crio-conmon-"))
            kind = self._kind[path] = None if skip else ident.is_pod
        return kind

    def _candidates(self) -> list[tuple[str, bool]]:
        """(path, is_pod) of every cgroup worth reading; the root and conmon cgroups skipped."""
        out = []
        for path in self.cgroups.paths:
            kind = self._classify(path)
            if kind is not None:
                out.append((path, kind))
        return out

    def _read_all(self) -> dict[Key, tuple[Sample, tuple[str, ...]]]:
        """(path, ident) -> (sample, labels) of the cgroups exported now (reads the kernel)."""
        picked: dict[Key, tuple[Sample, tuple[str, ...]]] = {}
        host_owner: dict[tuple[str, ...], Key] = {}  # host label set -> shallowest cgroup with a quota
        for path, is_pod in self._candidates():
            sample = self.reader.read(path, limited_only=not is_pod)
            if sample is None:
                continue
            key = (path, sample.ident)
            labels = self.workloads.labels_for_path(path)
            if not is_pod:
                owner = host_owner.get(labels)
                if owner is not None and owner[0].count("/") <= path.count("/"):
                    continue
                if owner is not None:
                    picked.pop(owner, None)
                host_owner[labels] = key
            picked[key] = (sample, labels)
        return picked

    def _retire(self, key: Key) -> None:
        self.series.retire(key, self._last.pop(key).counters)  # type: ignore[arg-type]

    # --- timer ------------------------------------------------------------------------------
    def maintain(self) -> None:
        """Retire cgroups that are gone (their last read values stay in their label sets),
        register new ones and follow label changes, drop expired label sets. A cgroup is its path
        and its identity: one made again at the same path is a new member of the label set, and
        the old one's final counts stay in it."""
        with self._lock:
            taken = self.changes.take()
            live = self.cgroups.paths
            removed = taken.removed
            if taken.overflowed:  # too many changes to list: what is kept of a path not there is gone;
                # one made again at its path is told apart by its files' inodes (KeptFiles.ident)
                removed = {path for path in set(self._kind) | {p for p, _i in self._last} if path not in live}
            for path in removed:
                self.reader.forget(path)
                self._kind.pop(path, None)
            current = self._read_all()
            now_at = {path: ident for path, ident in current}
            for key in list(self._last):
                path, ident = key
                if key in current:
                    continue
                if path not in live or path in removed or now_at.get(path, ident) != ident:
                    self._retire(key)  # gone, or replaced by a new cgroup at its path
            for key, (sample, labels) in current.items():
                self._last[key] = sample
                self.series.observe(key, sample.counters, Lookup(labels))  # type: ignore[arg-type]
            self.series.expire()

    # --- scrape -----------------------------------------------------------------------------
    def collect(self) -> Iterable[Metric]:
        with self._lock:
            current = self._read_all()
            for key, (sample, _labels) in current.items():
                self._last[key] = sample  # a cache of kernel state: final values if it goes
            # A cgroup removed (or replaced at its path) since the last tick keeps its last values
            # until the timer retires it into its label set.
            values = {k: s.counters for k, (s, _l) in current.items()}
            labels_of = {k: lbl for k, (_s, lbl) in current.items()}
            for key, sample in self._last.items():
                if key not in values:
                    values[key] = sample.counters
            totals = self.series.totals(values, lambda k: Lookup(labels_of.get(k)))  # type: ignore[arg-type]
        names = WORKLOAD_LABELS
        counters = [
            (PERIODS, 1, "nodetune_cpu_cfs_periods", "CFS bandwidth periods that elapsed with the cgroup runnable."),
            (THROTTLED, 1, "nodetune_cpu_cfs_throttled_periods", "CFS periods in which the cgroup used up its quota."),
            (
                THROTTLED_NS,
                1e9,
                "nodetune_cpu_cfs_throttled_seconds",
                "Time the cgroup's run queues were throttled (summed over CPUs).",
            ),
            (USAGE_NS, 1e9, "nodetune_cpu_usage_seconds", "CPU time the cgroup used."),
        ]
        has_burst = any(s.has_burst for s, _l in current.values())
        if has_burst:
            counters += [
                (BURSTS, 1, "nodetune_cpu_cfs_bursts", "CFS periods in which the cgroup used its burst (5.14+)."),
                (
                    BURST_NS,
                    1e9,
                    "nodetune_cpu_cfs_burst_seconds",
                    "CPU time the cgroup used beyond its quota (5.14+).",
                ),
            ]
        out: list[Metric] = []
        ordered = sorted(totals.items())
        for index, scale, name, doc in counters:
            family = CompactScalar(name, doc, "counter", names)
            # rows built in bulk: label tuples from the series accounting have the right width
            if scale == 1:
                family.rows = [(labels, v[index]) for labels, v in ordered]
            else:
                family.rows = [(labels, v[index] / scale) for labels, v in ordered]
            out.append(family)
        limit = CompactScalar("nodetune_cpu_limit_cores", "CFS quota / period: the CPU limit in cores.", "gauge", names)
        burst = CompactScalar("nodetune_cpu_cfs_burst_cores", "CFS burst / period, in cores (5.14+).", "gauge", names)
        gauges: dict[tuple[str, ...], Sample] = {}
        for _path, (sample, labels) in sorted(current.items()):
            gauges.setdefault(labels, sample)  # one live cgroup per label set (a restart: old one is gone)
        for labels, sample in sorted(gauges.items()):
            if sample.limit_cores is not None:
                limit.add(labels, sample.limit_cores)
            if sample.burst_cores is not None:
                burst.add(labels, sample.burst_cores)
        out.append(limit)
        if has_burst:
            out.append(burst)
        return out

    def close(self) -> None:
        self.changes.close()
        if self._own:
            self.hierarchies.close()
        self.reader.files.close()

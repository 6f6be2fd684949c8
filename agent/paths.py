"""Where the host's kernel interfaces are: procfs, sysfs and the cgroup hierarchies.

Everything the agent reads from the host goes through ``HostPaths`` so that tests can point it at
fixture trees and the DaemonSet can run with the host mounted under ``--host-root``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class HostPaths:
    """Roots of the host's pseudo-filesystems, all derived from one host root by default."""

    root: Path = Path("/")

    @property
    def proc(self) -> Path:
        return self.root / "proc"

    @property
    def sys(self) -> Path:
        return self.root / "sys"

    @property
    def cgroup(self) -> Path:
        return self.sys / "fs" / "cgroup"

    def cgroup_v2(self) -> Path | None:
        """The cgroup v2 hierarchy: the cgroup root itself (unified) or ``unified/`` (hybrid)."""
        for candidate in (self.cgroup, self.cgroup / "unified"):
            if (candidate / "cgroup.controllers").is_file():
                return candidate
        return None

    def cgroup_v1(self, controller: str) -> Path | None:
        """A cgroup v1 controller's hierarchy (``cpu`` may be mounted as ``cpu,cpuacct``)."""
        if self.cgroup_v2() == self.cgroup:
            return None
        for candidate in sorted(self.cgroup.glob("*")):
            if controller in candidate.name.split(",") and candidate.is_dir():
                return candidate
        return None

    def workload_hierarchy(self, choice: str = "auto") -> tuple[str, Path | None]:
        """The hierarchy whose cgroups the probes charge: ("unified" | "cpu", its root).

        ``auto``: the v1 ``cpu`` tree when it holds a kubepods tree and the v2 one does not (the
        kubelet's cgroupfs driver on a hybrid host, or a v1-only host); otherwise v2 (or the v1
        ``cpu`` tree if there is no v2 at all).
        """
        unified, cpu = self.cgroup_v2(), self.cgroup_v1("cpu")
        if choice == "unified":
            return "unified", unified
        if choice == "cpu":
            return "cpu", cpu
        if cpu is not None and (unified is None or (has_kubepods(cpu) and not has_kubepods(unified))):
            return "cpu", cpu
        return "unified", unified


def has_kubepods(root: Path, depth: int = 3) -> bool:
    """Whether a kubelet pod tree (``kubepods``, ``kubepods.slice``, kind's nested one) is within ``depth`` levels."""
    level = [root]
    for _ in range(depth):
        nxt: list[Path] = []
        for directory in level:
            try:
                for entry in directory.iterdir():
                    if entry.name.startswith(("kubepods", "kubelet-kubepods")) and entry.is_dir():
                        return True
                    if entry.is_dir() and not entry.is_symlink():
                        nxt.append(entry)
            except OSError:
                continue
        level = nxt
    return False

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

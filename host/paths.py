"""Where the host's files are: procfs, sysfs, the cgroup hierarchies, BTF, sysctl.d and nodetune's
own state directory (the tuning journal and its lock).

``HostPaths`` is the one type saying so: probes (through ``KernelFacts``), collectors, identity
and every tuning item take one, so that tests can point them at fixture trees and the DaemonSet
can run with the host mounted under ``--host-root`` (README, "Deploy": ``/host``).
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class HostPaths:
    """The host's files, all derived from one host root (``--host-root``), but nodetune's state
    directory, which ``--state-dir`` (``nodetune tune``) may put elsewhere."""

    root: Path = Path("/")
    state_dir: Path | None = None
    """nodetune's state on the host (the tuning journal and its lock); None: <root>/var/lib/nodetune."""

    @property
    def proc(self) -> Path:
        return self.root / "proc"

    @property
    def sys(self) -> Path:
        return self.root / "sys"

    @property
    def cgroup(self) -> Path:
        return self.sys / "fs" / "cgroup"

    @property
    def proc_sys(self) -> Path:
        """sysctl(8)'s kernel parameters."""
        return self.proc / "sys"

    @property
    def cmdline(self) -> Path:
        """The kernel's boot parameters."""
        return self.proc / "cmdline"

    @property
    def thp(self) -> Path:
        """Transparent hugepages' ``enabled`` and ``defrag``."""
        return self.sys / "kernel" / "mm" / "transparent_hugepage"

    @property
    def btf_vmlinux(self) -> Path:
        """The running kernel's BTF (CONFIG_DEBUG_INFO_BTF)."""
        return self.sys / "kernel" / "btf" / "vmlinux"

    @property
    def journal_dir(self) -> Path:
        """Where the tuning journal and the host's tuning lock live."""
        return self.state_dir or self.root / "var" / "lib" / "nodetune"

    def boot_id(self) -> str:
        """This boot's id (random per boot); "" when unreadable."""
        try:
            return (self.proc_sys / "kernel" / "random" / "boot_id").read_text().strip()
        except OSError:
            return ""

    def sysctl_conf(self) -> list[Path]:
        """The sysctl.d(5) files, in the order systemd-sysctl reads them: every ``*.conf`` of the
        four directories by name (the first directory's file of a name wins), then
        ``/etc/sysctl.conf`` if present."""
        dirs = [self.root / d for d in ("etc/sysctl.d", "run/sysctl.d", "usr/local/lib/sysctl.d", "usr/lib/sysctl.d")]
        files: dict[str, Path] = {}
        for d in dirs:
            try:
                for f in sorted(d.glob("*.conf")):
                    files.setdefault(f.name, f)
            except OSError:
                continue
        out = [files[name] for name in sorted(files)]
        conf = self.root / "etc" / "sysctl.conf"
        return [*out, conf] if conf.is_file() else out

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


def read_small(path: str) -> str | None:
    """A pseudo-file's text (one read, no Python file object); None when it is not there (ENOENT,
    ENODEV: a cgroup removed meanwhile, ENOTDIR). Any other error is raised."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        if e.errno in (errno.ENOENT, errno.ENODEV, errno.ENOTDIR):
            return None
        raise
    try:
        return os.read(fd, 4096).decode()
    finally:
        os.close(fd)

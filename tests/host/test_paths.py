"""HostPaths: every host file under one root (--host-root), the state directory apart, and what it
reads there (the boot id, the sysctl.d files in systemd-sysctl's order), on fixture trees and on
this machine's own /proc."""

from __future__ import annotations

import re
from pathlib import Path

from host.paths import HostPaths


def test_every_host_path_is_under_the_host_root(tmp_path: Path) -> None:
    host = HostPaths(tmp_path)
    assert host.proc == tmp_path / "proc"
    assert host.sys == tmp_path / "sys"
    assert host.cgroup == tmp_path / "sys/fs/cgroup"
    assert host.proc_sys == tmp_path / "proc/sys"
    assert host.cmdline == tmp_path / "proc/cmdline"
    assert host.thp == tmp_path / "sys/kernel/mm/transparent_hugepage"
    assert host.btf_vmlinux == tmp_path / "sys/kernel/btf/vmlinux"
    assert host.journal_dir == tmp_path / "var/lib/nodetune"


def test_the_state_dir_moves_the_journal_and_nothing_else(tmp_path: Path) -> None:
    host = HostPaths(tmp_path / "host", state_dir=tmp_path / "state")
    assert host.journal_dir == tmp_path / "state"
    assert host.proc_sys == tmp_path / "host/proc/sys"


def test_boot_id_is_the_hosts_and_empty_when_unreadable(tmp_path: Path) -> None:
    assert HostPaths(tmp_path).boot_id() == ""
    boot_id = tmp_path / "proc/sys/kernel/random/boot_id"
    boot_id.parent.mkdir(parents=True)
    boot_id.write_text("11111111-2222-3333-4444-555555555555\n")
    assert HostPaths(tmp_path).boot_id() == "11111111-2222-3333-4444-555555555555"
    own = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    assert HostPaths().boot_id() == own and re.fullmatch(r"[0-9a-f-]{36}", own)


def test_sysctl_conf_lists_files_as_systemd_sysctl_reads_them(tmp_path: Path) -> None:
    def conf(rel: str) -> Path:
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("vm.swappiness = 1\n")
        return path

    shadowing = conf("etc/sysctl.d/50-coredump.conf")  # /etc's file of a name wins over /usr/lib's
    conf("usr/lib/sysctl.d/50-coredump.conf")
    vendor = conf("usr/lib/sysctl.d/10-vendor.conf")
    runtime = conf("run/sysctl.d/99-runtime.conf")
    local = conf("usr/local/lib/sysctl.d/60-local.conf")
    conf("etc/sysctl.d/README")  # not a .conf: ignored
    host = HostPaths(tmp_path)
    assert host.sysctl_conf() == [vendor, shadowing, local, runtime]  # by file name, whichever directory
    legacy = conf("etc/sysctl.conf")
    assert host.sysctl_conf() == [vendor, shadowing, local, runtime, legacy]  # /etc/sysctl.conf last

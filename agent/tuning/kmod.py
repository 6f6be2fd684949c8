"""kmod item: kernel modules loaded (the ipvs set for kube-proxy's ipvs mode, conntrack).

A module counts as loaded when the kernel lists it (``/proc/modules``), when it is built in
(``/lib/modules/<release>/modules.builtin``), or when ``/sys/module/<name>`` exists (built-ins
with parameters). Loading runs ``modprobe`` (dependencies, blacklists and options of the host's
modprobe.d apply) with ``-d <host-root>`` so the host's module tree is used, only when a module is
missing. Reverting unloads only what was absent before and only when nothing uses it
(``/sys/module/<name>/refcnt`` is 0); a module in use is left loaded, with a note.

Names come from an allowlist, never a path. The development kernel has no loadable modules
(``CONFIG_MODULES`` off): this item is tested on fixture trees there.

kube-proxy's mode is reported when it can be told: its ``kube-ipvs0`` dummy interface exists in
ipvs mode only. The ipvs mode is deprecated since Kubernetes 1.35 in favour of nftables.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable

from agent.tuning.base import TuningError, TuningHost, TuningItem

ALLOWED = ("ip_vs", "ip_vs_rr", "ip_vs_wrr", "ip_vs_sh", "ip_vs_lc", "ip_vs_wlc", "nf_conntrack", "br_netfilter")
LOADED, ABSENT = "loaded", "absent"
Runner = Callable[[list[str]], subprocess.CompletedProcess]


def _run(argv: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=120)


class KmodItem(TuningItem):
    name = "kmod"

    def __init__(self, host: TuningHost, modules: list[str], run: Runner = _run) -> None:
        super().__init__(host)
        self.modules = list(modules)
        self.run = run

    def managed_keys(self) -> list[str]:
        return list(self.modules)

    def _release(self) -> str:
        try:
            return (self.host.root / "proc/sys/kernel/osrelease").read_text().strip()
        except OSError:
            return os.uname().release

    def _builtin(self) -> set[str]:
        path = self.host.root / "lib/modules" / self._release() / "modules.builtin"
        try:
            return {line.rsplit("/", 1)[-1].removesuffix(".ko") for line in path.read_text().split()}
        except OSError:
            return set()

    def _listed(self) -> set[str]:
        try:
            return {line.split()[0] for line in (self.host.root / "proc/modules").read_text().splitlines() if line}
        except OSError:
            return set()

    def read(self, key: str) -> str:
        if key in self._listed() or key in self._builtin() or (self.host.root / "sys/module" / key).is_dir():
            return LOADED
        return ABSENT

    def wanted(self, key: str, current: str) -> str:
        return LOADED

    def in_use(self, key: str) -> bool:
        try:
            return int((self.host.root / "sys/module" / key / "refcnt").read_text()) > 0
        except (OSError, ValueError):
            return False

    def write(self, key: str, value: str) -> None:
        if key not in ALLOWED:
            raise TuningError(f"kmod {key}: not in the allowlist")
        if value == LOADED:
            argv = ["modprobe", "-d", str(self.host.root), key]
        else:
            if self.in_use(key) or key in self._builtin():
                return  # never unload a module in use (or a built-in): stays loaded
            argv = ["modprobe", "-d", str(self.host.root), "-r", key]
        res = self.run(argv)
        if res.returncode != 0:
            raise TuningError(f"kmod {key}: {' '.join(argv)} failed: {(res.stderr or '').strip()}")

    def same(self, key: str, current: str, value: str) -> bool:
        if value == ABSENT and current == LOADED and self.in_use(key):
            return True  # a revert leaves a module in use loaded
        return current == value

    def notes(self) -> list[str]:
        ipvs = (self.host.root / "sys/class/net/kube-ipvs0").exists()
        mode = "ipvs" if ipvs else "not ipvs (iptables or nftables)"
        out = [f"kmod: kube-proxy mode here: {mode}"]
        if any(m.startswith("ip_vs") for m in self.modules):
            out.append("kmod: kube-proxy's ipvs mode is deprecated since Kubernetes 1.35 (use nftables)")
        out.extend(f"kmod: {m} is in use and stays loaded" for m in self.modules if self.in_use(m))
        return out

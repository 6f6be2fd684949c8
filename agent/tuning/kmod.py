"""kmod item: kernel modules loaded (the ipvs set for kube-proxy's ipvs mode, conntrack).

A module counts as loaded when the kernel lists it (``/proc/modules``), when it is built in
(``/lib/modules/<release>/modules.builtin``), or when ``/sys/module/<name>`` exists (built-ins
with parameters). Loading runs ``modprobe`` (dependencies, blacklists and options of the host's
modprobe.d apply) with ``-d <host-root>`` so the host's module tree is used, only when a module is
missing.

Reverting unloads a module that was absent before, with ``rmmod`` (one module: ``modprobe -r``
would also remove its unused dependencies, some of which may have been loaded before nodetune),
and only when nothing uses it (``/sys/module/<name>/refcnt`` 0). A module that other modules
hold (``/sys/module/<name>/holders/``; each holder adds to the refcnt) goes only if every holder
is an allowlisted module that can go too: it was absent when nodetune loaded it, so its holders
were loaded since - by nodetune (their own entries unload them too, in whatever order the
journal is replayed) or, unused, by someone else (ipvs loads a scheduler module again on demand:
``request_module("ip_vs_%s")`` in net/netfilter/ipvs/ip_vs_sched.c). Any other holder, a refcnt
left once the holders are gone (an IPVS service holds its scheduler), or a built-in keeps the
module loaded, with a note. Dependencies modprobe loaded on the way (``libcrc32c``,
``nf_defrag_ipv4``...) stay loaded.

Names come from an allowlist, never a path. The development kernel has no loadable modules
(``CONFIG_MODULES`` off): the item runs for real in the stock-kernel guest
(tests/agent/tuning/test_kmod.py), and on fixture trees here.

kube-proxy's mode is reported from what the host shows without a subprocess: its ``kube-ipvs0``
dummy interface exists in ipvs mode only, and ``/proc/net/ip_vs`` lists the IPVS virtual services
(both of the network namespace the host's /proc and /sys were mounted from: the DaemonSet's is
the host's). The ipvs mode is deprecated since Kubernetes 1.35 in favour of nftables.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable

from agent.tuning.base import TuningError, TuningItem
from host.paths import HostPaths

ALLOWED = ("ip_vs", "ip_vs_rr", "ip_vs_wrr", "ip_vs_sh", "ip_vs_lc", "ip_vs_wlc", "nf_conntrack", "br_netfilter")
LOADED, ABSENT = "loaded", "absent"
Runner = Callable[[list[str]], subprocess.CompletedProcess]


def _run(argv: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=120)


class KmodItem(TuningItem):
    name = "kmod"

    def __init__(self, host: HostPaths, modules: list[str], run: Runner = _run) -> None:
        super().__init__(host)
        self.modules = list(modules)
        self.run = run

    def managed_keys(self) -> list[str]:
        return list(self.modules)

    def _release(self) -> str:
        try:
            return (self.host.proc_sys / "kernel/osrelease").read_text().strip()
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
            return {line.split()[0] for line in (self.host.proc / "modules").read_text().splitlines() if line}
        except OSError:
            return set()

    def journal_value_ok(self, key: str, value: str) -> bool:
        return value in (LOADED, ABSENT)

    def read(self, key: str) -> str:
        if key in self._listed() or key in self._builtin() or (self.host.sys / "module" / key).is_dir():
            return LOADED
        return ABSENT

    def wanted(self, key: str, current: str) -> str:
        return LOADED

    def _refcnt(self, name: str) -> int:
        try:
            return int((self.host.sys / "module" / name / "refcnt").read_text())
        except (OSError, ValueError):
            return 0

    def _holders(self, name: str) -> list[str]:
        try:
            return sorted(os.listdir(self.host.sys / "module" / name / "holders"))
        except OSError:
            return []

    def in_use(self, key: str) -> bool:
        """Something that nodetune may not unload uses the module (see the module's docstring)."""
        holders = self._holders(key)
        if not holders:
            return self._refcnt(key) > 0
        return any(h not in ALLOWED or self.in_use(h) for h in holders)

    def _unload(self, name: str) -> None:
        """rmmod ``name`` after its holders (all allowlisted and unused: checked by in_use)."""
        for holder in self._holders(name):
            self._unload(holder)
        if self.read(name) == ABSENT or self._refcnt(name) > 0:
            return  # gone already, or still used once its holders went: stays loaded
        argv = ["rmmod", name]
        res = self.run(argv)
        if res.returncode != 0:
            raise TuningError(f"kmod {name}: {' '.join(argv)} failed: {(res.stderr or '').strip()}")

    def write(self, key: str, value: str) -> None:
        if key not in ALLOWED:
            raise TuningError(f"kmod {key}: not in the allowlist")
        if value != LOADED:
            if not self.in_use(key) and key not in self._builtin():
                self._unload(key)
            return  # a module in use (or a built-in) stays loaded
        argv = ["modprobe", "-d", str(self.host.root), key]
        res = self.run(argv)
        if res.returncode != 0:
            raise TuningError(f"kmod {key}: {' '.join(argv)} failed: {(res.stderr or '').strip()}")

    def same(self, key: str, current: str, value: str) -> bool:
        if value == ABSENT and current == LOADED and (self.in_use(key) or key in self._builtin()):
            return True  # a revert leaves a module in use (or a built-in) loaded
        return current == value

    def proxy_mode(self) -> str:
        """kube-proxy's mode as far as the host shows it (no subprocess)."""
        if (self.host.sys / "class/net/kube-ipvs0").exists():
            mode = "ipvs (kube-ipvs0 exists)"
        else:
            mode = "not ipvs (no kube-ipvs0 interface: iptables or nftables)"
        try:
            lines = (self.host.proc / "net/ip_vs").read_text().splitlines()
        except OSError:
            return mode  # ip_vs not loaded
        services = sum(1 for line in lines if line.split(" ", 1)[0] in ("TCP", "UDP", "SCTP", "FWM"))
        return f"{mode}; {services} IPVS virtual service(s) in the kernel"

    def notes(self) -> list[str]:
        out = [f"kmod: kube-proxy mode here: {self.proxy_mode()}"]
        if any(m.startswith("ip_vs") for m in self.modules):
            out.append("kmod: kube-proxy's ipvs mode is deprecated since Kubernetes 1.35 (use nftables)")
        out.extend(f"kmod: {m} is in use and stays loaded" for m in self.modules if self.in_use(m))
        return out

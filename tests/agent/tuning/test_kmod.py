"""The kmod item for real: Debian's stock 6.1 kernel loads and unloads the ipvs modules.

This machine's kernel has no loadable modules (``CONFIG_MODULES`` off), so these tests are marked
``modules``: deselected here, they run inside the stock-kernel guest (tests/kernel_vm.py, whose
``/lib/modules/<release>`` is the guest kernel package's) from tests/test_kernel_vm.py. The
guest sees this machine's file system, so ``ipvsadm`` comes from here (scripts/bootstrap.sh test
installs it). Each test starts with none of the five modules loaded and unloads what it loaded.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from agent.tuning.engine import Engine
from agent.tuning.kmod import KmodItem
from host.paths import HostPaths

pytestmark = [pytest.mark.modules, pytest.mark.root]

IPVS = ["ip_vs", "ip_vs_rr", "ip_vs_wrr", "ip_vs_sh", "nf_conntrack"]
UNLOAD_ORDER = ["ip_vs_rr", "ip_vs_wrr", "ip_vs_sh", "ip_vs", "nf_conntrack"]  # holders first
SERVICE = "127.0.0.1:8080"


def listed() -> set[str]:
    return {line.split()[0] for line in Path("/proc/modules").read_text().splitlines() if line}


def run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=60)


@pytest.fixture
def guest_host(tmp_path: Path):
    release = os.uname().release
    assert Path(f"/lib/modules/{release}/modules.dep").is_file(), f"no modules for {release} in this kernel's tree"
    before = listed() & set(IPVS)
    assert not before, f"not a fresh kernel: {sorted(before)} loaded before the test"
    try:
        yield HostPaths(Path("/"), tmp_path / "state")
    finally:
        if "ip_vs" in listed():
            run("ipvsadm", "-C")
        run("ip", "link", "del", "kube-ipvs0")
        for name in UNLOAD_ORDER:
            if name in listed():
                run("rmmod", name)


def test_ipvs_modules_are_loaded_verified_and_all_unloaded_again(guest_host: HostPaths) -> None:
    item = KmodItem(guest_host, IPVS)
    e = Engine(guest_host, [item], "ipvs")
    assert [c.key for c in e.plan()] == IPVS
    assert [c.key for c in e.apply()] == IPVS
    assert set(IPVS) <= listed()
    assert e.verify() == {("kmod", m): True for m in IPVS}
    mode = "not ipvs (no kube-ipvs0 interface: iptables or nftables); 0 IPVS virtual service(s) in the kernel"
    assert f"kmod: kube-proxy mode here: {mode}" in item.notes()
    assert not [n for n in item.notes() if "in use" in n]  # ip_vs held only by its own schedulers
    # As `nodetune tune revert` without a profile: the journal alone says what to unload. ip_vs
    # comes before its schedulers in the journal: they go with it (holders first), then conntrack.
    # Every journaled module is back to its original (absent), whether it went on its own turn or
    # with ip_vs before it: the revert's report names all five.
    restored = Engine(guest_host, [], "").revert()
    assert not listed() & set(IPVS)
    assert sorted(c.key for c in restored) == sorted(IPVS)


def test_a_module_loaded_before_stays_loaded_after_revert(guest_host: HostPaths) -> None:
    assert run("modprobe", "nf_conntrack").returncode == 0  # someone else's, before nodetune
    e = Engine(guest_host, [KmodItem(guest_host, IPVS)], "ipvs")
    assert [c.key for c in e.apply()] == ["ip_vs", "ip_vs_rr", "ip_vs_wrr", "ip_vs_sh"]
    Engine(guest_host, [], "").revert()
    assert listed() & set(IPVS) == {"nf_conntrack"}


def test_an_ipvs_service_keeps_its_scheduler_and_ip_vs_loaded(guest_host: HostPaths) -> None:
    item = KmodItem(guest_host, IPVS)
    Engine(guest_host, [item], "ipvs").apply()
    added = run("ipvsadm", "-A", "-t", SERVICE, "-s", "rr")
    assert added.returncode == 0, added.stderr
    assert run("ip", "link", "add", "kube-ipvs0", "type", "dummy").returncode == 0  # as kube-proxy in ipvs mode
    notes = item.notes()
    assert "kmod: kube-proxy mode here: ipvs (kube-ipvs0 exists); 1 IPVS virtual service(s) in the kernel" in notes
    assert [n for n in notes if "in use" in n] == [
        "kmod: ip_vs is in use and stays loaded",  # by ip_vs_rr, which the service holds
        "kmod: ip_vs_rr is in use and stays loaded",
        "kmod: nf_conntrack is in use and stays loaded",  # by ip_vs
    ]
    Engine(guest_host, [], "").revert()
    assert listed() & set(IPVS) == {"ip_vs", "ip_vs_rr", "nf_conntrack"}  # wrr and sh were unused: gone
    assert SERVICE in run("ipvsadm", "-L", "-n").stdout  # the service is untouched

"""irq_affinity, irqbalance and kmod on fixture trees (this kernel has no loadable modules: kmod is
tested here with modprobe played by the fixture, and for real in tests/agent/tuning/test_kmod.py), and a real IRQ
on the machine (real irqbalance processes: tests/agent/tuning/test_irqbalance.py)."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from agent.tuning.engine import Engine
from agent.tuning.irq_affinity import IrqAffinityItem, nic_irqs
from agent.tuning.irqbalance import IrqbalanceItem, irqbalance_pids
from agent.tuning.kmod import KmodItem
from agent.tuning.profile import parse
from agent.tuning.validate import build
from host.paths import HostPaths
from tests.agent.tuning.hosttree import make_host, value


def engine(host: Path, text: str) -> Engine:
    (profile,) = parse(text)
    items, _ = build(profile, HostPaths(host))
    return Engine(HostPaths(host), items, profile.name)


def test_nic_irqs_come_from_the_pci_function_in_sysfs(tmp_path: Path) -> None:
    host = make_host(tmp_path / "host")
    assert nic_irqs(HostPaths(host), "eth0") == [37, 38, 39]
    assert nic_irqs(HostPaths(host), "nope0") == []


def test_pin_and_spread_avoiding_the_cpu_managers_exclusive_cpus(tmp_path: Path) -> None:
    host = make_host(tmp_path / "host", sys__devices__system__cpu__online="0-3\n")
    state = {"policyName": "static", "entries": {"pod-uid": {"redis": "2"}}}
    (host / "var/lib/kubelet").mkdir(parents=True)
    (host / "var/lib/kubelet/cpu_manager_state").write_text(json.dumps(state))
    e = engine(host, "name: p\nirqbalance: {enabled: false}\nirq_affinity: {interfaces: [eth0], cpus: '1-3'}")
    assert [c.new for c in e.apply() if c.item == "irq_affinity"] == ["1,3", "1,3", "1,3"]  # CPU 2 is the pod's
    assert value(host, "proc/irq/38/smp_affinity_list") == "1,3"
    e = engine(
        host, "name: p\nirq_affinity: {interfaces: [eth0], cpus: '0-3', mode: spread, avoid_exclusive_cpus: false}"
    )
    e.apply()
    assert [value(host, f"proc/irq/{n}/smp_affinity_list") for n in (37, 38, 39)] == ["0", "1", "2"]
    e.revert()
    assert value(host, "proc/irq/38/smp_affinity_list") == "0-1"  # the original, from the journal


def test_nothing_is_pinned_while_irqbalance_runs(tmp_path: Path) -> None:
    host = make_host(tmp_path / "host")
    fake = host / "proc/999999"  # an irqbalance in the fixture's /proc: read, never signalled here
    fake.mkdir(parents=True)
    (fake / "comm").write_text("irqbalance\n")
    (fake / "cmdline").write_bytes(b"/usr/sbin/irqbalance\0--foreground\0")
    item = IrqAffinityItem(
        HostPaths(host), parse("name: p\nirq_affinity: {interfaces: [eth0], cpus: '0'}")[0].irq_affinity
    )
    assert item.plan() == []
    assert "irqbalance is running" in item.notes()[0]
    # The name alone does not make it the host's irqbalance (tests/agent/tuning/test_irqbalance.py).
    assert IrqbalanceItem(HostPaths(host), False).read("service") == "stopped"


def test_kmod_loads_what_is_missing_and_never_unloads_a_module_in_use(tmp_path: Path) -> None:
    host = make_host(tmp_path / "host")
    calls: list[list[str]] = []

    def modprobe(argv: list[str]) -> subprocess.CompletedProcess:
        calls.append(argv)
        name = argv[-1]
        if argv[0] == "rmmod":
            shutil.rmtree(host / "sys/module" / name)
        else:
            (host / "sys/module" / name).mkdir(parents=True)
            (host / "sys/module" / name / "refcnt").write_text("1\n" if name == "ip_vs" else "0\n")
        return subprocess.CompletedProcess(argv, 0, "", "")

    host_t = HostPaths(host)
    item = KmodItem(host_t, ["ip_vs", "ip_vs_rr", "nf_conntrack"], run=modprobe)
    assert item.read("nf_conntrack") == "loaded"  # built in (modules.builtin)
    e = Engine(host_t, [item], "kmod")
    assert [c.key for c in e.apply()] == ["ip_vs", "ip_vs_rr"]
    assert calls == [["modprobe", "-d", str(host), "ip_vs"], ["modprobe", "-d", str(host), "ip_vs_rr"]]
    assert any("kube-proxy mode here: not ipvs" in n for n in item.notes())
    assert any("deprecated since Kubernetes 1.35" in n for n in item.notes())
    e.revert()
    assert calls[-1] == ["rmmod", "ip_vs_rr"]  # ip_vs is in use: stays
    assert (host / "sys/module/ip_vs").is_dir() and not (host / "sys/module/ip_vs_rr").exists()


# --- on the machine (root) -----------------------------------------------------------------------


@pytest.mark.root
def test_a_real_irqs_affinity_changed_and_restored(tmp_path: Path) -> None:
    host = HostPaths(state_dir=tmp_path)
    interfaces = [i for i in os.listdir("/sys/class/net") if nic_irqs(host, i)]
    online = value(Path("/"), "sys/devices/system/cpu/online")
    if not interfaces or online == "0":
        pytest.skip("no NIC with MSI vectors, or one CPU")
    if irqbalance_pids(host):
        pytest.skip("irqbalance runs here: it would move the IRQ back")
    irq = nic_irqs(host, interfaces[0])[-1]
    path = Path(f"/proc/irq/{irq}/smp_affinity_list")
    original = path.read_text()
    target = "1" if original.strip() != "1" else "0"
    (profile,) = parse(f"name: irq\nirq_affinity: {{interfaces: [{interfaces[0]}], cpus: '{target}'}}")
    items, _ = build(profile, host)
    try:
        e = Engine(host, items, "irq")
        applied = e.apply()
        assert any(c.key == f"irq{irq}" for c in applied) or any("EIO" in m for m in e.messages)
        if any(c.key == f"irq{irq}" for c in applied):
            assert path.read_text().strip() == target
        e.revert()
        assert path.read_text() == original
    finally:
        path.write_text(original)


def unmovable_irq() -> int | None:
    """A real IRQ whose affinity the kernel refuses to set (found by writing its own value back,
    which changes nothing where it is accepted)."""
    for entry in sorted(Path("/proc/irq").iterdir(), key=lambda p: p.name):
        if not entry.name.isdigit():
            continue
        path = entry / "smp_affinity_list"
        try:
            current = path.read_text()
            path.write_text(current)
        except OSError as e:
            if e.errno in (errno.EIO, errno.EPERM):
                return int(entry.name)
    return None


@pytest.mark.root
def test_an_irq_the_kernel_refuses_is_recorded_and_skipped_not_retried(tmp_path: Path) -> None:
    irq = unmovable_irq()
    if irq is None:
        pytest.skip("every IRQ here can be moved")
    host = make_host(tmp_path / "host")
    (host / "sys/devices/pci0000:00/0000:00:03.0/msi_irqs" / str(irq)).write_text("msix\n")
    shutil.rmtree(host / f"proc/irq/{irq}", ignore_errors=True)
    # the real, unmovable one, bind-mounted (a symlink out of the host root is refused by design)
    (host / f"proc/irq/{irq}").mkdir(parents=True)
    subprocess.run(["mount", "--bind", f"/proc/irq/{irq}", str(host / f"proc/irq/{irq}")], check=True)
    try:
        _unmovable_irq_is_skipped(host, irq)
    finally:
        subprocess.run(["umount", str(host / f"proc/irq/{irq}")], check=True)


def _unmovable_irq_is_skipped(host: Path, irq: int) -> None:
    e = engine(host, "name: p\nirq_affinity: {interfaces: [eth0], cpus: '0'}")
    applied = e.apply()
    assert f"irq{irq}" not in [c.key for c in applied] and len(applied) == 3  # the fixture's 37-39 moved
    assert any(f"irq{irq}" in m and "refuses to move it" in m for m in e.messages)
    item = e.items["irq_affinity"]
    assert f"irq{irq}" in item.unchangeable and f"irq{irq}" not in item.managed_keys()  # not retried
    assert e.plan() == []
    journal = json.loads((host / "var/lib/nodetune/tuning-journal.json").read_text())
    assert f"irq_affinity/irq{irq}" not in journal["entries"]

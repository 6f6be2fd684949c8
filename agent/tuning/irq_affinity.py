"""irq_affinity item: the IRQs of chosen NICs pinned to, or spread over, a CPU list
(``/proc/irq/<n>/smp_affinity_list``).

The IRQs are found from sysfs, never from names: the interface's device
(``/sys/class/net/<if>/device``) and its parents up to the PCI function that owns the vectors
(``msi_irqs/``, one file per MSI/MSI-X vector: a virtio NIC's device is ``virtioN`` under the PCI
function). CPUs the kubelet's static CPU manager gave exclusively to pods
(``/var/lib/kubelet/cpu_manager_state``, ``entries``: pod -> container -> cpu list) are left out by
default, so a pinned IRQ never lands on a Guaranteed pod's dedicated core. An IRQ whose affinity the
kernel refuses to change (EIO: the chip cannot; EPERM: a managed interrupt) is recorded as
unchangeable and left alone, not retried. While irqbalance runs, nothing is pinned (it would move
them back): the item says so and waits for the irqbalance item or the operator.
"""

from __future__ import annotations

import errno
import json
import re
from pathlib import Path

from agent.tuning.base import TuningItem, Unchangeable, inside, read_text, write_text
from agent.tuning.cpulist import CpuListError, format_cpulist, parse_cpulist
from agent.tuning.irqbalance import irqbalance_pids
from agent.tuning.profile import IrqAffinity
from host.paths import HostPaths


def nic_irqs(host: HostPaths, interface: str) -> list[int]:
    """MSI/MSI-X vectors of the device behind ``interface``, from sysfs; [] if none."""
    link = host.sys / "class/net" / interface / "device"
    try:
        device = link.resolve(strict=True)
    except OSError:
        return []
    sys_root = host.sys.resolve()
    for d in (device, *device.parents):
        if d == sys_root or sys_root not in d.parents:
            break
        msi = d / "msi_irqs"
        if msi.is_dir():
            return sorted(int(p.name) for p in msi.iterdir() if p.name.isdigit())
    return []


def exclusive_cpus(host: HostPaths) -> list[int]:
    """CPUs the kubelet's static CPU manager assigned to containers exclusively."""
    try:
        state = json.loads((host.root / "var/lib/kubelet/cpu_manager_state").read_text())
    except (OSError, ValueError):
        return []
    cpus: set[int] = set()
    for containers in (state.get("entries") or {}).values():
        for cpulist in (containers or {}).values():
            try:
                cpus.update(parse_cpulist(str(cpulist)))
            except ValueError:
                continue
    return sorted(cpus)


def online_cpus(host: HostPaths) -> list[int]:
    try:
        return parse_cpulist(read_text(host.sys / "devices/system/cpu/online"))
    except (OSError, ValueError):
        return []


class IrqAffinityItem(TuningItem):
    name = "irq_affinity"

    def __init__(self, host: HostPaths, spec: IrqAffinity | None) -> None:
        super().__init__(host)
        self.spec = spec
        self.unchangeable: set[str] = set()

    def cpus(self) -> list[int]:
        assert self.spec is not None
        wanted = parse_cpulist(self.spec.cpus)
        if self.spec.avoid_exclusive_cpus:
            taken = set(exclusive_cpus(self.host))
            wanted = [c for c in wanted if c not in taken] or wanted
        return wanted

    def irqs(self) -> list[int]:
        assert self.spec is not None
        return sorted({irq for interface in self.spec.interfaces for irq in nic_irqs(self.host, interface)})

    def managed_keys(self) -> list[str]:
        if self.spec is None or irqbalance_pids(self.host):
            return []
        return [f"irq{irq}" for irq in self.irqs() if f"irq{irq}" not in self.unchangeable]

    def _path(self, key: str) -> Path:
        return self.host.proc / "irq" / key.removeprefix("irq") / "smp_affinity_list"

    def read(self, key: str) -> str:
        return format_cpulist(parse_cpulist(read_text(self._path(key))))

    def wanted(self, key: str, current: str) -> str:
        cpus = self.cpus()
        assert self.spec is not None
        if self.spec.mode == "pin":
            return format_cpulist(cpus)
        index = self.irqs().index(int(key.removeprefix("irq")))  # spread: one CPU each, in turn
        return str(cpus[index % len(cpus)])

    def same(self, key: str, current: str, value: str) -> bool:
        return parse_cpulist(current) == parse_cpulist(value)

    def owns(self, key: str) -> bool:
        """The profile's NICs' IRQs, whether or not irqbalance runs now."""
        return self.spec is not None and key in {f"irq{irq}" for irq in self.irqs()}

    def journal_key_ok(self, key: str) -> bool:
        return re.fullmatch(r"irq[0-9]{1,7}", key) is not None and inside(self.host.root, self._path(key))

    def journal_value_ok(self, key: str, value: str) -> bool:
        try:
            return bool(parse_cpulist(value))
        except CpuListError:
            return False

    def write(self, key: str, value: str) -> None:
        try:
            write_text(self._path(key), value, self.host.root)
        except OSError as e:
            # EIO: the chip cannot set it; EPERM: a managed or per-CPU interrupt
            # (kernel/irq/proc.c write_irq_affinity, irq_can_set_affinity_usr): never movable.
            if e.errno in (errno.EIO, errno.EPERM):
                self.unchangeable.add(key)
                reason = errno.errorcode[e.errno]
                raise Unchangeable(
                    f"irq_affinity {key}: the kernel refuses to move it ({reason}); left alone"
                ) from None
            raise

    def notes(self) -> list[str]:
        if self.spec is None:
            return []
        out = []
        if irqbalance_pids(self.host):
            out.append("irq_affinity: irqbalance is running; IRQs are not pinned until it is stopped")
        for interface in self.spec.interfaces:
            if not nic_irqs(self.host, interface):
                out.append(f"irq_affinity: {interface} has no MSI/MSI-X vectors in sysfs (nothing to pin)")
        out.extend(f"irq_affinity: {k} cannot be moved (EIO/EPERM), left alone" for k in sorted(self.unchangeable))
        return out

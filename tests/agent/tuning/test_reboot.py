"""Reboots, item by item: kernel-volatile changes (sysctl, THP, IRQ affinity) are back at their boot
values after a reboot, so their journaled originals are dropped and re-read; a change that survives
a reboot (``survives_reboot``: a disabled systemd unit) keeps its original, so ``revert`` can still
put it back. The persistent item here is a file in the fixture tree standing for a unit's state."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.tuning.base import TuningItem, read_text, write_text
from agent.tuning.engine import Engine
from agent.tuning.irqbalance import IrqbalanceItem
from agent.tuning.profile import THP
from agent.tuning.sysctl import SysctlItem
from agent.tuning.thp import ThpItem
from host.paths import HostPaths
from tests.agent.tuning.hosttree import make_host, value

STATE = "etc/fake-unit/state"


class PersistentItem(TuningItem):
    """A service disabled on the host's disk: the change outlives a reboot."""

    name = "fakeunit"
    survives_reboot = True

    def managed_keys(self) -> list[str]:
        return ["state"]

    def read(self, key: str) -> str:
        return read_text(self.host.root / STATE)

    def wanted(self, key: str, current: str) -> str:
        return "disabled"

    def write(self, key: str, value: str) -> None:
        write_text(self.host.root / STATE, value, self.host.root)


def reboot(host: Path, somaxconn_at_boot: str) -> None:
    boot_id = host / "proc/sys/kernel/random/boot_id"
    boot_id.chmod(0o644)
    boot_id.write_text("99999999-2222-3333-4444-555555555555\n")
    (host / "proc/sys/net/core/somaxconn").write_text(somaxconn_at_boot + "\n")  # the kernel's boot value


def engine(host: Path) -> Engine:
    th = HostPaths(host)
    return Engine(th, [SysctlItem(th, {"net.core.somaxconn": ">=8192"}), PersistentItem(th)], "p")


def test_kernel_volatile_items_are_re_read_and_persistent_ones_keep_their_originals(tmp_path: Path) -> None:
    host = make_host(tmp_path / "host")
    (host / STATE).parent.mkdir(parents=True)
    (host / STATE).write_text("enabled\n")
    engine(host).apply()
    assert (value(host, STATE), value(host, "proc/sys/net/core/somaxconn")) == ("disabled", "8192")
    reboot(host, "128")
    again = engine(host)
    again.apply()  # the next agent start after the reboot
    assert any("1 change(s) that survive a reboot keep their originals" in m for m in again.messages)
    th = HostPaths(host)
    restored = Engine(th, [PersistentItem(th)]).revert()
    assert {(c.item, c.key, c.new) for c in restored} == {
        ("fakeunit", "state", "enabled"),  # the original from before the reboot
        ("sysctl", "net.core.somaxconn", "128"),  # re-read after the reboot, not the old 4096
    }
    assert (value(host, STATE), value(host, "proc/sys/net/core/somaxconn")) == ("enabled", "128")


def test_a_run_cut_short_by_the_reboot_is_undone_for_what_survived_it(tmp_path: Path) -> None:
    host = make_host(tmp_path / "host")
    (host / STATE).parent.mkdir(parents=True)
    (host / STATE).write_text("enabled\n")
    steps: list[str] = []

    def power_cut(step: str) -> None:
        steps.append(step)
        if step == "write fakeunit/state":
            raise KeyboardInterrupt  # stands for the power going: nothing after this step runs

    th = HostPaths(host)
    with pytest.raises(KeyboardInterrupt):
        Engine(
            th, [SysctlItem(th, {"net.core.somaxconn": ">=8192"}), PersistentItem(th)], "p", on_step=power_cut
        ).apply()
    assert value(host, STATE) == "disabled"
    reboot(host, "128")
    e = Engine(th, [PersistentItem(th)])
    e.load()
    assert value(host, STATE) == "enabled"  # the half-done run is undone for the surviving change
    assert value(host, "proc/sys/net/core/somaxconn") == "128"  # the kernel's, left alone
    assert not (host / "var/lib/nodetune/tuning-journal.json").exists()


def test_whether_a_change_survives_is_the_hosts_not_the_items(tmp_path: Path) -> None:
    """Per entry, decided when written: irqbalance stopped through systemd survives a reboot, stopped
    by signal on a host without systemd does not (the class default said True for both)."""
    host = make_host(tmp_path / "host")
    th = HostPaths(host)
    assert not IrqbalanceItem(th, False).survives("service")  # no /run/systemd/system here
    (host / "run/systemd/system").mkdir(parents=True)
    assert IrqbalanceItem(th, False).survives("service")
    assert not any(i.survives(k) for i, k in ((SysctlItem(th, {}), "x"), (ThpItem(th, THP()), "enabled")))

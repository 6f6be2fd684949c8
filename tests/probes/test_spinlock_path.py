"""probes/spinlock_path.py: which spinlock waits the tracepoint shows, from CPU flags and the kernel
log; the log reader against dmesg; the verdict exported by the loaded lockstat probe."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from probes.base import KernelFacts
from probes.lockstat import LockstatProbe
from probes.spinlock_path import ALL, NONE, QUEUED, SEEN, UNKNOWN, kernel_log, spinlock_waits_seen, this_node
from tests.conftest import IN_TEST_VM, REPO

BARE = "processor\t: 0\nflags\t\t: fpu vme de pse tsc msr pae\n\nprocessor\t: 1\nflags\t\t: fpu vme\n"
GUEST = "processor\t: 0\nflags\t\t: fpu vme tsc hypervisor lahf_lm\n"
ARM = "processor\t: 0\nFeatures\t: fp asimd evtstrm\n"


@pytest.mark.parametrize(
    ("message", "seen"),
    [
        ("kvm-guest: PV spinlocks enabled", ALL),
        ("PV spinlocks enabled", ALL),  # matched by its end, whatever the prefix
        ("kvm-guest: PV spinlocks disabled, no host support", NONE),
        ("kvm-guest: PV spinlocks disabled with KVM_HINTS_REALTIME hints", QUEUED),
        ("kvm-guest: PV spinlocks disabled, single CPU", QUEUED),
        ('kvm-guest: PV spinlocks disabled, forced by "nopvspin" parameter', QUEUED),
        ("xen: PV spinlocks enabled", UNKNOWN),  # another hypervisor's rules: not guessed
        ("Hyper-V: PV spinlocks disabled", UNKNOWN),
    ],
)
def test_a_guest_is_judged_by_its_pv_spinlock_message(message: str, seen: str) -> None:
    log = ["Linux version 6.1.0", "Hypervisor detected: KVM", "PV qspinlock hash table entries: 256", message, "later"]
    assert spinlock_waits_seen("x86_64", GUEST, log)[0] == seen


def test_bare_metal_other_machines_and_a_log_without_the_message() -> None:
    # bare metal: no hypervisor flag; the log is not consulted (a stray message changes nothing)
    assert spinlock_waits_seen("x86_64", BARE, ["kvm-guest: PV spinlocks enabled"])[0] == QUEUED
    assert spinlock_waits_seen("aarch64", ARM, [])[0] == QUEUED
    assert spinlock_waits_seen("ppc64le", "", [])[0] == UNKNOWN
    assert spinlock_waits_seen("x86_64", ARM, [])[0] == UNKNOWN  # no flags line
    seen, why = spinlock_waits_seen("x86_64", GUEST, ["ACPI: ..."])  # boot rotated out of the buffer
    assert seen == UNKNOWN and "no PV spinlock message" in why
    # the boot is in the log: a hypervisor without spinlock code of its own, or none recognised
    for log in (["Linux version 6.1.0", "Hypervisor detected: VMware"], ["Linux version 6.1.0", "x86/fpu: ..."]):
        assert spinlock_waits_seen("x86_64", GUEST, log)[0] == NONE, log
    # KVM, Xen, Hyper-V decide for themselves: without their message, not guessed
    for name in ("KVM", "Xen HVM", "Microsoft Hyper-V"):
        log = ["Linux version 6.1.0", f"Hypervisor detected: {name}"]
        assert spinlock_waits_seen("x86_64", GUEST, log)[0] == UNKNOWN


def test_unreadable_sources_give_unknown_not_an_error(tmp_path: Path) -> None:
    assert kernel_log(tmp_path / "no-kmsg") == []
    assert this_node(tmp_path, tmp_path / "no-kmsg")[0] == UNKNOWN  # no cpuinfo there


def test_kernel_log_reader_returns_what_dmesg_prints() -> None:
    if os.geteuid() != 0:
        pytest.skip("/dev/kmsg needs root (CAP_SYSLOG)")
    ours = kernel_log()
    theirs = subprocess.run(["dmesg", "--notime"], capture_output=True, text=True, check=True).stdout.splitlines()
    assert len(ours) > 10
    # The log may grow between the two reads: every line dmesg printed before our read ended is
    # ours, in order. dmesg folds continuation lines: compare first lines.
    common = min(len(ours), len(theirs))
    assert [m.strip() for m in ours[: common - 5]] == [t.strip() for t in theirs[: common - 5]]
    spin = [m for m in ours if "PV spinlocks" in m]
    assert spin == [t for t in theirs if "PV spinlocks" in t]


@pytest.mark.bpf
def test_loaded_probe_exports_this_nodes_verdict(header_cache: Path) -> None:
    expected = this_node()
    probe = LockstatProbe(KernelFacts(cache_dir=header_cache))
    probe.load()
    try:
        samples = {
            s.labels["seen"]: s.value
            for family in probe.collect()
            for s in family.samples
            if s.name == "nodetune_lock_spinlock_waits_seen"
        }
    finally:
        probe.close()
    assert set(samples) == set(SEEN)
    assert [k for k, v in samples.items() if v == 1] == [expected[0]]
    assert sum(samples.values()) == 1
    print(f"this node: spinlock waits seen {expected}")


@pytest.mark.bpf
@pytest.mark.tracing  # runs in the stock-kernel guest (tests/kernel_vm.py): an emulated CPU, no KVM
def test_the_verdict_matches_what_the_probe_sees(header_cache: Path) -> None:
    """The pipe workload (tests/contention.py: pipe->mutex and its wait-queue spinlocks) under the
    loaded probe. In the guest, a hypervisor the kernel does not recognise, the verdict is "none"
    and no spinlock contention is counted while the mutex ones are; where every waiter is seen,
    spinlock contentions are counted too."""
    seen, why = this_node()
    probe = LockstatProbe(KernelFacts(cache_dir=header_cache))
    probe.load()
    try:
        before = {t: sum(slots) for t, (slots, _) in probe.histograms().items()}
        subprocess.run([sys.executable, "-m", "tests.contention", "2", "6"], cwd=REPO, check=True)
        after = {t: sum(slots) for t, (slots, _) in probe.histograms().items()}
    finally:
        probe.close()
    counts = {t: after[t] - before.get(t, 0) for t in after}
    print(f"verdict {seen} ({why}); contentions {counts}")
    assert counts["mutex"] > 1000
    if IN_TEST_VM:
        assert seen == NONE
    if seen == NONE:
        assert counts["spinlock"] == 0
    elif seen == ALL:
        assert counts["spinlock"] > 0

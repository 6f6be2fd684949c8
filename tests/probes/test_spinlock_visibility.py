"""probes/spinlock_visibility.py: which spinlock waits the tracepoint shows, from CPU flags and the kernel
log; the log reader against dmesg; the verdict exported by the loaded lockstat probe."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from probes.base import KernelFacts
from probes.lockstat import LockstatProbe
from probes.spinlock_visibility import (
    ALL,
    NONE,
    QUEUED,
    SEEN,
    UNKNOWN,
    kernel_log,
    parse_records,
    spinlock_waits_seen,
    this_node,
)
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


# /dev/kmsg records as read(2) returns them, one after another. The first four are from a
# development machine (a KVM guest): its boot, the hypervisor line, a record with dictionary lines,
# and one whose message has a newline inside (dmesg prints it as two lines). The last two are made
# up in the same format: a PV spinlock message, and escapes of a backslash, of UTF-8 (é) and of a
# byte that is not UTF-8.
KMSG = (
    b"5,0,0,-;Linux version 6.18.44-fc-v1098 (builder@sandboxing) (gcc (GCC) 15.3.0, GNU ld (GNU Binutils)"
    b" 2.46) #1 SMP PREEMPT_DYNAMIC @0\n"
    b"6,12,0,-;Hypervisor detected: KVM\n"
    b"6,193,311816,-;acpi PNP0A08:00: _OSC: OS supports [ExtendedConfig ASPM ClockPM Segments MSI HPX-Type3]\n"
    b" SUBSYSTEM=acpi\n"
    b" DEVICE=+acpi:PNP0A08:00\n"
    b"4,286,446302,-;amd_pstate: The CPPC feature is supported but currently disabled by the BIOS.\\x0a"
    b"Please enable it if your BIOS has the CPPC option.\n"
    b"6,301,500000,-;kvm-guest: PV spinlocks disabled, no host support\n"
    b"6,302,500001,c;test: C:\\x5cx41 caf\\xc3\\xa9 \\xff\n"
)


def test_kmsg_records_are_one_message_each_continuation_lines_kept() -> None:
    """A record is one message: its dictionary lines dropped, a newline inside its text kept (the
    reader's choice: the kernel logged one message; dmesg prints its lines), escapes undone as
    bytes and decoded as UTF-8."""
    assert parse_records(KMSG) == [
        "Linux version 6.18.44-fc-v1098 (builder@sandboxing) (gcc (GCC) 15.3.0, GNU ld (GNU Binutils) 2.46)"
        " #1 SMP PREEMPT_DYNAMIC @0",
        "Hypervisor detected: KVM",
        "acpi PNP0A08:00: _OSC: OS supports [ExtendedConfig ASPM ClockPM Segments MSI HPX-Type3]",
        "amd_pstate: The CPPC feature is supported but currently disabled by the BIOS.\n"
        "Please enable it if your BIOS has the CPPC option.",
        "kvm-guest: PV spinlocks disabled, no host support",
        "test: C:\\x41 caf\u00e9 \ufffd",  # an escaped backslash is not an escape
    ]
    # The verdict is read from such a log, the message after the two-line one included.
    assert spinlock_waits_seen("x86_64", GUEST, parse_records(KMSG))[0] == NONE
    # One record per read(2) from the device: the same messages, record by record.
    records = [r + b"\n" for r in KMSG.split(b"\n") if r and not r.startswith(b" ")]
    assert [m for r in records for m in parse_records(r)] == parse_records(KMSG)


def test_kernel_log_reader_returns_what_dmesg_prints() -> None:
    """Record for record, what dmesg read from the same buffer (its JSON output: one entry per
    record, a newline inside a message kept, as ours), on whatever this machine's boot logged."""
    if os.geteuid() != 0:
        pytest.skip("/dev/kmsg needs root (CAP_SYSLOG)")
    out = subprocess.run(["dmesg", "--json"], capture_output=True, check=True).stdout
    theirs = [record["msg"] for record in json.loads(out.decode("utf-8", errors="replace"))["dmesg"]]
    ours = kernel_log()  # read after dmesg: its records, less any overwritten since, then any new
    skipped = next((i for i in range(len(theirs)) if theirs[i:] == ours[: len(theirs) - i]), None)
    assert skipped is not None, "no record order in common with dmesg"
    assert len(theirs) - skipped > 10


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

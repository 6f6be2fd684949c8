"""Which spinlock waits the kernel's ``lock:contention_begin`` tracepoint shows on this node.

lockstat (and ``perf lock contention``) see a spinning waiter only if the kernel passes the
tracepoint on its way, and on x86 that depends on the spinlock slow path the node runs:

- a guest with PV spinlocks: ``__pv_queued_spin_lock_slowpath()`` goes straight to the MCS queue,
  past the tracepoint: every waiter is seen (``all``);
- bare metal, or a guest told to lock natively (KVM's dedicated-CPU hint, ``nopvspin``, one CPU):
  ``native_queued_spin_lock_slowpath()`` calls the tracepoint after the pending-bit stage
  (kernel/locking/qspinlock.c), so a lock's first waiter is not seen (``queued``);
- a KVM guest whose host offers no PV spinlocks: ``virt_spin_lock()``, a test-and-set loop that
  returns before the tracepoint (arch/x86/include/asm/qspinlock.h; ``kvm_spinlock_init()`` keeps
  it on "for vCPU preemption"): no spinlock wait is seen (``none``).

The node's kind comes from the CPU's ``hypervisor`` flag (``/proc/cpuinfo``) and, in a guest, from
the boot log, read once from ``/dev/kmsg``: the message ``kvm_spinlock_init()`` logs, or, under a
hypervisor without spinlock code of its own (VMware, an emulator), none (``none``). Where the boot
messages are gone from the log buffer, or Xen or Hyper-V logged their own (they keep or drop the
test-and-set lock under their own rules), the answer is ``unknown``.
"""

from __future__ import annotations

import errno
import os
import re
from collections.abc import Iterable
from pathlib import Path

ALL, QUEUED, NONE, UNKNOWN = "all", "queued", "none", "unknown"
SEEN = (ALL, QUEUED, NONE, UNKNOWN)

# kvm_spinlock_init()'s messages (arch/x86/kernel/kvm.c, pr_fmt "kvm-guest: "), what each leaves
# the slow path as. Matched by their end, whatever prefix pr_fmt gives them.
KVM_MESSAGES = (
    ("PV spinlocks enabled", ALL),
    ("PV spinlocks disabled, no host support", NONE),
    ("PV spinlocks disabled with KVM_HINTS_REALTIME hints", QUEUED),
    ("PV spinlocks disabled, single CPU", QUEUED),
    ('PV spinlocks disabled, forced by "nopvspin" parameter', QUEUED),
)
OTHER_HYPERVISORS = ("xen:", "Hyper-V:")
# init_hypervisor_platform() logs "Hypervisor detected: <name>" (arch/x86/kernel/cpu/hypervisor.c).
# Only KVM, Xen and Hyper-V guests have spinlock code of their own; under any other hypervisor, or
# one the kernel does not recognise (no such line), nothing turns off virt_spin_lock_key, which
# native_pv_lock_init() turned on for every guest: test-and-set spinlocks.
DETECTED = "Hypervisor detected: "
OWN_SPINLOCK_CODE = ("KVM", "Xen", "Microsoft Hyper-V")
BOOT = "Linux version "  # the log's first message: the buffer still holds the boot
# /dev/kmsg escapes non-printable bytes (and backslash itself) as \xXX (Documentation/ABI/testing/dev-kmsg)
ESCAPED = re.compile(rb"\\x([0-9a-f]{2})")
MAX_LOG_RECORDS = 200_000  # /dev/kmsg holds at most a few MB of records: a bound, not a budget


def cpu_flags(cpuinfo: str) -> set[str] | None:
    """The x86 CPU flags of ``/proc/cpuinfo``'s first processor; None where there are none (not
    x86: arm64 lists "Features")."""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return set(value.split())
    return None


def spinlock_waits_seen(machine: str, cpuinfo: str, kernel_log: Iterable[str]) -> tuple[str, str]:
    """(which spinlock waits the tracepoint shows: one of SEEN, why) for a kernel on ``machine``
    (``uname -m``) with this ``/proc/cpuinfo`` and these kernel log messages."""
    if machine == "aarch64":
        return QUEUED, "arm64: the generic queued spinlock, whose tracepoint follows the pending-bit stage"
    if machine != "x86_64":
        return UNKNOWN, f"not checked on {machine}"
    flags = cpu_flags(cpuinfo)
    if flags is None:
        return UNKNOWN, "no CPU flags in /proc/cpuinfo"
    if "hypervisor" not in flags:
        return QUEUED, "bare metal: native queued spinlocks; the tracepoint follows the pending-bit stage"
    booted, hypervisor = False, None
    for message in kernel_log:
        if message.startswith(BOOT):
            booted = True
        elif message.startswith(DETECTED):
            hypervisor = message[len(DETECTED) :].strip()
        if "PV spinlocks" not in message:
            continue
        if message.startswith(OTHER_HYPERVISORS):
            return UNKNOWN, f"a guest; its hypervisor logged {message.strip()!r}"
        for text, seen in KVM_MESSAGES:
            if message.rstrip().endswith(text):
                return seen, f"a guest; the kernel logged {message.strip()!r}"
    if booted and (hypervisor is None or not hypervisor.startswith(OWN_SPINLOCK_CODE)):
        under = f"under {hypervisor}" if hypervisor else "under a hypervisor the kernel does not recognise"
        return NONE, f"a guest {under}, without PV spinlocks: test-and-set spinlocks, before the tracepoint"
    return UNKNOWN, "a guest, and no PV spinlock message in the kernel log (rotated out?)"


def parse_records(data: bytes) -> list[str]:
    """The messages of ``/dev/kmsg`` records ("prio,seq,usec,flags;message\\n" then " KEY=value\\n"
    dictionary lines, Documentation/ABI/testing/dev-kmsg), one or several in ``data``.

    One string per record, whatever the message holds: a message logged with a newline inside
    (``"…by the BIOS.\\nPlease enable it…"``, which dmesg prints as two lines) keeps it. The kernel
    escapes every byte below 0x20 or above 0x7e, and the backslash, as ``\\xXX``
    (kernel/printk/printk.c, msg_add_ext_text()): they are unescaped as bytes, then the message
    is decoded as UTF-8 (a byte that is not UTF-8 becomes U+FFFD), as dmesg does."""
    messages = []
    for line in data.split(b"\n"):
        if not line or line.startswith(b" "):  # a dictionary line of the record before
            continue
        _, _, message = line.partition(b";")
        raw = ESCAPED.sub(lambda m: bytes([int(m.group(1), 16)]), message)
        messages.append(raw.decode("utf-8", errors="replace"))
    return messages


def kernel_log(path: Path = Path("/dev/kmsg"), limit: int = MAX_LOG_RECORDS) -> list[str]:
    """The messages in the kernel's log buffer now, one per record (``parse_records()``), oldest
    first, without waiting for new ones; [] where it cannot be read."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        return []
    messages: list[str] = []
    try:
        while len(messages) < limit:
            try:
                record = os.read(fd, 8192)  # one record per read(); a record is at most 1 KB
            except OSError as e:
                if e.errno == errno.EPIPE:  # overwritten while we read: go on from the oldest left
                    continue
                break  # EAGAIN: nothing more
            if not record:
                break
            messages.extend(parse_records(record))
    finally:
        os.close(fd)
    return messages[:limit]


def this_node(proc_root: Path = Path("/proc"), kmsg: Path = Path("/dev/kmsg")) -> tuple[str, str]:
    """``spinlock_waits_seen()`` of the running kernel."""
    try:
        cpuinfo = (proc_root / "cpuinfo").read_text()
    except OSError as e:
        return UNKNOWN, f"cannot read {proc_root / 'cpuinfo'}: {e}"
    machine = os.uname().machine
    needs_log = machine == "x86_64" and "hypervisor" in (cpu_flags(cpuinfo) or set())
    return spinlock_waits_seen(machine, cpuinfo, kernel_log(kmsg) if needs_log else [])

"""Sysctls that hand out root: keys that make the kernel run a program or load code, and one-way
switches nodetune could never revert. A profile may set one only by naming it under ``unsafe:``.

Source: the kernel's Documentation/admin-guide/sysctl/kernel.rst and fs.rst (what each key makes the
kernel do), checked against the 6.x documentation:

* ``kernel.core_pattern`` starting with ``|``: "the kernel will treat the rest of the pattern as a
  command to run" (as root, for every crashing process); starting with ``@`` (6.16+): core dumps
  go to a socket whoever listens there receives. A file pattern is not refused.
* ``kernel.modprobe``: "the usermode helper for autoloading kernel modules" - run as root whenever
  the kernel requests a module.
* ``kernel.hotplug``: the uevent helper, run as root on every device event.
* ``kernel.poweroff_cmd``: the program run on an orderly power-off.
* ``kernel.usermodehelper.*`` (``bset``, ``inheritable``): the capabilities every such helper runs with.
* ``fs.binfmt_misc.*``: registers interpreters the kernel runs for matching files (flag ``C`` with
  the file's credentials).
* ``kernel.unprivileged_bpf_disabled``: ``0`` lets any user load BPF programs (code in the
  kernel); ``1`` is "disabled without recovery" (the kernel refuses to clear it until reboot). Only
  ``2`` (disabled, can be re-enabled) is accepted.
* ``dev.tty.ldisc_autoload`` set to non-zero: any user may make the kernel load a line-discipline module.
* ``dev.tty.legacy_tiocsti`` set to non-zero: TIOCSTI pushes input into a terminal (a root shell's).
* ``kernel.modules_disabled`` and ``kernel.kexec_load_disabled``: one-way switches (once 1, the
  kernel refuses 0 until reboot), so a revert could never put them back; ``modules_disabled`` also
  stops the ``kmod`` item for good.
* ``kernel.kexec_load_limit_panic``/``_reboot``: "can only be set with a more restrictive value than
  the current one": one-way, a revert could never raise it back.
* ``kernel.yama.ptrace_scope`` set to ``3``: "once set, this sysctl value cannot be changed" (Yama.rst).
* ``net.ipv4.tcp_congestion_control`` and ``net.core.default_qdisc``: setting one the kernel does
  not have yet makes it load ``tcp_<name>``/``sch_<name>`` (``request_module``), code outside the
  ``kmod`` item's allowlist; refused whatever the value (name the key under ``unsafe:``).

Values are read as the kernel reads them (``kernel_int``: base 0, so ``00``, ``-0`` and ``0x0`` are
all 0, ``01`` is 1), not compared as strings; a value the kernel cannot read as a number is refused
for the value-dependent keys (the kernel would refuse it too).

Not refused, with the reason: ``core_pipe_limit``/``core_uses_pid`` (no program of their own),
``perf_event_paranoid``/``kptr_restrict`` (disclose, do not run).
"""

from __future__ import annotations

import re
from collections.abc import Callable

_ALWAYS: Callable[[str], bool] = lambda value: True  # noqa: E731
_NUMBER = re.compile(r"^\s*(-?)(0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*)\s*$")


def kernel_int(text: str) -> int | None:
    """``text`` as proc_dointvec/proc_doulongvec read it (strtoul with base 0: ``0x`` hex, a leading
    ``0`` octal, else decimal; ASCII only; one optional ``-``), or None if the kernel refuses it."""
    m = _NUMBER.match(text)
    if m is None:
        return None
    sign, digits = m.groups()
    base = 16 if digits[:2] in ("0x", "0X") else 8 if digits.startswith("0") else 10
    number = int(digits, base)
    return -number if sign else number


def _unless(*safe: int) -> Callable[[str], bool]:
    """Refused unless the kernel reads the value as one of ``safe``."""
    return lambda value: kernel_int(value) not in safe


# key (or prefix ending in '.') -> (refused for this value?, why)
RULES: dict[str, tuple[Callable[[str], bool], str]] = {
    "kernel.core_pattern": (
        lambda v: v.lstrip()[:1] in ("|", "@"),
        "a '|' pattern runs a program as root, an '@' one sends core dumps to a socket",
    ),
    "kernel.modprobe": (_ALWAYS, "the program the kernel runs as root to load modules"),
    "kernel.hotplug": (_ALWAYS, "the uevent helper the kernel runs as root"),
    "kernel.poweroff_cmd": (_ALWAYS, "the program the kernel runs as root at power-off"),
    "kernel.usermodehelper.": (_ALWAYS, "the capabilities of the programs the kernel runs"),
    "fs.binfmt_misc.": (_ALWAYS, "registers interpreters the kernel runs"),
    "kernel.unprivileged_bpf_disabled": (
        _unless(2),
        "0 lets any user load BPF programs, 1 is one-way (the kernel refuses to clear it); only 2 is accepted",
    ),
    "dev.tty.ldisc_autoload": (_unless(0), "non-zero lets any user load line-discipline modules"),
    "dev.tty.legacy_tiocsti": (_unless(0), "non-zero lets a process push input into another's terminal"),
    "kernel.yama.ptrace_scope": (lambda v: kernel_int(v) == 3, "3 is one-way: the kernel refuses any change after it"),
    "kernel.kexec_load_limit_panic": (_ALWAYS, "one-way: the kernel only takes a lower limit"),
    "kernel.kexec_load_limit_reboot": (_ALWAYS, "one-way: the kernel only takes a lower limit"),
    "net.ipv4.tcp_congestion_control": (_ALWAYS, "a name the kernel lacks makes it load module tcp_<name>"),
    "net.core.default_qdisc": (_ALWAYS, "a name the kernel lacks makes it load module sch_<name>"),
    "kernel.modules_disabled": (_ALWAYS, "one-way switch: a revert could never undo it"),
    "kernel.kexec_load_disabled": (_ALWAYS, "one-way switch: a revert could never undo it"),
}


def refusal(key: str, value: str) -> str | None:
    """Why ``key = value`` is refused without ``unsafe:``, or None."""
    for name, (refused, why) in RULES.items():
        if (key == name or (name.endswith(".") and key.startswith(name))) and refused(value):
            return why
    return None

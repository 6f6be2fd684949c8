"""Check a parsed profile against the host before anything is touched; build its items.

Reads only: the sysctl files exist, are writable and hold values of the same shape as the
profile's (``10240 65000`` for a two-field key, a number for a ``>=`` limit), known ranges hold
(a port range within 1-65535, low <= high), numbers fit the kernel's type of the key (``KEY_RANGE``),
the THP modes are among those this kernel offers.
Every problem is collected and raised at once as a :class:`ProfileError` naming the fields. Keys
that are per network namespace are accepted with a warning (seed 001's trap).
"""

from __future__ import annotations

import os
import re

from agent.tuning.base import TuningItem, inside, read_text
from agent.tuning.cpulist import CpuListError, format_cpulist, parse_cpulist
from agent.tuning.irq_affinity import IrqAffinityItem, online_cpus
from agent.tuning.irqbalance import IrqbalanceItem
from agent.tuning.kmod import KmodItem
from agent.tuning.profile import NUMBER, Profile, ProfileError
from agent.tuning.sysctl import SysctlItem, key_path, per_netns
from agent.tuning.thp import ThpItem, offered
from host.paths import HostPaths

PORT_RANGE_KEYS = ("net.ipv4.ip_local_port_range",)
INT_MAX = 2**31 - 1
INT, ULONG, LONG = (-(2**31), INT_MAX), (0, 2**64 - 1), (-(2**63), 2**64 - 1)
# The range the kernel's handler takes for a key (the handler's type, and the extra1/extra2 bounds of
# proc_dointvec_minmax where it has them: kernel/sysctl.c, mm/*.c, net/core/sysctl_net_core.c,
# net/ipv4/sysctl_net_ipv4.c, kernel/pid.c, fs/file.c). A value outside it is EINVAL at write time,
# so it is refused here. Other keys get the widest a 64-bit kernel parses (proc_doulongvec_minmax).
KEY_RANGE = {
    "net.core.somaxconn": (0, INT_MAX),
    "net.ipv4.tcp_max_syn_backlog": INT,
    "net.core.netdev_max_backlog": INT,
    "net.core.netdev_budget": INT,
    "net.core.rmem_max": INT,
    "net.core.wmem_max": INT,
    "net.core.rmem_default": INT,
    "net.core.wmem_default": INT,
    "net.core.optmem_max": INT,
    "net.ipv4.tcp_tw_reuse": (0, 2),
    "net.ipv4.tcp_fin_timeout": INT,
    "net.ipv4.tcp_keepalive_time": INT,
    "net.ipv4.tcp_keepalive_intvl": INT,
    "net.ipv4.tcp_syncookies": INT,
    "vm.max_map_count": (0, INT_MAX),
    "vm.swappiness": (0, 200),
    "vm.overcommit_memory": (0, 2),
    "vm.overcommit_ratio": INT,
    "vm.dirty_ratio": (0, 100),
    "vm.dirty_background_ratio": (0, 100),
    "vm.dirty_bytes": ULONG,
    "vm.dirty_background_bytes": ULONG,
    "vm.min_free_kbytes": (0, INT_MAX),
    "vm.vfs_cache_pressure": (0, INT_MAX),
    "kernel.pid_max": (301, 4194304),  # RESERVED_PIDS + 1 .. PID_MAX_LIMIT (64-bit)
    "kernel.threads-max": (20, 0x3FFFFFFF),  # MIN_THREADS .. FUTEX_TID_MASK
    "kernel.shmmax": ULONG,
    "kernel.shmall": ULONG,
    "kernel.perf_event_paranoid": INT,
    "kernel.sched_rt_runtime_us": INT,
    "kernel.panic": INT,
    "fs.nr_open": (64, 1073741816),  # BITS_PER_LONG .. sysctl_nr_open_max (64-bit)
    "fs.file-max": ULONG,
}
# Keys where a negative number means something (-1: unlimited, or "allow everything"). Any other key
# refuses a negative: an unsigned handler silently skips it (proc_doulongvec_minmax) and the
# read-back fails, and no limit nodetune raises is meant to be negative.
SIGNED = ("kernel.perf_event_paranoid", "kernel.sched_rt_runtime_us", "kernel.panic")
LEADING_ZERO = re.compile(r"^-?0[0-9]|^-0$")


def _number_problem(key: str, number: str) -> str | None:
    """Why the kernel would not store ``number`` (an ASCII whole number) as written, or None."""
    if LEADING_ZERO.match(number):
        return (
            f"{number!r} has a leading zero: the kernel reads numbers with base 0 (010 is octal 8, -0 is 0); "
            "write it in decimal without one"
        )
    low, high = KEY_RANGE.get(key, LONG)
    if not low <= int(number) <= high:
        return f"{number!r} out of range for the kernel's type of this key ({low}..{high})"
    if int(number) < 0 and key not in SYSCTL_SIGNED:
        return f"{number!r} is negative, which this key does not take (an unsigned kernel type skips it)"
    return None


SYSCTL_SIGNED = frozenset(SIGNED)


def _check_sysctl(host: HostPaths, key: str, value: str) -> str | None:
    path = key_path(host.proc_sys, key)
    if ".." in key.split(".") or not path.is_file():
        return f"sysctl.{key}: no such kernel parameter ({path} does not exist)"
    if not inside(host.proc_sys, path):
        return f"sysctl.{key}: {path} resolves outside {host.proc_sys} (a symlink): not a kernel parameter"
    if not os.stat(path).st_mode & 0o222:
        return f"sysctl.{key}: read-only parameter"
    try:
        current = read_text(path).split()
    except OSError as e:
        return f"sysctl.{key}: unreadable ({e.strerror})"
    numeric = all(NUMBER.match(f) for f in current) and bool(current)
    if value.startswith(">="):
        if len(current) != 1 or not numeric:
            return f"sysctl.{key}: '>=' needs a single-number parameter, it holds {' '.join(current)!r}"
        problem = _number_problem(key, value[2:])
        return f"sysctl.{key}: {problem}" if problem else None
    fields = value.split()
    if numeric:
        if len(fields) != len(current) or not all(NUMBER.match(f) for f in fields):
            return f"sysctl.{key}: expected {len(current)} whole number(s) like {' '.join(current)!r}, got {value!r}"
        for f in fields:
            problem = _number_problem(key, f)
            if problem:
                return f"sysctl.{key}: {problem}"
    if key in PORT_RANGE_KEYS:
        low, high = (int(f) for f in fields)
        if not 1 <= low <= high <= 65535:
            return f"sysctl.{key}: {value!r} must be 'LOW HIGH' with 1 <= LOW <= HIGH <= 65535"
    return None


def netns_warning(key: str) -> str:
    return (
        f"sysctl.{key} is per network namespace: this changes the host's namespace only (the node and "
        "hostNetwork pods). Pods get their own value through securityContext.sysctls (unsafe ones "
        "need the kubelet's --allowed-unsafe-sysctls)."
    )


def build(profile: Profile, host: HostPaths) -> tuple[list[TuningItem], list[str]]:
    """The profile's items and its warnings; raises ProfileError listing every problem."""
    problems: list[str] = []
    warnings: list[str] = []
    items: list[TuningItem] = []
    for key, value in profile.sysctl.items():
        problem = _check_sysctl(host, key, value)
        if problem:
            problems.append(problem)
        elif per_netns(key):
            warnings.append(netns_warning(key))
    if profile.sysctl:
        items.append(SysctlItem(host, profile.sysctl))
    if profile.thp:
        for key in ("enabled", "defrag"):
            value = getattr(profile.thp, key)
            if value is None:
                continue
            try:
                modes, _ = offered(read_text(host.thp / key), key)
            except OSError:
                problems.append(f"thp.{key}: {host.thp / key} not readable (no transparent hugepages here)")
                continue
            if value not in modes:
                problems.append(f"thp.{key}: {value!r} not offered by this kernel ({', '.join(modes)})")
        items.append(ThpItem(host, profile.thp))
    if profile.irqbalance is not None:
        items.append(IrqbalanceItem(host, profile.irqbalance.enabled))
    if profile.irq_affinity is not None:
        spec = profile.irq_affinity
        online = online_cpus(host)
        try:
            cpus = parse_cpulist(spec.cpus)
            outside = [c for c in cpus if online and c not in online]
            if outside:
                problems.append(f"irq_affinity.cpus: {format_cpulist(outside)} not online ({format_cpulist(online)})")
        except CpuListError as e:
            problems.append(f"irq_affinity.cpus: {e}")
        for interface in spec.interfaces:
            if not (host.sys / "class/net" / interface).exists():
                problems.append(f"irq_affinity.interfaces: no interface {interface!r}")
        if profile.irqbalance is None or profile.irqbalance.enabled:
            warnings.append("irq_affinity without 'irqbalance: {enabled: false}': nothing is pinned while it runs")
        items.append(IrqAffinityItem(host, spec))
    if profile.kmod is not None:
        items.append(KmodItem(host, profile.kmod.load))
    if problems:
        raise ProfileError("; ".join(problems))
    return items, warnings

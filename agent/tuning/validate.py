"""Check a parsed profile against the host before anything is touched; build its items.

Reads only: the sysctl files exist, are writable and hold values of the same shape as the
profile's (``10240 65000`` for a two-field key, a number for a ``>=`` limit), known ranges hold
(a port range within 1-65535, low <= high), the THP modes are among those this kernel offers.
Every problem is collected and raised at once as a :class:`ProfileError` naming the fields. Keys
that are per network namespace are accepted with a warning (seed 001's trap).
"""

from __future__ import annotations

import os

from agent.tuning.base import TuningHost, TuningItem, read_text
from agent.tuning.cpulist import CpuListError, format_cpulist, parse_cpulist
from agent.tuning.irq_affinity import IrqAffinityItem, online_cpus
from agent.tuning.irqbalance import IrqbalanceItem
from agent.tuning.kmod import KmodItem
from agent.tuning.profile import Profile, ProfileError
from agent.tuning.sysctl import SysctlItem, key_path, per_netns
from agent.tuning.thp import ThpItem, offered

PORT_RANGE_KEYS = ("net.ipv4.ip_local_port_range",)


def _check_sysctl(host: TuningHost, key: str, value: str) -> str | None:
    path = key_path(host.proc_sys, key)
    if ".." in key.split(".") or not path.is_file():
        return f"sysctl.{key}: no such kernel parameter ({path} does not exist)"
    if not os.stat(path).st_mode & 0o222:
        return f"sysctl.{key}: read-only parameter"
    try:
        current = read_text(path).split()
    except OSError as e:
        return f"sysctl.{key}: unreadable ({e.strerror})"
    numeric = all(f.lstrip("-").isdigit() for f in current) and bool(current)
    if value.startswith(">="):
        if len(current) != 1 or not numeric:
            return f"sysctl.{key}: '>=' needs a single-number parameter, it holds {' '.join(current)!r}"
        return None
    fields = value.split()
    if numeric:
        if len(fields) != len(current) or not all(f.lstrip("-").isdigit() for f in fields):
            return f"sysctl.{key}: expected {len(current)} whole number(s) like {' '.join(current)!r}, got {value!r}"
        if any(abs(int(f)) >= 2**63 for f in fields):
            return f"sysctl.{key}: {value!r} out of range"
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


def build(profile: Profile, host: TuningHost) -> tuple[list[TuningItem], list[str]]:
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
            if not (host.root / "sys/class/net" / interface).exists():
                problems.append(f"irq_affinity.interfaces: no interface {interface!r}")
        if profile.irqbalance is None or profile.irqbalance.enabled:
            warnings.append("irq_affinity without 'irqbalance: {enabled: false}': nothing is pinned while it runs")
        items.append(IrqAffinityItem(host, spec))
    if profile.kmod is not None:
        items.append(KmodItem(host, profile.kmod.load))
    if problems:
        raise ProfileError("; ".join(problems))
    return items, warnings

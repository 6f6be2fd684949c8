"""sysctl item: kernel parameters under ``/proc/sys`` (``net.core.somaxconn`` ->
``proc/sys/net/core/somaxconn``), each set to a value or, with ``">=N"``, raised to at least N and
never lowered (limits such as ``fs.file-max`` that something else may have raised further).

A key that a sysctl.d(5) file sets to something else is reported (``notes``), not fought: at the
next boot or ``sysctl --system`` that file wins, and the operator should know before then (the
lesson of OpenShift's node tuning operator and TuneD's ``sysctl`` plugin).
"""

from __future__ import annotations

from pathlib import Path

from agent.tuning.base import TuningItem, inside, read_text, write_text
from agent.tuning.profile import NUMBER, SYSCTL_KEY, SYSCTL_VALUE
from host.paths import HostPaths

# Keys under net.* are per network namespace, except these, which exist in the initial namespace
# only (net/core/sysctl_net_core.c net_core_table vs netns_core_table).
GLOBAL_NET = (
    "net.core.rmem_max",
    "net.core.wmem_max",
    "net.core.rmem_default",
    "net.core.wmem_default",
    "net.core.netdev_max_backlog",
    "net.core.netdev_budget",
    "net.core.netdev_budget_usecs",
    "net.core.dev_weight",
    "net.core.optmem_max",
    "net.core.message_cost",
    "net.core.message_burst",
)


def key_path(proc_sys: Path, key: str) -> Path:
    return proc_sys.joinpath(*key.split("."))


def _conf_lines(host: HostPaths) -> list[tuple[str, tuple[str, str]]]:
    """(key, (file relative to the host root, value)) of every setting in the host's sysctl.d(5)
    files, in the order systemd-sysctl applies them."""
    out = []
    for conf in host.sysctl_conf():
        try:
            lines = conf.read_text().splitlines()
        except (OSError, UnicodeDecodeError):
            continue
        for line in lines:
            line = line.strip()
            if not line or line[0] in "#;" or "=" not in line:
                continue
            key, _, value = line.partition("=")
            out.append((key.strip().lstrip("-").replace("/", "."), (str(conf.relative_to(host.root)), value.strip())))
    return out


def per_netns(key: str) -> bool:
    return key.startswith("net.") and key not in GLOBAL_NET and not key.startswith("net.core.bpf_")


class SysctlItem(TuningItem):
    name = "sysctl"

    def __init__(self, host: HostPaths, spec: dict[str, str]) -> None:
        super().__init__(host)
        self.spec = dict(spec)

    def managed_keys(self) -> list[str]:
        return list(self.spec)

    def path(self, key: str) -> Path:
        return key_path(self.host.proc_sys, key)

    def read(self, key: str) -> str:
        """Numbers joined by single spaces (the kernel prints a port range with a tab); any other
        value as the kernel holds it, inner spaces included (a core_pattern "a  b" is put back so)."""
        text = read_text(self.path(key))
        fields = text.split()
        return " ".join(fields) if all(NUMBER.match(f) for f in fields) else text

    def wanted(self, key: str, current: str) -> str:
        spec = self.spec[key]
        if spec.startswith(">="):
            floor = int(spec[2:])
            try:
                return current if int(current) >= floor else str(floor)
            except ValueError:
                return str(floor)
        return spec

    def write(self, key: str, value: str) -> None:
        write_text(self.path(key), value, self.host.proc_sys)

    def owns(self, key: str) -> bool:
        return key in self.spec

    def journal_key_ok(self, key: str) -> bool:
        """A dotted key (never a path) whose file resolves inside the host's /proc/sys."""
        if not SYSCTL_KEY.match(key) or any(part in ("", ".", "..") for part in key.split(".")):
            return False
        return inside(self.host.proc_sys, self.path(key))

    def journal_value_ok(self, key: str, value: str) -> bool:
        return value == "" or SYSCTL_VALUE.match(value) is not None

    def host_conf_values(self, key: str) -> set[str]:
        """Every value the host's sysctl.d(5) files give ``key`` (its configured boot values), with
        spaces normalised as ``read`` does."""
        return {" ".join(value.split()) for k, (_, value) in _conf_lines(self.host) if k == key}

    def configured_elsewhere(self) -> dict[str, tuple[str, str]]:
        """Managed key -> (file, value) for sysctl.d(5) settings that differ from the profile's."""
        found: dict[str, tuple[str, str]] = {}
        for key, (conf, value) in _conf_lines(self.host):
            if key in self.spec:
                found[key] = (conf, " ".join(value.split()))
        return {k: v for k, v in found.items() if not self.same(k, v[1], self.wanted(k, v[1]))}

    def notes(self) -> list[str]:
        return [
            f"sysctl {key}: /{conf} sets {value!r}; it wins again at the next boot or `sysctl --system`"
            for key, (conf, value) in sorted(self.configured_elsewhere().items())
        ]

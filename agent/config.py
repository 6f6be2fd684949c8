"""Agent settings: one dataclass, every field with its unit, default and reason.

Settings come from the command line (``agent/cli.py``); validation happens here, whole, before
anything touches the host: a bad value raises ``ConfigError`` and the CLI exits 2.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from agent.logs import LEVELS
from host.paths import HostPaths
from probes import PROBES
from probes.settings import SettingError

DEFAULT_PORT = 9662
HIERARCHY_CHOICES = ("auto", "unified", "cpu")
COLLECTORS = ("throttling", "listen", "ports")  # non-BPF units (agent/collectors/); kube follows --kubeconfig


class ConfigError(ValueError):
    """A setting is invalid; the message says which and why."""


def parse_listen(value: str) -> tuple[str, int]:
    """``host:port``, ``:port`` or ``[v6]:port`` -> (host, port)."""
    host, sep, port_text = value.rpartition(":")
    if not sep:
        raise ConfigError(f"--listen {value!r}: expected HOST:PORT")
    host = host.strip("[]") or "0.0.0.0"
    try:
        port = int(port_text)
    except ValueError:
        raise ConfigError(f"--listen {value!r}: port {port_text!r} is not a number") from None
    if not 0 <= port <= 65535:
        raise ConfigError(f"--listen {value!r}: port out of range 0-65535")
    if host != "localhost":
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise ConfigError(f"--listen {value!r}: {host!r} is not an IP address") from None
    return host, port


def parse_names(flag: str, value: str, known: tuple[str, ...]) -> tuple[str, ...]:
    """``all`` (default), ``none``, or a comma list of names from ``known``, duplicates dropped."""
    if value.strip() in ("all", ""):
        return known
    if value.strip() == "none":
        return ()
    names = tuple(dict.fromkeys(n.strip() for n in value.split(",") if n.strip()))
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ConfigError(f"{flag}: unknown {flag.strip('-')} {', '.join(unknown)}; known: {', '.join(known)}")
    return names


def parse_probes(value: str) -> tuple[str, ...]:
    return parse_names("--probes", value, tuple(PROBES))


def parse_collectors(value: str) -> tuple[str, ...]:
    return parse_names("--collectors", value, COLLECTORS)


def check_listen(host: str, port: int) -> None:
    """The metrics address can be bound here (in use, or not an address of this host: ConfigError),
    checked before anything touches the host; the server binds it again right after."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the HTTP server binds
            s.bind((host, port))
            s.listen(1)
    except OSError as e:
        raise ConfigError(f"--listen {host}:{port}: {e.strerror or e}") from None


def check_profile_file(path: Path, host_root: Path) -> None:
    """Every profile in the file parses and fits this host (reads only); raises ConfigError."""
    from agent.tuning.profile import ProfileError, parse, read_profile_text
    from agent.tuning.validate import build

    try:
        for profile in parse(read_profile_text(path)):
            build(profile, HostPaths(host_root))
    except OSError as e:
        raise ConfigError(f"--profile {path}: {e.strerror}") from None
    except ProfileError as e:
        raise ConfigError(f"--profile {path}: {e}") from None


def check_web_config_file(path: Path) -> None:
    """The web config file loads (certificates and keys included); raises ConfigError."""
    from agent.web_config import WebConfigError, check_file

    try:
        check_file(path)
    except WebConfigError as e:
        raise ConfigError(f"--web-config-file {e}") from None


@dataclass(frozen=True)
class AgentConfig:
    """Settings of ``nodetune run``."""

    listen_host: str = "0.0.0.0"
    """Address the metrics server binds. Default: all addresses, so Prometheus can scrape the pod."""
    listen_port: int = DEFAULT_PORT
    """TCP port of /metrics, /healthz, /readyz. Default 9662 (nodetune's port in the contract)."""
    host_root: Path = Path("/")
    """Where the host's / is visible (DaemonSet: the host mounted at e.g. /host). Default: /."""
    probes: tuple[str, ...] = field(default_factory=lambda: tuple(PROBES))
    """BPF probes to load. Default: all; each one the kernel cannot run is reported, not fatal."""
    log_level: str = "info"
    """One of debug, info, warning, error."""
    cache_dir: Path = Path("/var/cache/nodetune")
    """Private state: merged kernel header trees. Never /lib/modules."""
    max_concurrent_scrapes: int = 4
    """Scrapes served at once; more get HTTP 503 (as node_exporter's --web.max-requests)."""
    http_max_connections: int = 4096
    """Open HTTP connections at most (kept 512 below the open-files limit, which the agent raises to
    its hard limit); when full, a new connection closes the one waiting longest without a request."""
    http_max_header_bytes: int = 16384
    """Bytes of a request's header lines at most; more get HTTP 431 (the request line: 8190, 414)."""
    http_read_timeout_s: float = 10.0
    """Seconds a request head (and a TLS handshake) may take from its first byte; then it is closed."""
    http_idle_timeout_s: float = 30.0
    """Seconds a kept-alive connection may wait for its next request (Prometheus reuses it per scrape)."""
    web_config_file: Path | None = None
    """``--web-config-file``: TLS, client certificates and basic auth in the Prometheus exporter-toolkit
    format (agent/web_config.py); reloaded when it changes. None: plain HTTP, no auth."""
    health_timeout_s: float = 30.0
    """/healthz fails when the main loop has not ticked for this long (seconds)."""
    collectors: tuple[str, ...] = COLLECTORS
    """Non-BPF collectors to run. Default: all. ``ports`` costs a sock_diag walk of each namespace's
    TCP table per scrape (README, Ephemeral ports): large nodes with the shared table may leave it out."""
    probe_settings: Mapping[str, Mapping[str, int]] = field(default_factory=dict)
    """Per probe, its declared settings (``--<probe>-<setting>``; each probe documents its own)."""
    probe_strategies: Mapping[str, str] = field(default_factory=dict)
    """Per probe, the one attach strategy to use (``--<probe>-strategy``); absent: the first of the
    probe's strategies this kernel supports."""
    cgroup_hierarchy: str = "auto"
    """Which cgroup a task is charged to: ``unified`` (v2), ``cpu`` (the v1 cpu controller, for hosts
    whose pods live only in v1 controllers), or ``auto`` (``cpu`` when it holds the pods and v2 does not)."""
    workload_series_grace_s: float = 300.0
    """Seconds a workload label set is still exported after its last cgroup vanished (a restarting
    container's next cgroup continues the same counters). Default 300: CrashLoopBackOff's cap."""
    node_name: str = ""
    """This node's name (``--node-name``, else the ``NODE_NAME`` variable the DaemonSet sets from the
    downward API). Without it no pods are watched."""
    kubeconfig: Path | None = None
    """Kubeconfig for the API server; without it the in-cluster configuration is used inside a pod,
    and no API at all elsewhere (names stay on the cgroup fallback)."""
    ports_top_destinations: int = 5
    """Destinations per network namespace exported by ``nodetune_ephemeral_ports_in_use`` (the busiest;
    saturation covers all of them). Bounds label cardinality: namespaces x this."""
    profile: Path | None = None
    """Tuning profile file (``--profile``); None: the built-in default profile (observe mode only)."""
    mode: str = "observe"
    """``observe`` reports what the profile would change; ``enforce`` applies it and re-applies drift."""
    bpf_stats: bool = False
    """Keep the kernel's BPF run-time statistics on while the agent runs (``BPF_ENABLE_STATS``),
    so ``nodetune_probe_bpf_run_seconds_total`` shows what each probe program costs. It adds two
    clock reads to every run of every BPF program of the node, so it is off by default."""
    maintain_interval_s: float = 5.0
    """Period of the agent's housekeeping timer (row reclaim, relabelling), jittered by +-20 %."""

    def __post_init__(self) -> None:
        if self.log_level not in LEVELS:
            raise ConfigError(f"--log-level {self.log_level!r}: expected one of {', '.join(LEVELS)}")
        if self.max_concurrent_scrapes < 1:
            raise ConfigError("--max-concurrent-scrapes must be at least 1")
        if not 16 <= self.http_max_connections <= 1_000_000:
            raise ConfigError("--http-max-connections must be within 16-1000000")
        if not 1024 <= self.http_max_header_bytes <= 1_048_576:
            raise ConfigError("--http-max-header-bytes must be within 1024-1048576")
        if not 0.1 <= self.http_read_timeout_s <= 600 or not 0.1 <= self.http_idle_timeout_s <= 3600:
            raise ConfigError("--http-read-timeout must be within 0.1-600 s and --http-idle-timeout within 0.1-3600 s")
        if self.web_config_file is not None:
            check_web_config_file(self.web_config_file)
        if self.cgroup_hierarchy not in HIERARCHY_CHOICES:
            raise ConfigError(
                f"--cgroup-hierarchy {self.cgroup_hierarchy!r}: expected one of {', '.join(HIERARCHY_CHOICES)}"
            )
        if not 0 <= self.workload_series_grace_s <= 86400:
            raise ConfigError("--workload-series-grace must be within 0-86400 seconds")
        if not 1 <= self.ports_top_destinations <= 100:
            raise ConfigError("--ports-top-destinations must be within 1-100")
        if not 0.1 <= self.maintain_interval_s <= 3600:
            raise ConfigError("maintain interval must be within 0.1-3600 seconds")
        for probe, values in self.probe_settings.items():
            if probe not in PROBES:
                raise ConfigError(f"settings for unknown probe {probe!r}")
            try:
                PROBES[probe].validate_settings(dict(values))
            except SettingError as e:
                raise ConfigError(str(e)) from None
        for probe, strategy in self.probe_strategies.items():
            if probe not in PROBES:
                raise ConfigError(f"strategy for unknown probe {probe!r}")
            if strategy not in PROBES[probe].strategies:
                known = ", ".join(PROBES[probe].strategies)
                raise ConfigError(f"--{probe}-strategy {strategy!r}: expected one of {known}, or auto")
        if self.kubeconfig is not None and not self.kubeconfig.is_file():
            raise ConfigError(f"--kubeconfig {self.kubeconfig}: not a file")
        if not self.host_root.is_dir():
            raise ConfigError(f"--host-root {self.host_root}: not a directory")
        if self.mode not in ("observe", "enforce"):
            raise ConfigError(f"--mode {self.mode!r}: expected observe or enforce")
        if self.mode == "enforce" and self.profile is None:
            raise ConfigError("--mode enforce needs --profile: the built-in profile is for observe mode only")
        if self.profile is not None:
            check_profile_file(self.profile, self.host_root)

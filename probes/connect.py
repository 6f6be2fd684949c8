"""connect() port-allocation probe: per-workload time to choose a local port, and connects that
found none free (EADDRNOTAVAIL from the ephemeral port search).

Kernel interfaces (``connect.bpf.c``), by attach strategy, most preferred first:

- ``fexit``: fentry and fexit programs on ``__inet_hash_connect()``, the port search itself (its
  parameters' positions from BTF); exact duration and return value;
- ``kprobe``: a kprobe and a kretprobe on the same function, for kernels that refuse tracing
  programs but have kprobes;
- ``tracepoint``: the ``sock:inet_sock_set_state`` tracepoint as a raw tracepoint and, read from
  the socket it passes, ``tcp_sock.tcp_wstamp_ns`` (when the SYN left) and ``total_retrans``;
  needs neither kprobes nor tracing programs;
- ``tracepoint+sock_ops``: the tracepoint and a ``sock_ops`` program
  (``BPF_SOCK_OPS_TCP_CONNECT_CB``) attached to the cgroup v2 root as a BPF link
  (``probes/bpfsys.py``: detached when the agent's fd closes, alongside any other program on that
  hook): exact end, but every TCP socket of the node then runs the cgroup's sock_ops callbacks
  (README, cost table).

Member offsets from BTF.

Exported: ``nodetune_connect_port_search_seconds`` (histogram) and
``nodetune_connect_port_allocation_failures_total``, both with the workload labels.

What each strategy measures and misses: README, "connect() port allocation". The development
kernel refuses tracing programs (EPERM) and has no kprobes: the ``fexit`` and ``kprobe``
strategies are tested on a stock Debian kernel booted under qemu (``tests/kernel_vm.py``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable

from prometheus_client.metrics_core import Metric

from metrics.exposition import CompactHistogram, CompactScalar
from metrics.histogram import NSLOTS, ROW_WORDS
from probes import bpfsys
from probes.base import Probe
from probes.btf import BTFError
from probes.row_table import RowTableSpec
from probes.settings import Setting

log = logging.getLogger(__name__)

FEXIT = "fexit"
KPROBE = "kprobe"
TRACEPOINT = "tracepoint"
TRACEPOINT_SOCKOPS = "tracepoint+sock_ops"
SEARCH_FUNCTION = "__inet_hash_connect"  # net/ipv4/inet_hashtables.c: the ephemeral port search
HIST = "connect_port_search_seconds"
FAILURES_WORD = ROW_WORDS  # after the histogram's slots and sum


class ConnectProbe(Probe):
    """See module docstring."""

    name = "connect"
    strategies = (FEXIT, KPROBE, TRACEPOINT, TRACEPOINT_SOCKOPS)
    source_file = "connect.bpf.c"
    settings = (
        Setting("max_cgroups", 1024, "in-kernel per-workload rows (208 B x CPUs each)", maximum=65536),
        Setting(
            "search_slots",
            4096,
            "port searches in flight at once, direct-mapped by socket or task (32 B each)",
            minimum=64,
            maximum=1 << 20,
            power_of_two=True,
        ),
    )
    stat_reasons = ("slot_busy", "syn_retransmitted")

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self._link_fd: int | None = None

    def row_tables(self) -> tuple[RowTableSpec, ...]:
        return (RowTableSpec(HIST, ROW_WORDS + 1, self.config["max_cgroups"]),)

    def _offsets(self) -> dict[str, int] | str:
        """Offsets of the socket members the C reads, from BTF; or why they are not readable."""
        btf = self.kernel.btf
        if btf is None:
            return f"no kernel BTF at {self.kernel.btf_path} for struct sock offsets"
        wanted = {  # macro: (struct, member, size)
            "SK_PROTOCOL_OFF": ("sock", "sk_protocol", 2),  # a bitfield before 5.6
            "TCP_WSTAMP_OFF": ("tcp_sock", "tcp_wstamp_ns", 8),  # 4.20+
            "TOTAL_RETRANS_OFF": ("tcp_sock", "total_retrans", 4),
        }
        offsets = {}
        for macro, (struct, name, size) in wanted.items():
            try:
                member = btf.member(struct, name)
            except BTFError as e:
                return f"struct {struct} layout not readable: {e}"
            if member.size != size:
                return f"unexpected size of {struct}.{name}: {member.size} B, not {size}"
            offsets[macro] = member.offset
        return offsets

    def _search_params(self) -> tuple[int, int] | str:
        """(index of the socket parameter, parameter count) of the search function, from BTF; or
        why it cannot be hooked. The count moved: 4 parameters in 6.1, 5 since hash_port0 (6.15:
        "inet: call inet6_ehashfn() once from inet6_hash_connect()", March 2025)."""
        btf = self.kernel.btf
        if btf is None:
            return f"no kernel BTF at {self.kernel.btf_path} for {SEARCH_FUNCTION}'s parameters"
        try:
            params = btf.function_params(SEARCH_FUNCTION)
        except BTFError as e:
            return f"{SEARCH_FUNCTION} not hookable (inlined, or renamed): {e}"
        if "sk" not in params:
            return f"{SEARCH_FUNCTION} has no parameter 'sk': {params}"
        return params.index("sk"), len(params)

    def unsupported(self, strategy: str) -> str | None:
        if strategy in (FEXIT, KPROBE):
            if strategy == KPROBE and not (self.kernel.host.sys / "bus/event_source/devices/kprobe").exists():
                return "no kprobes (no kprobe PMU in /sys/bus/event_source/devices: CONFIG_KPROBES off)"
            params = self._search_params()
            if isinstance(params, str):
                return params
            if strategy == KPROBE and params[0] >= 6:
                return f"socket is parameter {params[0] + 1} of {SEARCH_FUNCTION}: not in a register"
        if strategy == TRACEPOINT_SOCKOPS and self.kernel.cgroup2_root is None:
            return "no cgroup v2 hierarchy mounted to attach the sock_ops program to"
        btf = self.kernel.btf
        tracepoint = btf is None or btf.has_function("__traceiter_inet_sock_set_state")
        if strategy in (TRACEPOINT, TRACEPOINT_SOCKOPS) and not tracepoint:
            return "no sock:inet_sock_set_state tracepoint (kernel < 4.16)"
        offsets = self._offsets()
        return offsets if isinstance(offsets, str) else None

    def refused(self, strategy: str) -> str | None:
        """fexit: a stub fexit program on the search function, loaded and closed (bpfsys), tells
        whether the kernel takes tracing programs at all before the probe is compiled for it."""
        btf = self.kernel.btf
        if strategy != FEXIT or btf is None:
            return None
        try:
            refused = bpfsys.tracing_refused(btf.function_id(SEARCH_FUNCTION), bpfsys.BPF_TRACE_FEXIT)
        except BTFError as e:
            return f"{SEARCH_FUNCTION} not in BTF: {e}"
        return f"the kernel refused a stub fexit program on {SEARCH_FUNCTION}: {refused}" if refused else None

    def cflags(self, strategy: str) -> list[str]:
        offsets = self._offsets()
        if isinstance(offsets, str):
            raise ValueError(offsets)
        macro = {FEXIT: "FEXIT", KPROBE: "KPROBE", TRACEPOINT: "TRACEPOINT", TRACEPOINT_SOCKOPS: "TRACEPOINT_SOCKOPS"}[
            strategy
        ]
        hooked: list[str] = []
        if strategy in (FEXIT, KPROBE):
            params = self._search_params()
            if isinstance(params, str):
                raise ValueError(params)
            sk_arg, nargs = params
            hooked = [f"-DHC_SK_ARG={sk_arg}", f"-DHC_NARGS={nargs}", f"-DHC_SK_PARM=PT_REGS_PARM{sk_arg + 1}"]
        return [
            f"-DSTRATEGY_{macro}",
            *hooked,
            f"-DSEARCH_SLOTS={self.config['search_slots']}",
            f"-DFAILURES_WORD={FAILURES_WORD}",
            *(f"-D{macro}={offset}" for macro, offset in offsets.items()),
        ]

    def functions(self, strategy: str) -> list[tuple[str, int]]:
        if strategy != TRACEPOINT_SOCKOPS:
            return []
        from bcc import BPF  # loaded: BCC is importable

        return [("connect_sockops", BPF.SOCK_OPS)]  # loaded by the loader, linked by _link()

    def _after_load(self, strategy: str) -> None:
        if strategy == TRACEPOINT_SOCKOPS:
            self._link()

    def _link(self) -> None:
        from bcc import BPF  # loaded: BCC is importable

        fn = self._bpf.load_func(b"connect_sockops", BPF.SOCK_OPS)  # loaded already (functions()): its fd
        self._link_fd = bpfsys.link_cgroup(fn.fd, str(self.kernel.cgroup2_root), bpfsys.BPF_CGROUP_SOCK_OPS)
        log.info("connect: sock_ops linked to %s", self.kernel.cgroup2_root)

    def _unlink(self) -> None:
        if self._link_fd is not None:
            os.close(self._link_fd)  # the link's last fd: the program leaves the cgroup
            self._link_fd = None

    def _pause_hooks(self) -> None:
        self._unlink()

    def _resume_hooks(self) -> None:
        if self.attach == TRACEPOINT_SOCKOPS:
            self._link()

    def _close_bpf(self) -> None:
        self._unlink()
        super()._close_bpf()

    # --- scrape time ----------------------------------------------------------------------
    def collect_loaded(self) -> Iterable[Metric]:
        hist = CompactHistogram(
            "nodetune_" + HIST,
            "Time the kernel spent choosing a local port for a TCP connect(), per workload: the "
            "port search itself (fexit, kprobe strategies), or from the SYN_SENT state change "
            "before it to the SYN's departure or the connect callback after it (tracepoint "
            "strategies).",
            labels=self.labeler.label_names,
        )
        failures = CompactScalar(
            "nodetune_connect_port_allocation_failures_total",
            "TCP connect() calls that failed because no local port was free for the destination "
            "(EADDRNOTAVAIL from the port search), per workload.",
            "counter",
            self.labeler.label_names,
        )
        for labels, words in sorted(self.series(HIST).items()):
            hist.add(labels, words[:NSLOTS], words[NSLOTS] / 1e9)
            failures.add(labels, words[FAILURES_WORD])
        return [hist, failures]

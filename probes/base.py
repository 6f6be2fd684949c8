"""Probe base class: attach-strategy selection, compile/load through BCC, and kernel facts.

A probe declares its attach strategies in order of preference (cheapest first). ``load()`` takes
the first one this kernel supports: a strategy is skipped when a static check says it cannot work
here (no BTF, no tracefs, ...) and otherwise tried for real, since only the kernel knows (fentry
programs, for instance, are refused with EPERM on kernels that look able to run them). Every
failure while trying a strategy (BTF errors included) passes to the next one; the probe records
the strategy chosen and the reason every other one was passed over, and raises
``ProbeUnavailable`` with all those reasons when none works.

A probe also declares its settings (``probes.settings``), its event-loss reasons (counted in the
``probe_stats`` map of ``common.bpf.h``, exported as ``nodetune_probe_events_lost_total``) and its
per-workload row tables (``probes.row_table``). The program text is ``common.bpf.h`` + the row tables' C +
the probe's own ``.bpf.c``. Probes read their maps only when ``collect()`` is called (at scrape
time), do their housekeeping in ``maintain()`` (the agent's timer), and never import the agent:
workload labels come in through the ``CgroupLabeler`` the agent hands them.
"""

from __future__ import annotations

import abc
import logging
import os
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from importlib import resources
from pathlib import Path
from typing import Any

from prometheus_client.core import CounterMetricFamily
from prometheus_client.metrics_core import Metric

from host.paths import HostPaths
from metrics import histogram
from metrics.workload_series import Labels, Lookup
from probes import bcc_loader
from probes.bcc_loader import LoaderError, load_in_child
from probes.btf import BTF, BTFError
from probes.headers import HeadersNotFound, KernelHeaders, find_headers
from probes.row_table import RowTable, RowTableSeries, RowTableSpec
from probes.settings import Setting, SettingError

log = logging.getLogger(__name__)

UNIFIED, CPU_V1 = "unified", "cpu"  # workload hierarchies: cgroup v2, or the v1 "cpu" controller


class CgroupLabeler(abc.ABC):
    """Maps a workload (cgroup) id, as the probes read it in the kernel, to workload labels."""

    label_names: tuple[str, ...]

    @abc.abstractmethod
    def resolve(self, cgroup_id: int, check_gone: bool = True) -> Lookup:
        """Labels of ``cgroup_id`` (None while unknown) and whether the cgroup is gone for certain.
        ``check_gone=False``: labels suffice (a scrape), a cached answer may be given."""


class IdLabeler(CgroupLabeler):
    """Labels = the id itself; never gone. For tools and benchmarks that run without the agent."""

    label_names = ("cgroup_id",)

    def resolve(self, cgroup_id: int, check_gone: bool = True) -> Lookup:
        return Lookup((str(cgroup_id),))


class ProbeUnavailable(Exception):
    """This probe cannot run on this kernel; ``reason`` says why (every strategy tried)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass
class KernelFacts:
    """What probes need to know about the running kernel, discovered once and shared."""

    release: str = field(default_factory=lambda: os.uname().release)
    host: HostPaths = field(default_factory=HostPaths)
    """Where the host's files are (``--host-root``): headers, kheaders, kallsyms, pid_max, kprobes."""
    btf_path: Path | None = None
    """The kernel's BTF; None: the host's (``host.btf_vmlinux``). Tests inject other files."""
    cache_dir: Path = Path("/var/cache/nodetune")
    workload_hierarchy: str = UNIFIED
    """Which cgroup a task is charged to: its cgroup v2 one, or (``cpu``) its v1 cpu controller's."""
    cgroup2_root: Path | None = None
    """The cgroup v2 hierarchy's root (cgroup BPF programs attach there); None: none mounted."""

    def __post_init__(self) -> None:
        if self.btf_path is None:
            self.btf_path = self.host.btf_vmlinux

    def describe_headers(self) -> str:
        headers = self.headers
        return headers.describe() if isinstance(headers, KernelHeaders) else f"no headers: {headers}"

    @cached_property
    def btf(self) -> BTF | None:
        try:
            return BTF.from_file(self.btf_path)
        except BTFError as e:
            log.info("no usable kernel BTF: %s", e)
            return None

    def forget_btf(self) -> None:
        """Drop the parsed BTF (about 11 MiB of Python objects for a 6.x vmlinux): only loading
        reads it. A later load parses the file again."""
        self.__dict__.pop("btf", None)

    @cached_property
    def task_btf(self) -> bool:
        """bpf_get_current_task_btf() exists (its implementation is a kernel function since 5.11)."""
        return bool(self.btf and self.btf.has_function("bpf_get_current_task_btf"))

    @cached_property
    def headers(self) -> KernelHeaders | HeadersNotFound:
        try:
            return find_headers(self.release, self.host, self.cache_dir)
        except (HeadersNotFound, OSError) as e:
            return e if isinstance(e, HeadersNotFound) else HeadersNotFound(str(e))

    def workload_cflags(self) -> list[str]:
        """Macros for ``workload_id()`` in common.bpf.h; raises BTFError when the hierarchy needs
        offsets this kernel's BTF cannot give. Where BTF has them, the cgroup chain's offsets are
        always passed: with TASK_BTF the v2 id is then read with plain loads instead of a helper."""
        if self.workload_hierarchy not in (UNIFIED, CPU_V1):
            raise ValueError(f"unknown workload hierarchy {self.workload_hierarchy!r}")
        btf = self.btf
        if btf is None:
            if self.workload_hierarchy == CPU_V1:
                raise BTFError(f"the v1 cpu hierarchy needs kernel BTF ({self.btf_path}) for task->cgroups offsets")
            return []
        try:
            kn_id = btf.member("kernfs_node", "id")
            if kn_id.size != 8:
                raise BTFError("kernfs_node.id is not a u64 (kernel < 5.5): cgroup ids are not inode numbers")
            chain = [
                f"-DTASK_CGROUPS_OFF={btf.member('task_struct', 'cgroups').offset}",
                f"-DCGROUP_KN_OFF={btf.member('cgroup', 'kn').offset}",
                f"-DKN_ID_OFF={kn_id.offset}",
            ]
        except BTFError:
            if self.workload_hierarchy == CPU_V1:
                raise
            return []  # the helper, bpf_get_current_cgroup_id(), serves
        if self.workload_hierarchy == UNIFIED:
            try:
                return [*chain, f"-DCSS_SET_DFL_OFF={btf.member('css_set', 'dfl_cgrp').offset}"]
            except BTFError:
                return chain
        subsys = btf.member("css_set", "subsys")
        cpu_id = btf.enum_value("cgroup_subsys_id", "cpu_cgrp_id")
        if (cpu_id + 1) * 8 > subsys.size:
            raise BTFError(f"cpu_cgrp_id {cpu_id} outside css_set.subsys ({subsys.size} bytes)")
        return [
            *chain,
            "-DWORKLOAD_V1_CPU",
            f"-DCSS_SET_CPU_OFF={subsys.offset + 8 * cpu_id}",
            f"-DCSS_CGROUP_OFF={btf.member('cgroup_subsys_state', 'cgroup').offset}",
        ]


# BCC's name prefixes of auto-attached functions (BPF._trace_autoload), by hook kind.
_AUTO_PREFIX = {
    "raw_tracepoint": b"raw_tracepoint__",
    "tracepoint": b"tracepoint__",
    "kprobe": b"kprobe__",
    "kretprobe": b"kretprobe__",
    "kfunc": b"kfunc__",
    "kretfunc": b"kretfunc__",
}
Hooks = list[tuple[str, bytes]]  # (kind, BCC function name) of each auto-attached function


def _detach_kprobe(bpf: Any, ev_name: bytes, fn_name: bytes) -> None:
    """Detach one kprobe BCC attached through the kprobe PMU (perf_event_open): closing its perf
    event fd is the whole detach. BCC's own detach_kprobe*() then also removes a tracefs event
    by writing kprobe_events; without tracefs mounted that write fails and BCC raises, although
    nothing was left to remove (BCC 0.26, src/cc/libbpf.c bpf_detach_probe)."""
    from bcc import lib  # loaded: BCC is importable

    fns = bpf.kprobe_fds[ev_name]
    lib.bpf_close_perf_event_fd(fns[fn_name])
    bpf._del_kprobe_fd(ev_name, fn_name)  # BCC's count of open probes
    if not fns:
        del bpf.kprobe_fds[ev_name]


def detach_kprobes(bpf: Any) -> list[tuple[bytes, bytes]]:
    """Detach every kprobe and kretprobe of ``bpf`` (see ``_detach_kprobe``); their (event, function)
    names, the event of a kretprobe starting with ``r_`` as BCC names it."""
    detached = []
    for ev_name, fns in list(bpf.kprobe_fds.items()):
        for fn_name in list(fns):
            _detach_kprobe(bpf, ev_name, fn_name)
            detached.append((ev_name, fn_name))
    return detached


def detach_hooks(bpf: Any) -> Hooks:
    """Detach every hook BCC auto-attached for ``bpf`` (its RAW_TRACEPOINT_PROBE, TRACEPOINT_PROBE,
    kprobe__/kretprobe__ and KFUNC_PROBE/KRETFUNC_PROBE functions); return them for
    ``attach_hooks``. Programs and maps stay loaded."""
    hooks: Hooks = []
    for tp in list(bpf.raw_tracepoint_fds):
        bpf.detach_raw_tracepoint(tp=tp)
        hooks.append(("raw_tracepoint", _AUTO_PREFIX["raw_tracepoint"] + tp))
    for tp in list(bpf.tracepoint_fds):
        bpf.detach_tracepoint(tp=tp)
        hooks.append(("tracepoint", _AUTO_PREFIX["tracepoint"] + tp.replace(b":", b"__")))
    for ev_name, fn_name in detach_kprobes(bpf):
        hooks.append(("kretprobe" if ev_name.startswith(b"r_") else "kprobe", fn_name))
    for fn_name in list(bpf.kfunc_entry_fds):
        bpf.detach_kfunc(fn_name=fn_name)
        hooks.append(("kfunc", fn_name))
    for fn_name in list(bpf.kfunc_exit_fds):
        bpf.detach_kretfunc(fn_name=fn_name)
        hooks.append(("kretfunc", fn_name))
    return hooks


def attach_hooks(bpf: Any, hooks: Hooks) -> None:
    """Attach again what ``detach_hooks`` detached; the hook point is the function name without
    BCC's prefix (``kprobe__tcp_connect`` -> tcp_connect), as BCC's auto-attach reads it."""
    for kind, fn_name in hooks:
        point = fn_name[len(_AUTO_PREFIX[kind]) :]
        if kind == "raw_tracepoint":
            bpf.attach_raw_tracepoint(tp=point, fn_name=fn_name)
        elif kind == "tracepoint":
            bpf.attach_tracepoint(tp=point.replace(b"__", b":"), fn_name=fn_name)
        elif kind == "kprobe":
            bpf.attach_kprobe(event=point, fn_name=fn_name)
        elif kind == "kretprobe":
            bpf.attach_kretprobe(event=point, fn_name=fn_name)
        elif kind == "kfunc":
            bpf.attach_kfunc(fn_name=fn_name)
        else:
            bpf.attach_kretfunc(fn_name=fn_name)


class Probe(abc.ABC):
    """One BPF program set with its maps; see module docstring for the lifecycle."""

    name: str = ""
    strategies: tuple[str, ...] = ()  # attach strategies, most preferred first
    source_file: str = ""  # C source shipped as package data next to this module
    settings: tuple[Setting, ...] = ()  # --<name>-<setting> flags, passed to __init__ as keywords
    stat_reasons: tuple[str, ...] = ()  # event-loss reasons: STAT_<REASON> in the C
    info_stats: tuple[str, ...] = ()  # per-CPU counters that are not losses (e.g. fallbacks taken)

    def __init__(
        self,
        kernel: KernelFacts,
        labeler: CgroupLabeler | None = None,
        only_strategies: Sequence[str] | None = None,
        series_grace_s: float = 300.0,
        **settings: int,
    ) -> None:
        self.kernel = kernel
        self.labeler = labeler or IdLabeler()
        self.only_strategies = tuple(only_strategies) if only_strategies else None
        self.series_grace_s = series_grace_s
        self.config = self.validate_settings(settings)
        self.attach: str | None = None  # strategy in use once loaded
        self.skipped: dict[str, str] = {}  # strategy -> why it was not used
        self.workload_tables: dict[str, RowTableSeries] = {}
        self.keyed_tables: dict[str, RowTable] = {}  # row tables keyed by something else than a workload
        self._bpf: Any = None
        self._paused: Hooks | None = None  # what pause() detached
        self._lock = threading.Lock()

    @classmethod
    def validate_settings(cls, values: dict[str, int]) -> dict[str, int]:
        """All settings of this probe (defaults filled in), validated; raises SettingError."""
        known = {s.name: s for s in cls.settings}
        unknown = set(values) - set(known)
        if unknown:
            raise SettingError(f"probe {cls.name}: unknown settings {sorted(unknown)}")
        return {n: s.validate(cls.name, values.get(n, s.default)) for n, s in known.items()}

    # --- pure parts -----------------------------------------------------------------------
    def source(self) -> str:
        return resources.files("probes").joinpath(self.source_file).read_text()

    def row_tables(self) -> tuple[RowTableSpec, ...]:
        """Per-workload row tables this probe aggregates into (probes/row_table.py)."""
        return ()

    def lost_reasons(self) -> tuple[str, ...]:
        reasons = (rs.full_reason for rs in self.row_tables())
        return tuple(dict.fromkeys((*reasons, *self.stat_reasons)))

    def all_stat_reasons(self) -> tuple[str, ...]:
        """Every counter of the probe_stats map, in index order: losses first, then info stats."""
        return (*self.lost_reasons(), *self.info_stats)

    @abc.abstractmethod
    def cflags(self, strategy: str) -> list[str]:
        """The probe's own macros for ``strategy``; raise (ValueError, BTFError) if impossible."""

    def render(self, strategy: str | None = None) -> tuple[str, list[str]]:
        """C text and cflags for ``strategy`` (default: the most preferred). Pure but for BTF reads."""
        strategy = strategy or self.strategies[0]
        reasons = self.all_stat_reasons()
        common = resources.files("probes").joinpath("common.bpf.h").read_text()
        text = "\n".join([common, *(rs.c_source() for rs in self.row_tables()), self.source()])
        flags = [
            *histogram.cflags(),
            f"-DNSTATS={max(len(reasons), 1)}",
            *(f"-DSTAT_{r.upper()}={i}" for i, r in enumerate(reasons)),
            *self.kernel.workload_cflags(),
            *(["-DTASK_BTF"] if self.uses_task_btf() else []),
            *self.cflags(strategy),
        ]
        return text, flags

    def uses_task_btf(self) -> bool:
        return self.kernel.task_btf

    def unsupported(self, strategy: str) -> str | None:
        """Why ``strategy`` cannot work here without trying it, or None if worth a try."""
        return None

    def refused(self, strategy: str) -> str | None:
        """Why the running kernel refuses ``strategy``, found by a trial much cheaper than compiling
        the probe (e.g. loading a stub program); None: worth compiling. Asked after ``unsupported``."""
        return None

    # --- kernel parts ---------------------------------------------------------------------
    def _candidates(self) -> tuple[str, ...]:
        if self.only_strategies is None:
            return self.strategies
        unknown = set(self.only_strategies) - set(self.strategies)
        if unknown:
            raise ValueError(f"{self.name}: unknown attach strategies {sorted(unknown)}")
        return tuple(s for s in self.strategies if s in self.only_strategies)

    def prefetch(self) -> None:
        """Work out, ahead of ``load()``, the facts its checks read in Python: the kernel's BTF
        (0.2 s to parse here), each candidate strategy's ``unsupported()`` check (lockstat's reads
        /proc/kallsyms, 0.5 s). Reads only, nothing before the kernel's headers are known, and
        never raises: ``load()`` finds any error again.

        Why: a BCC compile runs in C without the GIL (0.7-1 s a probe), so the daemon calls this for
        the next probes on a helper thread while the current one compiles, and that Python time is
        no longer added to the start (agent/daemon.py ``load_probes``)."""
        kernel = self.kernel
        # Headers are found (and maybe merged into the cache) by the loader before any prefetch:
        # never on this thread, where it would build trees while another probe compiles.
        if isinstance(kernel.__dict__.get("headers", HeadersNotFound()), HeadersNotFound):
            return
        try:
            kernel.btf  # noqa: B018 (cached properties, shared by every probe: parsed once)
            kernel.task_btf  # noqa: B018
            for strategy in self._candidates():
                self.unsupported(strategy)
        except Exception as e:  # load() meets it again and says so
            log.debug("probe %s: prefetch: %s: %s", self.name, type(e).__name__, e)

    def load(self) -> None:
        """Compile, load and attach with the first strategy that works; raise ProbeUnavailable."""
        headers = self.kernel.headers
        if isinstance(headers, HeadersNotFound):
            raise ProbeUnavailable(str(headers))
        try:
            import bcc  # noqa: F401 (Debian's python3-bpfcc, for its table classes; late so unit tests need no BCC)
        except ImportError as e:
            raise ProbeUnavailable(f"BCC python module not importable: {e}") from e
        for strategy in self._candidates():
            try:
                reason = self.unsupported(strategy) or self.refused(strategy)
                if reason is None:
                    text, cflags = self.render(strategy)
                    self._before_load(strategy)
                    self._bpf = load_in_child(text, cflags, self.functions(strategy), headers.path or None)
                    self._attach_rows()
                    self._after_load(strategy)
                    self.attach = strategy
                    log.info("probe %s attached via %s", self.name, strategy)
                    return
            except Exception as e:  # BCC raises bare Exception for compile/load/attach errors
                reason = self.failure_reason(strategy, e)
                self._close_bpf()
                self._after_close(strategy)
            self.skipped[strategy] = reason
            log.debug("probe %s: strategy %s not used: %s", self.name, strategy, reason)
        tried = "; ".join(f"{s}: {r}" for s, r in self.skipped.items()) or "no strategy selected"
        raise ProbeUnavailable(tried)

    def settle(self) -> None:  # noqa: B027 - optional hook
        """Hook: work the probe needs once loaded but not before the agent is ready (the daemon
        calls it after ``/readyz`` turns 200, before the first timer tick)."""

    def functions(self, strategy: str) -> list[tuple[str, int]]:
        """Programs to load besides the auto-attached ones, as (function name, BCC program type):
        the probe attaches them itself in ``_after_load`` (``self._bpf.load_func`` then returns
        the loaded program). Loading happens in the loader's child (probes/bcc_loader.py)."""
        return []

    def failure_reason(self, strategy: str, error: Exception) -> str:
        """What to record when trying ``strategy`` raised ``error``. BCC reports EPERM from
        BPF_PROG_LOAD as "Need super-user privileges to run" even for root, so that case is named
        for what it is here: the kernel refused this kind of program."""
        text = str(error) if isinstance(error, LoaderError) else f"{type(error).__name__}: {error}".strip()
        if "Need super-user privileges" in text and os.geteuid() == 0:
            return f"the kernel refused the programs with EPERM although we are root ({text})"
        return text

    def _attach_rows(self) -> None:
        """Wrap every row table; each is kept as soon as it is made, so that a failure on a later
        one still closes the earlier ones (``_close_bpf``)."""
        self.workload_tables, self.keyed_tables = {}, {}
        for spec in self.row_tables():
            rows = RowTable(spec, self.table)
            if spec.per_workload:
                self.workload_tables[spec.name] = RowTableSeries(rows, self.labeler.resolve, self.series_grace_s)
            else:
                self.keyed_tables[spec.name] = rows

    def _before_load(self, strategy: str) -> None:  # noqa: B027 - optional hook
        """Hook: prepare the host for ``strategy`` (e.g. make tracefs visible)."""

    def _after_load(self, strategy: str) -> None:  # noqa: B027 - optional hook
        """Hook: work needed once the program is attached."""

    def _after_close(self, strategy: str) -> None:  # noqa: B027 - optional hook
        """Hook: undo ``_before_load``."""

    def table(self, name: str) -> Any:
        if self._bpf is None:
            raise RuntimeError(f"probe {self.name} is not loaded")
        return self._bpf[name.encode()]

    # --- scrape and timer -----------------------------------------------------------------
    def maintain(self) -> None:
        """Agent timer: reclaim rows of vanished cgroups, follow label changes. Never on a scrape."""
        with self._lock:
            if self._bpf is None:
                return
            for rows in self.workload_tables.values():
                rows.maintain()

    def read_stats(self) -> dict[str, int]:
        table = self.table("probe_stats")
        return {reason: sum(table[table.Key(i)]) for i, reason in enumerate(self.all_stat_reasons())}

    def series(self, rows: str) -> dict[Labels, list[int]]:
        """Label set -> monotonic counters of one row table (scrape time)."""
        return self.workload_tables[rows].collect()

    def lost_family(self) -> Metric:
        lost = CounterMetricFamily(
            "nodetune_probe_events_lost",
            "Events a probe could not account, by reason (bounded maps full, unknown owner).",
            labels=["probe", "reason"],
        )
        stats = self.read_stats()
        for reason in self.lost_reasons():
            lost.add_metric([self.name, reason], stats[reason])
        return lost

    def collect(self) -> Iterable[Metric]:
        """Metrics from the maps; called at scrape time only. Reads, never changes state."""
        with self._lock:
            if self._bpf is None:
                return []
            return [*self.collect_loaded(), self.lost_family()]

    @abc.abstractmethod
    def collect_loaded(self) -> Iterable[Metric]:
        """The probe's own families (called with the probe loaded and locked)."""

    def _close_bpf(self) -> None:
        self._paused = None
        for series in self.workload_tables.values():
            series.rows.close()
        for rows in self.keyed_tables.values():
            rows.close()
        self.workload_tables = {}
        self.keyed_tables = {}
        if self._bpf is not None:
            try:
                detach_kprobes(self._bpf)  # before BCC's cleanup(), which would write kprobe_events
            finally:
                bpf, self._bpf = self._bpf, None
                bcc_loader.close(bpf)

    def close(self) -> None:
        """Detach and free everything; safe to call twice or on a probe that never loaded."""
        with self._lock:
            strategy = self.attach
            self._close_bpf()
            self.attach = None
            if strategy is not None:
                self._after_close(strategy)

    # --- benchmarks -----------------------------------------------------------------------
    def pause(self) -> None:
        """Detach every hook of the loaded probe, keeping its programs and maps: its counters
        stand still until ``resume()``. For A/B benchmarks (bench/), which can then alternate
        arms in milliseconds instead of recompiling between runs."""
        with self._lock:
            if self._bpf is None:
                raise RuntimeError(f"probe {self.name} is not loaded")
            if self._paused is None:
                self._paused = detach_hooks(self._bpf)
                self._pause_hooks()

    def resume(self) -> None:
        """Attach again what ``pause()`` detached."""
        with self._lock:
            if self._bpf is not None and self._paused is not None:
                attach_hooks(self._bpf, self._paused)
                self._resume_hooks()
                self._paused = None

    def _pause_hooks(self) -> None:  # noqa: B027 - optional hook
        """Hook: detach what ``_after_load`` attached itself."""

    def _resume_hooks(self) -> None:  # noqa: B027 - optional hook
        """Hook: attach again what ``_pause_hooks`` detached."""

    def program_fds(self) -> dict[str, int]:
        """Loaded program name -> fd (for bpf_stats in bench/ and tests)."""
        if self._bpf is None:
            return {}
        return {name.decode() if isinstance(name, bytes) else name: fn.fd for name, fn in self._bpf.funcs.items()}

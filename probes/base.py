"""Probe base class: attach-strategy selection, compile/load through BCC, and kernel facts.

A probe declares its attach strategies in order of preference (cheapest first). ``load()`` takes
the first one this kernel supports: a strategy is skipped when a static check says it cannot work
here (no BTF, no tracefs, ...) and otherwise tried for real, since only the kernel knows (fentry
programs, for instance, are refused with EPERM on kernels that look able to run them). The probe
records the strategy chosen and the reason every other one was passed over; a probe with no
working strategy raises ``ProbeUnavailable`` with all those reasons.

Probes read their maps only when ``collect()`` is called (at scrape time) and never import the
agent: workload labels come in through the ``CgroupLabeler`` the agent hands them.
"""

from __future__ import annotations

import abc
import logging
import os
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from importlib import resources
from pathlib import Path
from typing import Any

from prometheus_client.metrics_core import Metric

from probes.btf import BTF, BTFError
from probes.headers import HeadersNotFound, KernelHeaders, find_headers

log = logging.getLogger(__name__)

# Label values for one cgroup id, in the order of CgroupLabeler.label_names; None = cgroup is gone.
CgroupLabels = tuple[str, ...] | None


class CgroupLabeler(abc.ABC):
    """Maps a cgroup v2 id (as returned by bpf_get_current_cgroup_id) to workload labels."""

    label_names: tuple[str, ...]

    @abc.abstractmethod
    def labels_for_cgroup_id(self, cgroup_id: int) -> CgroupLabels: ...


class ProbeUnavailable(Exception):
    """This probe cannot run on this kernel; ``reason`` says why (every strategy tried)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass
class KernelFacts:
    """What probes need to know about the running kernel, discovered once and shared."""

    release: str = field(default_factory=lambda: os.uname().release)
    btf_path: Path = Path("/sys/kernel/btf/vmlinux")
    host_root: Path = Path("/")
    sys_root: Path = Path("/sys")
    proc_root: Path = Path("/proc")
    cache_dir: Path = Path("/var/cache/nodetune")

    def describe_headers(self) -> str:
        headers = self.headers
        return headers.describe() if isinstance(headers, KernelHeaders) else f"no headers: {headers}"

    @cached_property
    def btf(self) -> BTF | None:
        try:
            return BTF.from_file(self.btf_path)
        except BTFError as e:
            log.info("no kernel BTF: %s", e)
            return None

    @cached_property
    def headers(self) -> KernelHeaders | HeadersNotFound:
        try:
            return find_headers(self.release, self.host_root, self.sys_root, self.cache_dir)
        except (HeadersNotFound, OSError) as e:
            return e if isinstance(e, HeadersNotFound) else HeadersNotFound(str(e))


class Probe(abc.ABC):
    """One BPF program set with its maps; see module docstring for the lifecycle."""

    name: str = ""
    strategies: tuple[str, ...] = ()  # attach strategies, most preferred first
    source_file: str = ""  # C source shipped as package data next to this module

    def __init__(
        self,
        kernel: KernelFacts,
        labeler: CgroupLabeler | None = None,
        only_strategies: Sequence[str] | None = None,
    ) -> None:
        self.kernel = kernel
        self.labeler = labeler
        self.only_strategies = tuple(only_strategies) if only_strategies else None
        self.attach: str | None = None  # strategy in use once loaded
        self.skipped: dict[str, str] = {}  # strategy -> why it was not used
        self._bpf: Any = None
        self._lock = threading.Lock()

    # --- pure parts -----------------------------------------------------------------------
    def source(self) -> str:
        return resources.files("probes").joinpath(self.source_file).read_text()

    @abc.abstractmethod
    def render(self, strategy: str | None = None) -> tuple[str, list[str]]:
        """C text and cflags for ``strategy`` (default: the most preferred). Pure."""

    def unsupported(self, strategy: str) -> str | None:
        """Why ``strategy`` cannot work here without trying it, or None if worth a try."""
        return None

    # --- kernel parts ---------------------------------------------------------------------
    def _candidates(self) -> tuple[str, ...]:
        if self.only_strategies is None:
            return self.strategies
        unknown = set(self.only_strategies) - set(self.strategies)
        if unknown:
            raise ValueError(f"{self.name}: unknown attach strategies {sorted(unknown)}")
        return tuple(s for s in self.strategies if s in self.only_strategies)

    def load(self) -> None:
        """Compile, load and attach with the first strategy that works; raise ProbeUnavailable."""
        headers = self.kernel.headers
        if isinstance(headers, HeadersNotFound):
            raise ProbeUnavailable(str(headers))
        headers.apply_env()
        try:
            from bcc import BPF  # Debian's python3-bpfcc; imported late so unit tests need no BCC
        except ImportError as e:
            raise ProbeUnavailable(f"BCC python module not importable: {e}") from e
        for strategy in self._candidates():
            reason = self.unsupported(strategy)
            if reason is None:
                try:
                    text, cflags = self.render(strategy)
                    self._before_load(strategy)
                    self._bpf = BPF(text=text.encode(), cflags=cflags)
                    self._after_load(strategy)
                    self.attach = strategy
                    log.info("probe %s attached via %s", self.name, strategy)
                    return
                except Exception as e:  # BCC raises bare Exception for compile/load/attach errors
                    reason = f"{type(e).__name__}: {e}".strip()
                    self._close_bpf()
                    self._after_close(strategy)
            self.skipped[strategy] = reason
            log.debug("probe %s: strategy %s not used: %s", self.name, strategy, reason)
        tried = "; ".join(f"{s}: {r}" for s, r in self.skipped.items()) or "no strategy selected"
        raise ProbeUnavailable(tried)

    def _before_load(self, strategy: str) -> None:  # noqa: B027 - optional hook
        """Hook: prepare the host for ``strategy`` (e.g. make tracefs visible)."""

    def _after_load(self, strategy: str) -> None:  # noqa: B027 - optional hook
        """Hook: work needed once the program is attached (e.g. sizing tables)."""

    def _after_close(self, strategy: str) -> None:  # noqa: B027 - optional hook
        """Hook: undo ``_before_load``."""

    def table(self, name: str) -> Any:
        if self._bpf is None:
            raise RuntimeError(f"probe {self.name} is not loaded")
        return self._bpf[name.encode()]

    @abc.abstractmethod
    def collect(self) -> Iterable[Metric]:
        """Metrics from the maps; called at scrape time only."""

    def _close_bpf(self) -> None:
        if self._bpf is not None:
            try:
                self._bpf.cleanup()
            finally:
                self._bpf = None

    def close(self) -> None:
        """Detach and free everything; safe to call twice or on a probe that never loaded."""
        with self._lock:
            strategy = self.attach
            self._close_bpf()
            self.attach = None
            if strategy is not None:
                self._after_close(strategy)

    def program_fds(self) -> dict[str, int]:
        """Loaded program name -> fd (for bpf_stats in bench/ and tests)."""
        if self._bpf is None:
            return {}
        return {name.decode() if isinstance(name, bytes) else name: fn.fd for name, fn in self._bpf.funcs.items()}


ProbeFactory = Callable[..., Probe]

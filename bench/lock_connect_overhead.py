"""Cost of the lockstat and connect probes, and the syscall tax of all default probes. Not a test.

1. lockstat on a contention-heavy workload: ``perf bench epoll wait -t 4`` (~67,000 spinlock and
   ~32,000 mutex contentions per second on 2 CPUs: the epoll instance's lock and mutex), ops/s
   off vs on vs an empty program pair on the same tracepoints (the floor of any tool using them),
   interleaved rounds: median of the per-round cost ratios; kernel bpf_stats ns per event of
   contention_begin and contention_end. (``tests/contention.py``'s pipe workload contends more but
   its throughput swings by 2x between identical runs here: unusable for a ratio.)
2. connect on a loopback connect()/close() storm (``bench/connect_storm.c``, compiled here with
   gcc: a C loop, so the kernel path dominates, not an interpreter): connects per second off vs on,
   median ratio; bpf_stats ns per event of the tracepoint and sock_ops programs.
3. Syscall tax: ``perf bench syscall basic`` (getppid in a loop) with every default probe loaded
   (runqlat, lockstat, connect) vs none: median of per-round usecs/op ratios. None of the default
   strategies uses a syscalls:* tracepoint; this shows it.

Ratios are measured with bpf_stats off, the ns/event in a separate run with it on. Run as root:
``make bench-locks`` (``LOCK_ARGS="--rounds 10"``). bpf_stats is restored on exit; processes
started here are ended by pid.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from agent.paths import HostPaths  # noqa: E402
from bench.runqlat_overhead import STATS, prog_stats  # noqa: E402
from probes.base import KernelFacts, Probe  # noqa: E402
from probes.connect import ConnectProbe  # noqa: E402
from probes.lockstat import LockstatProbe  # noqa: E402
from probes.runqlat import RunqlatProbe  # noqa: E402


def kernel() -> KernelFacts:
    return KernelFacts(cgroup2_root=HostPaths().cgroup_v2())


def loaded(classes: tuple[type[Probe], ...]) -> list[Probe]:
    probes = [cls(kernel()) for cls in classes]  # type: ignore[call-arg]
    for p in probes:
        p.load()
    return probes


def close(probes: list[Probe]) -> None:
    for p in probes:
        p.close()


def perf_number(argv: list[str], pattern: str) -> float:
    """Run a ``perf bench`` and return the number its output shows where ``pattern`` matches."""
    out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    m = re.search(pattern, out)
    if not m:
        raise RuntimeError(f"unexpected perf output: {out}")
    return float(m.group(1))


def epoll_ops(seconds: int) -> float:
    return perf_number(
        ["perf", "bench", "epoll", "wait", "-t", "4", "-r", str(seconds)], r"Averaged (\d+) operations/sec"
    )


class EmptyLockPrograms:
    """Empty programs on contention_begin/_end: what the hooks cost any tool, as a floor."""

    name = "empty"

    def __init__(self, kernel: KernelFacts) -> None:
        self.bpf = None

    def load(self) -> None:
        from bcc import BPF

        self.bpf = BPF(
            text=b"RAW_TRACEPOINT_PROBE(contention_begin) { return 0; }\n"
            b"RAW_TRACEPOINT_PROBE(contention_end) { return 0; }"
        )

    def close(self) -> None:
        self.bpf.cleanup()

    def program_fds(self) -> dict[str, int]:
        return {}


def storm_rate(binary: Path, n: int) -> float:
    return float(subprocess.run([str(binary), str(n)], capture_output=True, text=True, check=True).stdout)


def syscall_usecs(loops: int) -> float:
    return perf_number(["perf", "bench", "syscall", "basic", "-l", str(loops)], r"([\d.]+)\s+usecs/op")


class EmptyConnectPrograms:
    """Empty programs on the connect probe's hooks (the raw tracepoint and a sock_ops link on the
    cgroup root): the floor of any tool using them."""

    name = "empty"

    def __init__(self, kernel: KernelFacts) -> None:
        self.bpf = None
        self.link = -1

    def load(self) -> None:
        from bcc import BPF

        from probes import bpfsys

        self.bpf = BPF(
            text=b"RAW_TRACEPOINT_PROBE(inet_sock_set_state) { return 0; }\n"
            b"int empty_sockops(struct bpf_sock_ops *skops) { return 1; }"
        )
        fn = self.bpf.load_func(b"empty_sockops", BPF.SOCK_OPS)
        fd = os.open(str(HostPaths().cgroup_v2()), os.O_RDONLY | os.O_DIRECTORY)
        try:
            self.link = bpfsys.link_create(fn.fd, fd, bpfsys.BPF_CGROUP_SOCK_OPS)
        finally:
            os.close(fd)

    def close(self) -> None:
        os.close(self.link)
        self.bpf.cleanup()

    def program_fds(self) -> dict[str, int]:
        return {}


def ab(
    name: str, rounds: int, arms: dict[str, tuple[type, ...]], run: Callable[[], float], higher_is_better: bool
) -> None:
    """Interleaved rounds of ``run`` with nothing loaded and with each arm's probes, the order
    rotating every round (bpf_stats off: its clock reads would be charged to the arms); prints
    each arm's median per-round cost ratio against the unloaded run of the same round."""
    ratios: dict[str, list[float]] = {arm: [] for arm in arms}
    states = ["off", *arms]
    for r in range(rounds):
        order = states[r % len(states) :] + states[: r % len(states)]
        results = {}
        for state in order:
            probes = loaded(arms[state]) if state != "off" else []
            try:
                results[state] = run()
            finally:
                close(probes)
        line = []
        for arm in arms:
            ratio = results["off"] / results[arm] if higher_is_better else results[arm] / results["off"]
            ratios[arm].append(ratio)
            line.append(f"{arm} x{ratio:.3f}")
        print(f"  {name} round {r + 1}: off {results['off']:.4g}; " + ", ".join(line), flush=True)
    for arm, values in ratios.items():
        median, low, high = statistics.median(values), min(values), max(values)
        print(f"{name} {arm}: median cost ratio x{median:.3f} (min {low:.3f}, max {high:.3f})")


def per_event(classes: tuple[type[Probe], ...], run: Callable[[], float]) -> None:
    """Kernel bpf_stats of each program over one run: ns per event."""
    saved = STATS.read_text()
    probes = loaded(classes)
    try:
        STATS.write_text("1\n")
        fds = {fd: f"{p.name}:{prog}" for p in probes for prog, fd in p.program_fds().items()}
        before = prog_stats(os.getpid())
        run()
        after = prog_stats(os.getpid())
    finally:
        STATS.write_text(saved)
        close(probes)
    for fd, label in sorted(fds.items(), key=lambda kv: kv[1]):
        ns = after.get(fd, (0, 0))[0] - before.get(fd, (0, 0))[0]
        cnt = after.get(fd, (0, 0))[1] - before.get(fd, (0, 0))[1]
        if cnt:
            print(f"  bpf_stats {label}: {ns / cnt:.0f} ns/event over {cnt} events")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--seconds", type=int, default=3, help="perf bench epoll wait -r")
    ap.add_argument("--connects", type=int, default=50000, help="connects per storm run")
    ap.add_argument("--syscalls", type=int, default=5_000_000, help="perf bench syscall basic -l")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("bench needs root", file=sys.stderr)
        return 1
    kernel().headers.apply_env()
    print(f"kernel {os.uname().release}; {os.cpu_count()} CPUs; {args.rounds} interleaved rounds")
    with tempfile.TemporaryDirectory() as tmp:
        storm = Path(tmp) / "connect_storm"
        subprocess.run(["gcc", "-O2", "-o", str(storm), str(REPO / "bench/connect_storm.c")], check=True)
        print("\n### lockstat: perf bench epoll wait -t 4 (ops/s), 2 CPUs")
        lock_arms = {"lockstat": (LockstatProbe,), "empty programs": (EmptyLockPrograms,)}
        ab("lockstat", args.rounds, lock_arms, lambda: epoll_ops(args.seconds), True)
        per_event((LockstatProbe,), lambda: epoll_ops(args.seconds))
        print("\n### connect: loopback connect()/close() storm (connects/s)")
        connect_arms = {"connect": (ConnectProbe,), "empty programs": (EmptyConnectPrograms,)}
        ab("connect", args.rounds, connect_arms, lambda: storm_rate(storm, args.connects), True)
        per_event((ConnectProbe,), lambda: storm_rate(storm, args.connects))
    print("\n### syscall tax: perf bench syscall basic (usecs/op), all default probes vs none")
    arms = {"all probes": (RunqlatProbe, LockstatProbe, ConnectProbe)}
    ab("syscall", args.rounds, arms, lambda: syscall_usecs(args.syscalls), False)
    return 0


if __name__ == "__main__":
    sys.exit(main())

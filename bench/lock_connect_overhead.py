"""Cost of the lockstat and connect probes, and the syscall tax of all default probes. Not a test.

1. lockstat on a contention-heavy workload: ``perf bench epoll wait -t 4`` (~67,000 spinlock and
   ~32,000 mutex contentions per second on 2 CPUs: the epoll instance's lock and mutex), ops/s
   off vs on vs an empty program pair on the same tracepoints (the floor of any tool using them),
   interleaved rounds: median of the per-round cost ratios; kernel bpf_stats ns per event of
   contention_begin and contention_end. (``tests/contention.py``'s pipe workload contends more but
   its throughput swings by 2x between identical runs here: unusable for a ratio.)
   Then the same on ``bench/lock_storm.c`` (4 threads modifying their own fd on one epoll
   instance: 1 to 3 million contentions of its mutex per second, ten times the above, and steady
   enough to resolve a few per cent), with a third arm: lockstat timing every wait
   (``--lockstat-timed-waits 0``), what the timing budget saves.
2. connect on a loopback connect()/close() storm (``bench/connect_storm.c``, compiled here with
   gcc: a C loop, so the kernel path dominates, not an interpreter): connects per second off vs
   each strategy this kernel takes vs empty programs on each strategy's hooks, median ratio
   (``--storm-rounds-factor`` times as many rounds: its runs are short); bpf_stats ns per event
   of each strategy's programs. A strategy the kernel refuses is listed with the reason. For
   the fexit and kprobe strategies on a machine whose kernel refuses them, ``make bench-guest``
   runs this section in the tests' stock-kernel guest with an instruction-counting clock
   (``python -m tests.kernel_vm --accel=icount``): ratios of instructions, steady to 0.5 %.
   (Under plain emulation the storm's rounds swing by 25 % and more.)
3. Syscall tax: ``perf bench syscall basic`` (getppid in a loop) with every default probe loaded
   (runqlat, lockstat, connect) vs none: median of per-round usecs/op ratios. None of the default
   strategies uses a syscalls:* tracepoint; this shows it.

On the storms the machine's swings (±30 % between identical runs here) can hide a few per cent: the
bpf_stats runs are repeated ``--rounds`` times, and each gives a worst-case
bound on the cost ratio the programs' own time can cause, W/(W−B) (``per_event``): a figure the
noise moves by its share only, reported next to the interleaved ratio (bench/report.py).

Every arm is compiled and loaded once, then paused (``Probe.pause()``: hooks detached, maps
kept); a round resumes one arm at a time, so its runs follow each other within milliseconds.
Ratios are measured with bpf_stats off, the ns/event in a separate run with it on (bpf_stats
itself adds about 70 ns per event here: an empty program reads 71-81 ns). Run as root:
``make bench-locks`` (``LOCK_ARGS="--rounds 10"``). bpf_stats is restored on exit; processes
started here are ended by pid.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.runqlat_overhead import STATS, prog_stats  # noqa: E402
from host.paths import HostPaths  # noqa: E402
from probes import bpfsys  # noqa: E402
from probes.base import Hooks, KernelFacts, Probe, ProbeUnavailable, attach_hooks, detach_hooks, detach_kprobes  # noqa: E402
from probes.connect import FEXIT, KPROBE, TRACEPOINT_SOCKOPS, ConnectProbe  # noqa: E402
from probes.lockstat import LockstatProbe  # noqa: E402
from probes.runqlat import RunqlatProbe  # noqa: E402


def kernel() -> KernelFacts:
    return KernelFacts(cgroup2_root=HostPaths().cgroup_v2())


def probe(cls: type[Probe], strategy: str | None = None, **settings: int) -> Callable[[], Probe]:
    """A factory of ``cls`` on this kernel, limited to ``strategy`` if given."""
    return partial(cls, kernel(), only_strategies=[strategy] if strategy else None, **settings)  # type: ignore[arg-type]


def loaded(factories: tuple[Callable[[], Probe], ...]) -> list[Probe]:
    probes = [factory() for factory in factories]
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


class EmptyPrograms:
    """Empty programs on a probe's hooks: what the hooks cost any tool using them, as a floor.
    ``sock_ops``: also an empty sock_ops program linked to the cgroup v2 root."""

    name = "empty"

    def __init__(self, text: bytes, sock_ops: bool = False) -> None:
        self.text, self.sock_ops = text, sock_ops
        self.bpf: Any = None
        self.link = -1
        self.hooks: Hooks | None = None

    def load(self) -> None:
        from bcc import BPF

        self.bpf = BPF(text=self.text + (b"\nint empty_sockops(struct bpf_sock_ops *s) { return 1; }" * self.sock_ops))
        self._link()

    def _link(self) -> None:
        if self.sock_ops:
            from bcc import BPF

            fn = self.bpf.load_func(b"empty_sockops", BPF.SOCK_OPS)
            self.link = bpfsys.link_cgroup(fn.fd, str(HostPaths().cgroup_v2()), bpfsys.BPF_CGROUP_SOCK_OPS)

    def pause(self) -> None:
        self.hooks = detach_hooks(self.bpf)
        if self.link >= 0:
            os.close(self.link)
            self.link = -1

    def resume(self) -> None:
        if self.hooks is not None:
            attach_hooks(self.bpf, self.hooks)
            self.hooks = None
            self._link()

    def close(self) -> None:
        if self.link >= 0:
            os.close(self.link)
        detach_kprobes(self.bpf)
        self.bpf.cleanup()

    def program_fds(self) -> dict[str, int]:
        return {}


EMPTY_LOCK = b"RAW_TRACEPOINT_PROBE(contention_begin) { return 0; }\nRAW_TRACEPOINT_PROBE(contention_end) { return 0; }"
EMPTY_STATE = b"RAW_TRACEPOINT_PROBE(inet_sock_set_state) { return 0; }"
EMPTY_HOOKED = {
    FEXIT: b"KFUNC_PROBE(__inet_hash_connect) { return 0; }\nKRETFUNC_PROBE(__inet_hash_connect) { return 0; }",
    KPROBE: b"int kprobe____inet_hash_connect(void *ctx) { return 0; }\n"
    b"int kretprobe____inet_hash_connect(void *ctx) { return 0; }",
}


def build_storm(name: str, directory: Path) -> Path:
    """``bench/<name>.c`` compiled with gcc into ``directory``."""
    binary = directory / name
    subprocess.run(["gcc", "-O2", "-pthread", "-o", str(binary), str(REPO / f"bench/{name}.c")], check=True)
    return binary


def storm_rate(binary: Path, *args: int) -> float:
    """Operations per second a storm (``bench/*_storm.c``) prints."""
    return float(subprocess.run([str(binary), *map(str, args)], capture_output=True, text=True, check=True).stdout)


def syscall_usecs(loops: int) -> float:
    return perf_number(["perf", "bench", "syscall", "basic", "-l", str(loops)], r"([\d.]+)\s+usecs/op")


Arm = tuple[Callable[[], Any], ...]  # factories of loadable things with pause()/resume()/close()


def ab(
    name: str, rounds: int, arms: dict[str, Arm], run: Callable[[], float], higher_is_better: bool
) -> dict[str, list[float]]:
    """Interleaved rounds of ``run`` with nothing attached and with each arm's probes, the order
    rotating every round (bpf_stats off: its clock reads would be charged to the arms); prints
    each arm's median per-round cost ratio against the unloaded run of the same round. Every arm
    is compiled and loaded once, then paused; a round resumes one arm at a time, so the runs of
    a round follow each other within milliseconds and share the machine's slow swings. Returns
    every arm's per-round ratios, and the unloaded runs' figures under "off"."""
    loaded_arms: dict[str, list[Any]] = {}
    try:
        for arm, factories in arms.items():
            loaded_arms[arm] = []
            for factory in factories:
                thing = factory()
                thing.load()
                loaded_arms[arm].append(thing)
                thing.pause()
        run()  # warm-up, not counted: the first run of a process pays for cold caches and slabs
        ratios: dict[str, list[float]] = {arm: [] for arm in arms}
        offs: list[float] = []
        states = ["off", *arms]
        for r in range(rounds):
            order = states[r % len(states) :] + states[: r % len(states)]
            results = {}
            for state in order:
                things = loaded_arms.get(state, [])
                for thing in things:
                    thing.resume()
                try:
                    results[state] = run()
                finally:
                    for thing in things:
                        thing.pause()
            line = []
            offs.append(results["off"])
            for arm in arms:
                ratio = results["off"] / results[arm] if higher_is_better else results[arm] / results["off"]
                ratios[arm].append(ratio)
                line.append(f"{arm} x{ratio:.3f}")
            print(f"  {name} round {r + 1}: off {results['off']:.4g}; " + ", ".join(line), flush=True)
    finally:
        for things in loaded_arms.values():
            for thing in things:
                thing.close()
    for arm, values in ratios.items():
        q = statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3
        print(
            f"{name} {arm}: median cost ratio x{statistics.median(values):.3f} "
            f"(quartiles {q[0]:.3f}-{q[2]:.3f}, min {min(values):.3f}, max {max(values):.3f}, {len(values)} rounds)"
        )
    return {**ratios, "off": offs}


def per_event(
    factories: tuple[Callable[[], Probe], ...],
    run: Callable[[], float],
    rounds: int = 1,
    seconds: Callable[[float], float] | None = None,
) -> tuple[dict[str, list[float]], list[float]]:
    """Kernel bpf_stats of each program over ``rounds`` runs: returns {program: [ns/event, events
    per run]} and, if ``seconds`` gives a run's duration from its result, each run's bound on the
    cost ratio the programs' own time can cause: ``W / (W - B)``, W the run's duration, B the
    ns all the programs ran during it. Removing B ns of work shortens a run by at most B, even
    with every one of them on its critical path (a lock held while contention_end runs): so the
    run without the programs takes at least W - B. The bound leaves out what the programs cause
    beyond their own time (cache misses, a waiter that sleeps), and counts in what bpf_stats
    adds itself (about 70 ns per run, more than the untimed dispatch around a program) and
    every event on the node meanwhile, the storm's start and exit included: a worst case."""
    saved = STATS.read_text()
    probes = loaded(factories)
    totals: dict[int, list[int]] = {}
    bounds: list[float] = []
    try:
        STATS.write_text("1\n")
        fds = {fd: f"{p.name}:{prog}" for p in probes for prog, fd in p.program_fds().items()}
        for _ in range(rounds):
            before = prog_stats(os.getpid())
            result = run()
            after = prog_stats(os.getpid())
            spent = 0
            for fd in fds:
                ns = after.get(fd, (0, 0))[0] - before.get(fd, (0, 0))[0]
                cnt = after.get(fd, (0, 0))[1] - before.get(fd, (0, 0))[1]
                total = totals.setdefault(fd, [0, 0])
                total[0] += ns
                total[1] += cnt
                spent += ns
            if seconds is not None:
                duration_ns = seconds(result) * 1e9
                bounds.append(duration_ns / (duration_ns - spent) if spent < duration_ns else float("inf"))
    finally:
        STATS.write_text(saved)
        close(probes)
    out: dict[str, list[float]] = {}
    for fd, label in sorted(fds.items(), key=lambda kv: kv[1]):
        ns, cnt = totals.get(fd, [0, 0])
        if cnt:
            print(f"  bpf_stats {label}: {ns / cnt:.0f} ns/event over {cnt} events in {rounds} run(s)")
            out[label] = [ns / cnt, cnt / rounds]
    if bounds:
        print(
            f"  the programs' own time, worst case on the critical path: median x{statistics.median(bounds):.4f} "
            f"(max x{max(bounds):.4f}, {len(bounds)} runs)"
        )
    return out, bounds


def loadable(strategy: str) -> str | None:
    """None if the connect probe loads with ``strategy`` here, else why not."""
    p = probe(ConnectProbe, strategy)()
    try:
        p.load()
    except ProbeUnavailable as e:
        return e.reason
    finally:
        p.close()
    return None


def connect_section(args: argparse.Namespace, storm: Path) -> dict[str, Any]:
    """Prints the connect section; returns its figures (for ``--json``): arms in the order of
    ``ConnectProbe.strategies`` (the first is the one ``auto`` takes here)."""
    print("\n### connect: loopback connect()/close() storm (connects/s)")
    refused: dict[str, str] = {}
    arms: dict[str, Arm] = {}
    strategies = []
    for strategy in ConnectProbe.strategies:
        reason = loadable(strategy)
        if reason:
            print(f"  {strategy}: not measured, the kernel does not take it: {reason}")
            refused[strategy] = reason
            continue
        strategies.append(strategy)
        arms[f"connect {strategy}"] = (probe(ConnectProbe, strategy),)
        if strategy in EMPTY_HOOKED:
            arms[f"empty {strategy}"] = (partial(EmptyPrograms, EMPTY_HOOKED[strategy]),)
        else:
            arms[f"empty {strategy}"] = (partial(EmptyPrograms, EMPTY_STATE, sock_ops=strategy == TRACEPOINT_SOCKOPS),)
    rounds = args.rounds * args.storm_rounds_factor
    ratios = ab("connect", rounds, arms, lambda: storm_rate(storm, args.connects), True)
    events, bounds = {}, {}
    for strategy in strategies:
        print(f"  {strategy}:")
        events[strategy], bounds[strategy] = per_event(
            (probe(ConnectProbe, strategy),),
            lambda: storm_rate(storm, args.connects),
            args.rounds,
            lambda rate: args.connects / rate,
        )
    command = f"bench/connect_storm {args.connects}"
    return {"command": command, "ratios": ratios, "ns_per_event": events, "bpf_bound": bounds, "refused": refused}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--seconds", type=int, default=3, help="perf bench epoll wait -r")
    ap.add_argument("--connects", type=int, default=10000, help="connects per storm run")
    ap.add_argument("--lock-ops", type=int, default=200000, help="epoll_ctl calls per thread per lock storm run")
    ap.add_argument(
        "--storm-rounds-factor", type=int, default=3, help="storm rounds = rounds x this (their runs are short)"
    )
    ap.add_argument("--syscalls", type=int, default=5_000_000, help="perf bench syscall basic -l")
    ap.add_argument("--only", choices=("lockstat", "connect", "syscall"), action="append", help="sections to run")
    ap.add_argument("--json", type=Path, help="write every section's per-round figures here")
    args = ap.parse_args()
    only = set(args.only or ("lockstat", "connect", "syscall"))
    if os.geteuid() != 0:
        print("bench needs root", file=sys.stderr)
        return 1
    kernel().headers.apply_env()
    print(f"kernel {os.uname().release}; {os.cpu_count()} CPUs; {args.rounds} interleaved rounds")
    out: dict[str, Any] = {"rounds": args.rounds, "storm_rounds": args.rounds * args.storm_rounds_factor}
    if "lockstat" in only:
        print("\n### lockstat: perf bench epoll wait -t 4 (ops/s), 2 CPUs")
        lock_arms: dict[str, Arm] = {
            "lockstat": (probe(LockstatProbe),),
            "empty programs": (partial(EmptyPrograms, EMPTY_LOCK),),
        }
        out["epoll"] = {
            "command": f"perf bench epoll wait -t 4 -r {args.seconds}",
            "ratios": ab("lockstat", args.rounds, lock_arms, lambda: epoll_ops(args.seconds), True),
            "ns_per_event": per_event((probe(LockstatProbe),), lambda: epoll_ops(args.seconds))[0],
        }
        with tempfile.TemporaryDirectory() as tmp:
            lock_storm = build_storm("lock_storm", Path(tmp))
            print("\n### lockstat: lock storm, 4 threads on one epoll instance (epoll_ctl/s)")
            arms: dict[str, Arm] = {
                "lockstat": (probe(LockstatProbe),),
                "lockstat timing every wait": (probe(LockstatProbe, timed_waits=0),),
                "empty programs": (partial(EmptyPrograms, EMPTY_LOCK),),
            }
            rounds = args.rounds * args.storm_rounds_factor
            storm_ratios = ab("lock storm", rounds, arms, lambda: storm_rate(lock_storm, 4, args.lock_ops), True)
            events, bounds = {}, {}
            for settings in ({}, {"timed_waits": 0}):
                print(f"  lockstat {settings or 'defaults'}:")
                run = partial(storm_rate, lock_storm, 4, args.lock_ops)
                arm = "timed_waits=0" if settings else "defaults"
                events[arm], bounds[arm] = per_event(
                    (probe(LockstatProbe, **settings),), run, args.rounds, lambda rate: 4 * args.lock_ops / rate
                )
            command = f"bench/lock_storm 4 {args.lock_ops}"
            out["lock_storm"] = {
                "command": command,
                "ratios": storm_ratios,
                "ns_per_event": events,
                "bpf_bound": bounds,
            }
    if "connect" in only:
        with tempfile.TemporaryDirectory() as tmp:
            out["connect_storm"] = connect_section(args, build_storm("connect_storm", Path(tmp)))
    if "syscall" in only:
        print("\n### syscall tax: perf bench syscall basic (usecs/op), all default probes vs none")
        arms: dict[str, Arm] = {"all probes": (probe(RunqlatProbe), probe(LockstatProbe), probe(ConnectProbe))}
        ratios = ab("syscall", args.rounds, arms, lambda: syscall_usecs(args.syscalls), False)
        out["syscall"] = {"command": f"perf bench syscall basic -l {args.syscalls}", "ratios": ratios}
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

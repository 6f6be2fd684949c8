"""Seed 000 reproduced on this kernel, and what nodetune's connect and lockstat probes show of it.
Not a test.

The incident: nginx in a pod opening connections to one upstream lost half its QPS; `perf` showed
the CPU in `raw_spin_lock` under connect() while the kernel searched the ephemeral port range. Here
``bench/upstream_storm.c`` plays the proxy: WORKERS processes connect() to one listener and close,
in a network namespace whose ``ip_local_port_range`` has RANGE ports, of which HELD are kept busy
towards that listener (``crowded``), or none (``empty``). Each case runs in a cgroup of its own,
with the connect and lockstat probes loaded at their defaults. Per case it prints:

- connects per second and failed connects (the proxy's QPS);
- the port search histogram of the case's cgroup (``nodetune_connect_port_search_seconds``): its
  count, mean and median bucket;
- the lock wait charged to the case's cgroup by type (``nodetune_workload_lock_wait_seconds_total``)
  and the node's top callers by wait over the case (``nodetune_lock_contention_wait_seconds_total``).

Cases alternate (``--rounds``), medians are printed at the end. Run as root: ``make bench-seed``
(``SEED_ARGS="--rounds 3"``). Namespaces, cgroups and processes made here are removed; processes
are ended by pid.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import uuid
from functools import partial
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.lock_connect_overhead import build_storm, kernel, probe  # noqa: E402
from host.paths import HostPaths  # noqa: E402
from metrics.histogram import NSLOTS  # noqa: E402
from probes.connect import FAILURES_WORD, HIST, ConnectProbe  # noqa: E402
from probes.lockstat import LOCK_TYPES, WORKLOAD, LockstatProbe  # noqa: E402
from tests.netns import Netns, enter_cgroup  # noqa: E402

UPSTREAM_PORT = 30000
RANGE_LOW = 40000


class Case:
    """A network namespace with ``ports`` ephemeral ports (tests/netns.py) and a cgroup, both made here."""

    def __init__(self, name: str, ports: int) -> None:
        self.name = name
        root = HostPaths().cgroup_v2()
        if root is None:
            raise SystemExit("bench/seed_000.py needs cgroup v2")
        self.ns = Netns(f"{RANGE_LOW} {RANGE_LOW + ports - 1}")
        self.netns = self.ns.name
        self.cgroup = root / f"nodetune-seed-{name}-{uuid.uuid4().hex[:8]}"
        self.cgroup.mkdir()
        self.cgroup_id = os.stat(self.cgroup).st_ino

    def start(self, argv: list[str]) -> subprocess.Popen[str]:
        """``argv`` in the namespace and the cgroup, stdin and stdout piped; ended by ``remove()``."""
        proc = subprocess.Popen(
            ["ip", "netns", "exec", self.netns, *argv],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            preexec_fn=partial(enter_cgroup, str(self.cgroup)),
        )
        self.ns.procs.append(proc)
        return proc

    def remove(self) -> None:
        self.ns.remove()  # ends what start() started, by pid, then deletes the namespace
        try:
            self.cgroup.rmdir()
        except OSError as e:
            print(f"could not remove {self.cgroup}: {e}", file=sys.stderr)


def bucket_us(slots: list[int], q: float) -> float:
    """Upper bound in µs of the bucket holding quantile ``q`` (slot s: (2^(s-1), 2^s] µs), as
    ``histogram_quantile`` would bound it."""
    total, seen = sum(slots), 0
    for s, n in enumerate(slots):
        seen += n
        if total and seen >= q * total:
            return float(2**s)
    return float("nan")


def delta(after: list[int], before: list[int]) -> list[int]:
    return [a - b for a, b in zip(after, before, strict=True)]


def one_case(case: Case, storm: Path, args: argparse.Namespace, held: int, connect, lockstat) -> dict:
    key = (str(case.cgroup_id),)
    zero_c, zero_l = [0] * (FAILURES_WORD + 1), [0] * len(LOCK_TYPES)
    proc = case.start([str(storm), str(args.workers), str(args.seconds), str(UPSTREAM_PORT), str(held)])
    # On any error below, Case.remove() ends the storm by pid.
    # The held connections' searches are the case's set-up, not its storm: read after them.
    if proc.stdout.readline().strip() != "held":
        raise RuntimeError(f"upstream_storm could not hold {held} connections in {case.netns}")
    c0 = connect.series(HIST).get(key, zero_c)
    l0 = lockstat.series(WORKLOAD).get(key, zero_l)
    callers0, _ = lockstat.caller_totals()
    out, _ = proc.communicate("go\n", timeout=args.seconds + 60)
    if proc.returncode:
        raise RuntimeError(f"upstream_storm exited with {proc.returncode} in {case.netns}")
    rate, failures = out.split()
    c = delta(connect.series(HIST).get(key, zero_c), c0)
    waits = delta(lockstat.series(WORKLOAD).get(key, zero_l), l0)
    callers1, _ = lockstat.caller_totals()
    callers = {
        k: (v[0] - callers0.get(k, [0, 0])[0], v[1] - callers0.get(k, [0, 0])[1])
        for k, v in callers1.items()
        if v[0] > callers0.get(k, [0, 0])[0]
    }
    searches = sum(c[:NSLOTS])
    return {
        "rate": float(rate),
        "failures": int(failures),
        "searches": searches,
        "search_failures": c[FAILURES_WORD],
        "mean_us": c[NSLOTS] / searches / 1e3 if searches else float("nan"),
        "median_us": bucket_us(c[:NSLOTS], 0.5),
        "p99_us": bucket_us(c[:NSLOTS], 0.99),
        "wait_s": {t: w / 1e9 for t, w in zip(LOCK_TYPES, waits, strict=True) if w},
        "callers": sorted(callers.items(), key=lambda kv: -kv[1][1])[: args.top],
    }


def show(name: str, r: dict, seconds: float) -> None:
    print(
        f"  {name}: {r['rate']:.0f} connects/s, {r['failures']} failed; port searches {r['searches']}"
        f" ({r['search_failures']} failed), mean {r['mean_us']:.1f} us,"
        f" median in le {r['median_us']:.0f} us, p99 in le {r['p99_us']:.0f} us"
    )
    waits = ", ".join(f"{t} {w * 1e3:.2f} ms" for t, w in r["wait_s"].items()) or "none"
    print(f"    lock wait charged to the case's cgroup: {waits}")
    for (lock_type, caller), (n, ns) in r["callers"]:
        print(f"    top caller {lock_type}/{caller}: {n / seconds:.0f} contentions/s, {ns / 1e6 / seconds:.2f} ms/s")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, default=4, help="connecting processes (nginx's workers)")
    ap.add_argument("--seconds", type=float, default=3.0, help="length of each case")
    ap.add_argument("--ports", type=int, default=8192, help="ports in each namespace's range")
    ap.add_argument("--held", type=int, default=8000, help="ports kept busy towards the upstream when crowded")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--top", type=int, default=5, help="callers shown per case")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("bench needs root", file=sys.stderr)
        return 1
    if not 0 < args.held < args.ports:
        print("--held must be between 0 and --ports", file=sys.stderr)
        return 2
    kernel().headers.apply_env()
    print(
        f"kernel {os.uname().release}; {os.cpu_count()} CPUs; {args.workers} workers, {args.seconds:g} s per case; "
        f"range {args.ports} ports, crowded: {args.held} held towards the upstream"
    )
    results: dict[str, list[dict]] = {"empty": [], "crowded": []}
    cases = {"empty": Case("empty", args.ports), "crowded": Case("crowded", args.ports)}
    connect, lockstat = probe(ConnectProbe)(), probe(LockstatProbe)()
    try:
        connect.load()
        lockstat.load()
        print(f"connect strategy: {connect.attach}")
        with tempfile.TemporaryDirectory() as tmp:
            storm = build_storm("upstream_storm", Path(tmp))
            for r in range(args.rounds):
                print(f"round {r + 1}")
                for name in ("empty", "crowded") if r % 2 == 0 else ("crowded", "empty"):
                    held = args.held if name == "crowded" else 0
                    # each round in a fresh namespace: no state carried over between rounds
                    cases[name].remove()
                    cases[name] = Case(name, args.ports)
                    res = one_case(cases[name], storm, args, held, connect, lockstat)
                    results[name].append(res)
                    show(name, res, args.seconds)
    finally:
        lockstat.close()
        connect.close()
        for case in cases.values():
            case.remove()
    print(f"\nmedians of {args.rounds} rounds:")
    med: dict[str, dict[str, float]] = {}
    for name, rs in results.items():
        med[name] = {k: statistics.median(r[k] for r in rs) for k in ("rate", "mean_us")}
        med[name]["p99_us"] = statistics.median_low(r["p99_us"] for r in rs)  # a bucket bound, not a mean of two
        med[name]["lock_ms_per_s"] = statistics.median(sum(r["wait_s"].values()) for r in rs) * 1e3 / args.seconds
        print(
            f"  {name}: {med[name]['rate']:.0f} connects/s; port search mean {med[name]['mean_us']:.1f} us,"
            f" p99 in le {med[name]['p99_us']:.0f} us; lock wait of the cgroup {med[name]['lock_ms_per_s']:.2f} ms/s"
        )
    e, c = med["empty"], med["crowded"]
    lock_ratio = f"x{c['lock_ms_per_s'] / e['lock_ms_per_s']:.2f}" if e["lock_ms_per_s"] else "(none when empty)"
    print(
        f"  crowded against empty: connects/s x{c['rate'] / e['rate']:.3f},"
        f" mean search x{c['mean_us'] / e['mean_us']:.0f}, lock wait {lock_ratio}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

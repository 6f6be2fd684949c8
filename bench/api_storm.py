"""Seed 003's storms: hundreds of agents start, or lose the API server, at once. Not a test.

One local API server (tests/fake_apiserver.py) sheds load like the API server's Priority and
Fairness: a token bucket admits ``--rate`` requests per second (burst = one second's worth) and
every other request gets 429 with ``Retry-After: 1`` (``FakeAPIServer.limit_rate``). ``--agents``
reflectors, each with its own real ``kubernetes`` client, list and watch their node's pods.
Two scenarios:

* ``start``: every agent starts at the same instant;
* ``restart``: every agent has listed and is watching; the server resets every watch connection
  at once (an API server restart) and from then on sheds load. What is measured starts at the
  reset.
* ``retry-after``: the agents' first requests all get 429 ``Retry-After: 1`` at once (no start-up
  jitter), then the server recovers: when does each agent come back? Reported: the spread of
  their second requests and the most agents returning within 100 ms of each other ("in step").
* ``decode``: a list of ``--fault-pods`` × 50 pods read through the client's models (as the
  reflector did) and as raw JSON into the pod index (as it does now): medians of 7 interleaved rounds.
* ``faults``: one agent (its pods and Node reflectors, default backoff) against a server that
  answers every watch with a 410 ``ERROR`` event, every watch with a line that is not JSON and
  then closes, or every request with 429 ``Retry-After: inf``, for ``--fault-seconds``: the
  requests and lists it sent, whether its reflectors still run at the end (``reflector_up``), and
  how long ``close()`` took.

Reported for nodetune's reflector (start-up jitter, exponential backoff with full jitter,
Retry-After plus jitter) and for naive agents (no jitter, a fixed 0.1 s retry, Retry-After ignored):

* the time until every agent had listed (start) or was watching again (restart);
* the requests the server saw until then, and the share it rejected;
* the peak and mean request rate (per 100 ms window, scaled to per second).

Run: ``make bench-storm`` (``STORM_ARGS="--agents 300 --rate 100 --scenario restart"``). Loopback
only; every agent is stopped (its open watch shut) before the next scenario, and any thread left
is reported.
"""

from __future__ import annotations

import argparse
import bisect
import logging
import random
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agent.identity.kube import Backoff, Reflector, api_client
from tests.fake_apiserver import FakeAPIServer, pod

TMP = Path(tempfile.mkdtemp(prefix="nodetune-storm-"))  # the kubeconfigs; removed by main()


class NaiveBackoff(Backoff):
    """What a client without backoff does: retry after a fixed short delay, ignore Retry-After."""

    def next_delay(self, retry_after_s: float | None = None) -> float:
        return 0.1


def watching_again(server: FakeAPIServer, since: float) -> set[str]:
    """Nodes whose agent has had a watch admitted since ``since``."""
    return {r["node"] for r in list(server.requests) if r["t"] >= since and r["watch"] and not r["fault"]}


def stop_all(stop: threading.Event, reflectors: list[Reflector], threads: list[threading.Thread]) -> int:
    """End every agent before the next scenario: the stop event, their open requests' sockets
    shut, one 10 s join deadline. Returns the threads still alive (reported, never left silently)."""
    stop.set()
    for r in reflectors:
        r.interrupt()
    deadline = time.monotonic() + 10
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    return sum(t.is_alive() for t in threads)


def retry_after(agents: int, seed: int) -> dict[str, float]:
    """Every agent told 429 ``Retry-After: 1`` at the same moment: the delay to each one's retry."""
    server = FakeAPIServer()
    server.start()
    kubeconfig = server.kubeconfig(TMP)
    server.set_fault(("status", 429, {"Retry-After": "1"}))
    stop = threading.Event()
    rng = random.Random(seed)
    core = __import__("kubernetes").client.CoreV1Api
    reflectors = [
        Reflector(
            "pods",
            core(api_client(kubeconfig)).list_pod_for_all_namespaces,
            f"spec.nodeName=n{i}",
            lambda pods: None,
            lambda *_: None,
            stop,
            startup_jitter_s=0,
            backoff=Backoff(rng=random.Random(rng.random())),
            rng=random.Random(rng.random()),
        )
        for i in range(agents)
    ]
    threads = [threading.Thread(target=r.run, daemon=True) for r in reflectors]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60
    while len({r["node"] for r in list(server.requests) if r["fault"]}) < agents and time.monotonic() < deadline:
        time.sleep(0.01)
    server.clear_fault()
    while time.monotonic() < deadline:
        by_node = server.requests_by_node()
        if len(by_node) >= agents and all(len(reqs) >= 2 for reqs in by_node.values()):
            break
        time.sleep(0.05)
    left = stop_all(stop, reflectors, threads)
    server.stop()
    delays = sorted(reqs[1]["t"] - reqs[0]["t"] for reqs in server.requests_by_node().values() if len(reqs) >= 2)
    returns = sorted(reqs[1]["t"] for reqs in server.requests_by_node().values() if len(reqs) >= 2)
    together = max(sum(1 for u in returns if t <= u < t + 0.1) for t in returns) if returns else 0
    return {
        "agents": len(delays),
        "min_s": delays[0] if delays else 0,
        "max_s": delays[-1] if delays else 0,
        "spread_s": delays[-1] - delays[0] if delays else 0,
        "together": together,
        "threads_left": left,
    }


FAULTS = {
    "410 on every watch": (("gone",), True),
    "malformed line, then close": (("garbage_close",), True),
    "429 Retry-After: inf": (("status", 429, {"Retry-After": "inf"}), False),
}


def one_agent_fault(action: tuple, watch_only: bool, seconds: float, pods: int) -> dict[str, float]:
    """One agent (KubeWatch: both reflectors under their supervisor, defaults but no start-up jitter)
    against a fault on every request; closed as the agent closes it."""
    from agent.identity.kube import KubeWatch

    server = FakeAPIServer()
    server.start()
    for i in range(pods):
        server.put("pods", pod(f"{i:08x}-0000-4000-8000-000000000000", f"p{i}", "n1", {"c": f"{i:064x}"}))
    server.set_fault(action, watch_only)
    stop = threading.Event()
    kube = KubeWatch(api_client(server.kubeconfig(TMP)), "n1", stop, startup_jitter_s=0)
    start = time.monotonic()
    kube.start()
    stop.wait(seconds)
    up = [s.value for m in kube.collect() if m.name == "nodetune_kube_reflector_up" for s in m.samples]
    requests = list(server.requests)
    times = sorted(r["t"] for r in requests)
    closing = time.monotonic()
    kube.close()
    close_s = time.monotonic() - closing
    left = sum(t.is_alive() for t in kube._threads)
    server.stop()
    return {
        "requests": len(requests),
        "lists": sum(1 for r in requests if not r["watch"]),
        "peak_1s": max((bisect.bisect_left(times, t + 1) - i for i, t in enumerate(times)), default=0),
        "alive": sum(up),
        "seconds": closing - start,
        "close_s": close_s,
        "threads_left": left,
    }


def decode(pods: int, rounds: int = 7) -> dict[str, float]:
    """A list of ``pods`` pods read the way the reflector used to (the client's models, decoding
    only) and the way it does now (raw JSON and the pod index), interleaved; medians in seconds."""
    import json
    import statistics

    from kubernetes.client import ApiClient

    from agent.identity.kube import PodIndex

    items = [
        pod(f"{i:08x}-0000-4000-8000-000000000000", f"p{i}", "n1", {"c": f"{i:064x}", "d": f"{i + 1:064x}"})
        for i in range(pods)
    ]
    body = json.dumps({"apiVersion": "v1", "kind": "PodList", "metadata": {"resourceVersion": "1"}, "items": items})
    api = ApiClient()
    models, raw = [], []
    for _ in range(rounds):
        t = time.perf_counter()
        api.deserialize(body, "V1PodList", "application/json")
        models.append(time.perf_counter() - t)
        t = time.perf_counter()
        PodIndex("n1").replace(json.loads(body)["items"])
        raw.append(time.perf_counter() - t)
    return {"mb": len(body) / 1e6, "models_s": statistics.median(models), "raw_s": statistics.median(raw)}


def storm(agents: int, rate: float, naive: bool, seed: int, scenario: str) -> dict[str, float]:
    server = FakeAPIServer()
    server.start()
    for i in range(agents):
        server.put("pods", pod(f"{i:08x}-0000-4000-8000-000000000000", f"p{i}", f"n{i}", {"c": f"{i:064x}"}))
    kubeconfig = server.kubeconfig(TMP)
    if scenario == "start":
        server.limit_rate(rate)
    stop = threading.Event()
    synced: set[int] = set()
    sync_lock = threading.Lock()
    rng = random.Random(seed)
    core = __import__("kubernetes").client.CoreV1Api
    reflectors = []
    for i in range(agents):

        def replace(pods: list, _i: int = i) -> None:
            with sync_lock:
                synced.add(_i)

        reflectors.append(
            Reflector(
                "pods",
                core(api_client(kubeconfig)).list_pod_for_all_namespaces,
                f"spec.nodeName=n{i}",
                replace,
                lambda *_: None,
                stop,
                watch_timeout_s=(300, 600),
                read_timeout_s=30,
                startup_jitter_s=0 if naive else 5.0,
                backoff=NaiveBackoff() if naive else Backoff(rng=random.Random(rng.random())),
                rng=random.Random(rng.random()),
            )
        )
    start = time.monotonic()
    threads = [threading.Thread(target=r.run, daemon=True) for r in reflectors]
    for t in threads:
        t.start()
    deadline = start + 300
    if scenario == "restart":  # all listed and watching; then the server restarts
        while len(watching_again(server, start)) < agents and time.monotonic() < deadline:
            time.sleep(0.05)
        server.limit_rate(rate)
        start = time.monotonic()
        server.drop_watches()

    def done() -> bool:
        if scenario == "start":
            return len(synced) >= agents
        return len(watching_again(server, start)) >= agents

    while not done() and time.monotonic() < deadline:
        time.sleep(0.05)
    elapsed = time.monotonic() - start
    finished = len(synced) if scenario == "start" else len(watching_again(server, start))
    left = stop_all(stop, reflectors, threads)
    server.stop()
    seen = [r for r in list(server.requests) if 0 <= r["t"] - start <= elapsed]
    windows: dict[int, int] = {}
    for r in seen:
        w = int((r["t"] - start) * 10)
        windows[w] = windows.get(w, 0) + 1
    return {
        "done": finished,
        "elapsed_s": elapsed,
        "requests": len(seen),
        "peak_rps": max(windows.values()) * 10 if windows else 0,
        "mean_rps": len(seen) / elapsed if elapsed else 0,
        "rejected_share": sum(1 for r in seen if r["fault"]) / max(len(seen), 1),
        "threads_left": left,
    }


def main() -> int:
    try:
        return run()
    finally:
        shutil.rmtree(TMP, ignore_errors=True)


def run() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--agents", type=int, default=300)
    ap.add_argument("--rate", type=float, default=100.0, help="requests per second the server admits")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--scenario", choices=("start", "restart", "retry-after", "faults", "decode", "all"), default="all")
    ap.add_argument("--fault-seconds", type=float, default=20.0, help="length of each fault (faults scenario)")
    ap.add_argument("--fault-pods", type=int, default=100, help="pods in each list (faults scenario)")
    ap.add_argument("--retry-after-agents", type=int, default=12, help="agents of the retry-after scenario")
    args = ap.parse_args()
    logging.disable(logging.WARNING)  # every agent logs each failure: thousands of lines
    if args.scenario in ("retry-after", "all"):
        r = retry_after(args.retry_after_agents, args.seed)
        told = f"{r['agents']} agents told 429 Retry-After: 1 at once"
        print(f"{told} came back after {r['min_s']:.2f}-{r['max_s']:.2f} s")
        print(f"(spread {r['spread_s']:.2f} s); at most {r['together']} of them within 100 ms of each other")
        print(f"threads left after stopping them: {r['threads_left']}\n")
        if args.scenario == "retry-after":
            return 0
    if args.scenario in ("decode", "all"):
        n = args.fault_pods * 50
        r = decode(n)
        print(f"A list of {n} pods ({r['mb']:.1f} MB), medians of 7 interleaved rounds: the client's models")
        print(f"{r['models_s'] * 1000:.0f} ms (decoding only), raw JSON + pod index {r['raw_s'] * 1000:.0f} ms\n")
        if args.scenario == "decode":
            return 0
    if args.scenario in ("faults", "all"):
        print(f"One agent (2 reflectors, default backoff), each fault for {args.fault_seconds:g} s, lists of")
        print(f"{args.fault_pods} pods:\n")
        print("| fault | requests | lists | most requests in 1 s | reflector_up at the end | close() | threads left |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for name, (action, watch_only) in FAULTS.items():
            r = one_agent_fault(action, watch_only, args.fault_seconds, args.fault_pods)
            print(
                f"| {name} | {r['requests']} | {r['lists']} | {r['peak_1s']} | {r['alive']:.0f}/2 "
                f"| {r['close_s']:.2f} s | {r['threads_left']} |",
                flush=True,
            )
        print()
        if args.scenario == "faults":
            return 0
    scenarios = ("start", "restart") if args.scenario == "all" else (args.scenario,)
    print(f"{args.agents} agents; the server admits {args.rate:g} req/s, else 429 Retry-After: 1\n")
    print("| scenario | agents | done | time until all done | requests | peak req/s | mean req/s | rejected | left |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for scenario in scenarios:
        for naive in (False, True):
            r = storm(args.agents, args.rate, naive, args.seed, scenario)
            name = "naive (no jitter, 0.1 s retry)" if naive else "nodetune"
            print(
                f"| {scenario} | {name} | {r['done']}/{args.agents} | {r['elapsed_s']:.1f} s | {r['requests']} | "
                f"{r['peak_rps']:.0f} | {r['mean_rps']:.0f} | {r['rejected_share'] * 100:.0f} % "
                f"| {r['threads_left']} |",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())

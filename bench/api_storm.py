"""Seed 003's storm: hundreds of agents start (or lose the API server) at once. Not a test.

One local API server (tests/fake_apiserver.py) sheds load like the API server's Priority and
Fairness. A token bucket admits ``--rate`` requests per second (burst = one second's worth);
every other request gets 429 with ``Retry-After: 1``. ``--agents`` reflectors start at the same
instant, each with its own real ``kubernetes`` client, and list their node's pods. Reported, for
nodetune's reflector (start-up jitter, exponential backoff with full jitter, Retry-After) and for
naive agents (no jitter, a fixed 0.1 s retry, Retry-After ignored):

* the peak and mean request rate the server saw (per 100 ms window, scaled to per second);
* the share of requests rejected;
* the time until every agent had listed successfully (synced).

Run: ``make bench-storm`` (``STORM_ARGS="--agents 300 --rate 100"``). Loopback only; every agent
stops once all are synced.
"""

from __future__ import annotations

import argparse
import logging
import random
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agent.kube import Backoff, Reflector, api_client
from tests.fake_apiserver import FakeAPIServer, _Handler, pod


class TokenBucket:
    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.tokens = rate
        self.at = time.monotonic()
        self.lock = threading.Lock()

    def take(self) -> bool:
        with self.lock:
            now = time.monotonic()
            self.tokens = min(self.rate, self.tokens + (now - self.at) * self.rate)
            self.at = now
            if self.tokens >= 1:
                self.tokens -= 1
                return True
            return False


class LimitedHandler(_Handler):
    def do_GET(self) -> None:
        srv = self.server
        srv.seen.append(time.monotonic())
        if not srv.bucket.take():
            srv.rejected += 1
            self._json(429, {"kind": "Status", "code": 429, "reason": "TooManyRequests"}, {"Retry-After": "1"})
            return
        super().do_GET()


class NaiveBackoff(Backoff):
    """What a client without backoff does: retry after a fixed short delay, ignore Retry-After."""

    def next_delay(self, retry_after_s: float | None = None) -> float:
        return 0.1


def storm(agents: int, rate: float, naive: bool, seed: int) -> dict[str, float]:
    server = FakeAPIServer()
    server.RequestHandlerClass = LimitedHandler
    server.seen = []  # type: ignore[attr-defined]
    server.rejected = 0  # type: ignore[attr-defined]
    server.bucket = TokenBucket(rate)  # type: ignore[attr-defined]
    server.request_queue_size = 1024
    server.start()
    for i in range(agents):
        server.put("pods", pod(f"{i:08x}-0000-4000-8000-000000000000", f"p{i}", f"n{i}", {"c": f"{i:064x}"}))
    kubeconfig = server.kubeconfig(Path(tempfile.mkdtemp()))
    stop = threading.Event()
    synced: list[float] = []
    sync_lock = threading.Lock()
    rng = random.Random(seed)
    reflectors = []
    for i in range(agents):

        def replace(pods: list, _i: int = i) -> None:
            with sync_lock:
                synced.append(time.monotonic())

        reflectors.append(
            Reflector(
                "pods",
                __import__("kubernetes").client.CoreV1Api(api_client(kubeconfig)).list_pod_for_all_namespaces,
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
    while len(synced) < agents and time.monotonic() < deadline:
        time.sleep(0.05)
    all_synced = time.monotonic() - start
    stop.set()
    server.stop()
    seen = [t - start for t in server.seen if t - start <= all_synced]  # type: ignore[attr-defined]
    windows: dict[int, int] = {}
    for t in seen:
        windows[int(t * 10)] = windows.get(int(t * 10), 0) + 1
    return {
        "synced": len(synced),
        "time_to_all_synced_s": all_synced,
        "requests": len(seen),
        "peak_rps": max(windows.values()) * 10 if windows else 0,
        "mean_rps": len(seen) / all_synced if all_synced else 0,
        "rejected_share": server.rejected / max(len(server.seen), 1),  # type: ignore[attr-defined]
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--agents", type=int, default=300)
    ap.add_argument("--rate", type=float, default=100.0, help="requests per second the server admits")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    logging.disable(logging.WARNING)  # every agent logs each failure: thousands of lines
    print(f"{args.agents} agents start at once; the server admits {args.rate:g} req/s, else 429 Retry-After: 1\n")
    print("| agents | synced | time until all synced | requests | peak req/s | mean req/s | rejected |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for naive in (False, True):
        r = storm(args.agents, args.rate, naive, args.seed)
        name = "naive (no jitter, 0.1 s retry)" if naive else "nodetune (jitter, backoff, Retry-After)"
        print(
            f"| {name} | {r['synced']}/{args.agents} | {r['time_to_all_synced_s']:.1f} s | {r['requests']} | "
            f"{r['peak_rps']:.0f} | {r['mean_rps']:.0f} | {r['rejected_share'] * 100:.0f} % |",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

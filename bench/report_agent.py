"""The real agent and its peer exporter as processes, for bench/report_*.py. Not a test.

``running_agent()`` starts ``python -m agent.cli run`` with its defaults (every default probe and
collector; only the listen address and the header cache are set) and yields once ``/readyz`` is
200 and the agent has given back what loading left resident, so the figures taken then are the
steady state; ``running_exporter()`` does the same for ``prometheus-node-exporter`` (Debian's
package, default collectors). Both are ended by their pid (SIGTERM, then SIGKILL after 30 s).
Per-process CPU comes from ``/proc/<pid>/stat`` (utime + stime, which keeps the time of threads
that have exited: the agent's HTTP server runs each request on its own thread), RSS from
``smaps_rollup`` (bench/footprint.py's readers).
"""

from __future__ import annotations

import gzip
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.footprint import GIVEN_BACK, WARM_CACHE, cpu_seconds, free_port, rss_mib, status_ok

ROOT = Path(__file__).resolve().parent.parent
EXPORTER = "prometheus-node-exporter"

__all__ = ["Running", "cpu_seconds", "rss_mib", "running_agent", "running_exporter", "scrape_seconds"]


@dataclass
class Running:
    name: str
    pid: int
    url: str  # http://host:port, no path


def scrape_seconds(url: str) -> float:
    """Wall time of one ``GET /metrics`` with ``Accept-Encoding: gzip`` (as Prometheus asks),
    body read and decompressed."""
    req = urllib.request.Request(url + "/metrics", headers={"Accept-Encoding": "gzip"})
    t = time.perf_counter()
    with urllib.request.urlopen(req, timeout=30) as r:
        body = r.read()
        if r.headers.get("Content-Encoding") == "gzip":
            gzip.decompress(body)
    return time.perf_counter() - t


def stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL if it has not exited within 30 s; reaped either way."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _wait(proc: subprocess.Popen[bytes], ready: Callable[[], bool], timeout: float, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            raise RuntimeError(f"exited with {proc.returncode}: {log.read_text()[-2000:]}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"not ready within {timeout:.0f} s: {log.read_text()[-2000:]}")
        time.sleep(0.05)


@contextmanager
def running_agent(extra: list[str] | None = None, timeout: float = 300.0) -> Iterator[Running]:
    """The agent with its defaults (and ``extra`` arguments), ready and settled (header cache:
    bench/footprint.py's warm one)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = Path(tempfile.mkstemp(prefix="nodetune-report-agent-", suffix=".log")[1])
    cmd = [sys.executable, "-m", "agent.cli", "run", "--listen", f"127.0.0.1:{port}", "--cache-dir", str(WARM_CACHE)]
    cmd += extra or []
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    try:
        _wait(proc, lambda: status_ok(url + "/readyz") and GIVEN_BACK in log.read_text(), timeout, log)
        yield Running("nodetune", proc.pid, url)
    finally:
        stop(proc)
        log.unlink()


@contextmanager
def running_exporter(timeout: float = 60.0) -> Iterator[Running]:
    """``prometheus-node-exporter`` with its default collectors on a free loopback port."""
    binary = shutil.which(EXPORTER)
    if binary is None:
        raise RuntimeError(f"{EXPORTER} not installed (make bench-deps)")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = Path(tempfile.mkstemp(prefix="nodetune-report-exporter-", suffix=".log")[1])
    with log.open("w") as out:
        proc = subprocess.Popen(
            [binary, f"--web.listen-address=127.0.0.1:{port}"], stdout=out, stderr=subprocess.STDOUT
        )
    try:
        _wait(proc, lambda: status_ok(url + "/metrics"), timeout, log)
        yield Running("node_exporter", proc.pid, url)
    finally:
        stop(proc)
        log.unlink()

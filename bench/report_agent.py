"""The real agent and its peer exporter as processes, for bench/report_*.py. Not a test.

``running_agent()`` starts ``python -m agent.cli run`` with its defaults (every default probe and
collector; only the listen address and the header cache are set) and yields once ``/readyz`` is
200 and the agent has given back what loading left resident, so the figures taken then are the
steady state; ``running_exporter()`` does the same for ``prometheus-node-exporter`` (Debian's
package, default collectors). Both are ended by their pid (SIGTERM, then SIGKILL after 30 s).
Per-process CPU comes from ``/proc/<pid>/stat`` (utime + stime, which keeps the time of threads
that have exited: the agent's HTTP server runs each request on its own thread), RSS from
``smaps_rollup`` (bench/footprint.py's readers). ``Scraper`` GETs ``/metrics`` as Prometheus does:
``Accept-Encoding: gzip`` over one kept-alive connection (or a new one per scrape, on request).
"""

from __future__ import annotations

import gzip
import http.client
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.footprint import GIVEN_BACK, WARM_CACHE, cpu_seconds, free_port, rss_mib, status_ok

ROOT = Path(__file__).resolve().parent.parent
EXPORTER = "prometheus-node-exporter"

__all__ = [
    "Running",
    "Scrape",
    "Scraper",
    "cpu_seconds",
    "rss_mib",
    "running_agent",
    "running_exporter",
    "scrape_seconds",
]


@dataclass
class Running:
    name: str
    pid: int
    url: str  # http://host:port, no path


@dataclass
class Scrape:
    seconds: float  # request sent to body read (not decompressed)
    body: bytes  # the exposition, decompressed
    sent: int  # bytes on the wire (gzip)


class Scraper:
    """GETs ``/metrics`` with ``Accept-Encoding: gzip`` over one kept-alive connection, as
    Prometheus does (Go's HTTP client keeps a target's connection from scrape to scrape), or over
    a new connection per scrape (``keep_alive=False``). It matters for the agent's ports collector:
    a new connection per scrape changes the host namespace's TCP counts (an open, a socket in
    TIME_WAIT on an ephemeral port), so every scrape dumps the namespace's TCP table again."""

    def __init__(self, url: str, keep_alive: bool = True) -> None:
        parts = urllib.parse.urlsplit(url)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        self.keep_alive = keep_alive
        self.conn: http.client.HTTPConnection | None = None

    def scrape(self) -> Scrape:
        start = time.perf_counter()
        if self.conn is None:
            self.conn = http.client.HTTPConnection(self.host, self.port, timeout=30)
        try:
            self.conn.request("GET", "/metrics", headers={"Accept-Encoding": "gzip"})
            r = self.conn.getresponse()
            body = r.read()
        except (OSError, http.client.HTTPException):
            self.close()  # the next scrape connects again
            raise
        elapsed = time.perf_counter() - start
        if not self.keep_alive or r.will_close:
            self.close()
        if r.status != 200:
            raise RuntimeError(f"/metrics answered {r.status}")
        raw = gzip.decompress(body) if r.headers.get("Content-Encoding") == "gzip" else body
        return Scrape(elapsed, raw, len(body))

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


def scrape_seconds(url: str) -> float:
    """Wall time of one ``GET /metrics`` on a new connection (``Scraper``'s way otherwise)."""
    return Scraper(url, keep_alive=False).scrape().seconds


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

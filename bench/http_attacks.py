"""The hostile-peer attacks of issue 21 against the agent's HTTP endpoint, on loopback. Not a test.

Starts ``nodetune run --probes none --collectors none`` (or ``--server-cmd``, any command with a
``{port}`` placeholder, to try another server the same way) on 127.0.0.1, then runs each attack
while a prober asks ``/healthz`` every 0.5 s with a 1 s timeout, as a kubelet liveness probe does:

- ``slowloris``: N connections each send ``GET /metrics HTTP/1.1`` and a Host line without the
  blank line that ends the head, hold for ``--hold`` s, then half-close (EOF to the server) and
  read: any byte back is a response to a request cut off before its end.
- ``headers``: N connections each send 99 header lines of 65 KB, no end, and wait ``--hold`` s.
- ``reset``: N connections send half a request and reset (SO_LINGER 0).

With ``--web-config-file`` (and ``--ca``, ``--client-cert`` for the prober) the agent serves TLS;
the attacks then never finish a handshake (their bytes are not a ClientHello).

Reports per attack: the server's peak threads, open fds and RSS (``/proc/<pid>``), RSS some
seconds after the attack, /healthz probes failed and the slowest one, truncated requests that were
answered, and the lines the server logged. ``--repeat N`` runs the attacks N times against the
same server and ends with, per attack, the median and range of its RSS after minus the RSS before
the first attack (memory back to its baseline, and not growing from one attack to the next).
Every count is bounded (``--connections`` at most 10,000); every connection goes to 127.0.0.1.
Run: ``.venv/bin/python bench/http_attacks.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import shlex
import signal
import socket
import ssl
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
MAX_CONNECTIONS = 10_000
SLOW_HEAD = b"GET /metrics HTTP/1.1\r\nHost: x\r\n"
PHASES: dict[str, str] = {}
TLS: list[ssl.SSLContext | None] = [None]  # the prober's client context with --web-config-file


@dataclass
class Sample:
    threads: int = 0
    fds: int = 0
    rss_kb: int = 0


def sample(pid: int) -> Sample:
    s = Sample()
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("Threads:"):
                s.threads = int(line.split()[1])
            elif line.startswith("VmRSS:"):
                s.rss_kb = int(line.split()[1])
        s.fds = len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        pass
    return s


@dataclass
class Watch:
    """Samples the server and probes /healthz until stopped."""

    pid: int
    port: int
    peak: Sample = field(default_factory=Sample)
    probes: int = 0
    failed: int = 0
    slowest_s: float = 0.0
    started: float = field(default_factory=time.monotonic)
    failures: list[float] = field(default_factory=list)  # seconds into the attack
    _stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        while not self._stop.is_set():
            s = sample(self.pid)
            self.peak = Sample(
                max(self.peak.threads, s.threads), max(self.peak.fds, s.fds), max(self.peak.rss_kb, s.rss_kb)
            )
            start = time.monotonic()
            try:
                ok = urllib.request.urlopen(healthz_url(self.port), timeout=1, context=TLS[0]).status == 200
            except OSError:
                ok = False
            took = time.monotonic() - start
            self.probes += 1
            self.failed += not ok
            if not ok:
                self.failures.append(start - self.started)
            self.slowest_s = max(self.slowest_s, took)
            self._stop.wait(max(0.0, 0.5 - took))

    def __enter__(self) -> Watch:
        self._thread = threading.Thread(target=self.run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


def connect_many(port: int, n: int) -> list[socket.socket]:
    conns = []
    start = time.monotonic()
    for _ in range(n):
        try:
            conns.append(socket.create_connection((HOST, port), timeout=5))
        except OSError:  # refused or the backlog is full: count what got in
            break
    PHASES["connected after"] = f"{time.monotonic() - start:.1f} s"
    return conns


def slowloris(port: int, n: int, hold: float) -> dict[str, object]:
    conns = connect_many(port, n)
    for c in conns:
        with contextlib.suppress(OSError):
            c.sendall(SLOW_HEAD)
    time.sleep(hold)
    answered = 0
    for c in conns:
        with contextlib.suppress(OSError):
            c.shutdown(socket.SHUT_WR)  # the request ends here, before its blank line
    for c in conns:
        c.settimeout(0.05)
        with contextlib.suppress(OSError):
            answered += bool(c.recv(1))
        c.close()
    return {"connected": len(conns), "truncated requests answered": answered}


def big_headers(port: int, n: int, hold: float) -> dict[str, object]:
    line = b"X-Big: " + b"a" * 65_000 + b"\r\n"  # 65 KB, under http.client's 64 KiB line cap
    stop = threading.Event()
    refused = [0]

    def one() -> None:
        try:
            with socket.create_connection((HOST, port), timeout=hold + 10) as c:
                c.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
                for _ in range(99):
                    c.sendall(line)
                stop.wait(hold)
        except OSError:
            refused[0] += 1  # the server answered 431 and closed, or reset

    threads = [threading.Thread(target=one, daemon=True) for _ in range(n)]
    for t in threads:
        t.start()
    time.sleep(hold)
    stop.set()
    for t in threads:
        t.join(hold + 15)
    return {"connections cut by the server": refused[0]}


def resets(port: int, n: int, hold: float) -> dict[str, object]:
    linger = struct.pack("ii", 1, 0)
    for _ in range(n):
        try:
            c = socket.create_connection((HOST, port), timeout=5)
            c.sendall(b"GET /metrics HTTP/1.1\r\nHo")
            c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
            c.close()  # RST
        except OSError:
            pass
    time.sleep(hold)
    return {}


def noread(port: int, n: int, hold: float) -> dict[str, object]:
    """Peers that pipeline thousands of requests and never read an answer (review #4: with a cap of
    16 connections, 16 of them kept every /healthz probe out for 33 s)."""
    conns = []
    for _ in range(n):
        try:
            c = socket.socket()
            c.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2048)
            c.connect((HOST, port))
            c.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                c.send(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n" * 20_000)
            conns.append(c)
        except OSError:
            break
    time.sleep(hold)
    alive = 0
    for c in conns:
        with contextlib.suppress(OSError):
            c.send(b"")  # still open: a closed one raises (EPIPE) or was reset
            alive += 1
        c.close()
    return {"connected": len(conns), "still open at the end": alive}


ATTACKS = {"slowloris": slowloris, "headers": big_headers, "reset": resets, "noread": noread}


def healthz_url(port: int) -> str:
    return f"{'https' if TLS[0] else 'http'}://{HOST}:{port}/healthz"


def wait_ready(port: int, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}")
        try:
            urllib.request.urlopen(healthz_url(port), timeout=1, context=TLS[0])
            return
        except OSError:
            time.sleep(0.2)
    raise SystemExit("server not ready")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--attacks", default="slowloris,headers,reset")
    ap.add_argument("--connections", type=int, default=5000, help="slowloris and reset connections")
    ap.add_argument("--header-connections", type=int, default=30, help="connections of the large-header attack")
    ap.add_argument("--noread-connections", type=int, default=16, help="connections of the noread attack")
    ap.add_argument("--http-max-connections", type=int, default=0, help="passed to nodetune (0: its default)")
    ap.add_argument("--hold", type=float, default=5.0, help="seconds the attack connections stay open")
    ap.add_argument("--settle", type=float, default=10.0, help="seconds after an attack before RSS is read again")
    ap.add_argument("--repeat", type=int, default=1, help="run the attacks this many times on the same server")
    ap.add_argument("--web-config-file", help="run nodetune with this web config (TLS: give --ca, --client-cert)")
    ap.add_argument("--ca", help="CA of the server's certificate, for the prober")
    ap.add_argument("--client-cert", help="the prober's client certificate (its key: the same name, .key)")
    ap.add_argument("--server-cmd", default="", help="another server to attack, with {port} (default: nodetune)")
    args = ap.parse_args()
    if args.connections > MAX_CONNECTIONS or args.header_connections > 1000 or args.noread_connections > 1000:
        raise SystemExit(f"at most {MAX_CONNECTIONS} connections and 1000 header connections")
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # the attacker's own sockets
    with socket.socket() as s:
        s.bind((HOST, 0))
        port = s.getsockname()[1]
    if args.server_cmd:
        cmd = shlex.split(args.server_cmd.format(port=port))
    else:
        cmd = [sys.executable, "-m", "agent.cli", "run", "--listen", f"{HOST}:{port}"]
        cmd += ["--probes", "none", "--collectors", "none", "--cache-dir", tempfile.gettempdir()]
        if args.web_config_file:
            cmd += ["--web-config-file", args.web_config_file]
        if args.http_max_connections:
            cmd += ["--http-max-connections", str(args.http_max_connections)]
    if args.ca:
        TLS[0] = ssl.create_default_context(cafile=args.ca)
        if args.client_cert:
            TLS[0].load_cert_chain(args.client_cert, str(Path(args.client_cert).with_suffix(".key")))
    log = tempfile.NamedTemporaryFile(prefix="nodetune-http-attacks-", suffix=".log", delete=False)  # noqa: SIM115
    server = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=log)
    try:
        wait_ready(port, server)
        print(f"server pid {server.pid} on {HOST}:{port}: {' '.join(cmd)}")
        baseline = sample(server.pid)
        above: dict[str, list[float]] = {}  # MB above the baseline after each attack
        for name in args.attacks.split(",") * max(1, min(args.repeat, 20)):
            base = sample(server.pid)
            lines_before = Path(log.name).read_bytes().count(b"\n")
            n = {"headers": args.header_connections, "noread": args.noread_connections}.get(name, args.connections)
            with Watch(server.pid, port) as watch:
                result = ATTACKS[name](port, n, args.hold)
                time.sleep(1)
            after = Sample()
            deadline = time.monotonic() + args.settle
            while time.monotonic() < deadline:  # RSS once the server had time to let go
                time.sleep(0.5)
                after = sample(server.pid)
            lines = Path(log.name).read_bytes().count(b"\n") - lines_before
            print(
                f"{name} x{n}: threads peak {watch.peak.threads} (base {base.threads}); fds peak {watch.peak.fds}; "
                f"RSS {base.rss_kb / 1024:.0f} -> peak {watch.peak.rss_kb / 1024:.0f} -> "
                f"{after.rss_kb / 1024:.0f} MB {args.settle:.0f} s after; "
                f"/healthz failed {watch.failed}/{watch.probes}, "
                f"slowest {watch.slowest_s * 1e3:.0f} ms; log lines {lines}; "
                + "; ".join(f"{k} {v}" for k, v in {**result, **PHASES}.items())
            )
            above.setdefault(name, []).append((after.rss_kb - baseline.rss_kb) / 1024)
            if watch.failures:
                print("  failed probes at " + ", ".join(f"{t:.1f}" for t in watch.failures) + " s into the attack")
            PHASES.clear()
        print(f"baseline RSS {baseline.rss_kb / 1024:.1f} MB")
        for name, mb in above.items():
            print(
                f"{name}: RSS after minus baseline, median {statistics.median(mb):+.1f} MB "
                f"(range {min(mb):+.1f} .. {max(mb):+.1f}; in order: {', '.join(f'{x:+.1f}' for x in mb)})"
            )
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()
        print(f"server log: {log.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

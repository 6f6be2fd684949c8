"""The HTTP endpoint against hostile or broken peers (issue 21), with bounded counts on loopback:
slowloris heads, oversized heads, resets, cut-off requests, and the connection and fd limits.
``bench/http_attacks.py`` runs the same attacks at full size against a running agent."""

from __future__ import annotations

import asyncio.sslproto
import contextlib
import logging
import os
import resource
import socket
import ssl
import struct
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.core import CounterMetricFamily

from agent.exporter import Exporter, MetricsServer
from agent.httpserver import (
    ARM_STEPS,
    FD_RESERVE,
    HELLO_FLOOR,
    MAX_HEADERS,
    MAX_REQUEST_LINE,
    TLS_MAX_CONNECTIONS,
    TLS_READ_BUFFER,
    EventLog,
    HttpServer,
    Limits,
    Response,
    connection_cap,
    raise_nofile_limit,
    tls_caps,
)

SLOW_HEAD = b"GET /metrics HTTP/1.1\r\nHost: x\r\n"  # no blank line: the head never ends


class Things:
    def collect(self):
        c = CounterMetricFamily("nodetune_things", "Things.", labels=["unit"])
        c.add_metric(["a"], 1)
        return [c]


@pytest.fixture
def endpoint() -> Iterator:
    servers: list[MetricsServer] = []

    def start(limits: Limits | None = None) -> tuple[MetricsServer, int]:
        exporter = Exporter()
        exporter.register("things", Things())
        srv = MetricsServer(("127.0.0.1", 0), exporter, lambda: True, lambda: True, limits=limits)
        srv.start()
        servers.append(srv)
        return srv, srv.server_address[1]

    yield start
    for srv in servers:
        srv.stop()


def raw(port: int, data: bytes, timeout: float = 5.0) -> bytes:
    """Send ``data``, half-close, and return everything the server sends until it closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as c:
        with contextlib.suppress(OSError):
            c.sendall(data)
            c.shutdown(socket.SHUT_WR)
        out = b""
        with contextlib.suppress(OSError):
            while chunk := c.recv(65536):
                out += chunk
        return out


def closed_unanswered(c: socket.socket) -> bool:
    """The server closed (EOF) or reset the connection without sending anything."""
    try:
        return c.recv(1) == b""
    except ConnectionResetError:
        return True


def healthz(port: int, timeout: float) -> bool:
    try:
        return urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=timeout).status == 200
    except OSError:
        return False


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def rss_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def attack_size(wanted: int) -> int:
    """Connections the test can open: client and server ends are both in this process."""
    return max(50, min(wanted, (raise_nofile_limit() - FD_RESERVE - 100) // 2))


def test_slowloris_takes_no_thread_each_gets_no_answer_and_healthz_answers(endpoint) -> None:
    _, port = endpoint()
    n = attack_size(400)
    threads_before = threading.active_count()
    fds_before = open_fds()
    probes: list[bool] = []
    stop = threading.Event()

    def probe() -> None:  # as a kubelet liveness probe: every 0.2 s
        while not stop.is_set():
            probes.append(healthz(port, timeout=5))
            stop.wait(0.2)

    prober = threading.Thread(target=probe)
    prober.start()
    conns = []
    try:
        for _ in range(n):
            c = socket.create_connection(("127.0.0.1", port), timeout=5)
            c.sendall(SLOW_HEAD)
            conns.append(c)
        deadline = time.monotonic() + 10
        while open_fds() < fds_before + 2 * n and time.monotonic() < deadline:
            time.sleep(0.05)
        assert open_fds() >= fds_before + 2 * n  # the server holds all of them (a client and a server end each)...
        assert threading.active_count() <= threads_before + 1  # ...without a thread each (+1: the prober)
        assert healthz(port, timeout=5)
        for c in conns:
            c.shutdown(socket.SHUT_WR)  # each request ends before its blank line
        answered = 0
        for c in conns:
            with contextlib.suppress(OSError):
                answered += bool(c.recv(1))  # EOF (b"") or a reset: no answer
        assert answered == 0
    finally:
        stop.set()
        prober.join(10)
        for c in conns:
            c.close()
    assert probes and all(probes)


def test_a_full_server_closes_the_longest_waiting_connection_for_a_new_one(endpoint) -> None:
    srv, port = endpoint(Limits(max_connections=20))
    conns = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(60)]
    try:
        for c in conns:
            c.sendall(SLOW_HEAD)
        assert healthz(port, timeout=5)  # a liveness probe still gets in
        assert len(srv.http.connections) <= 20
        assert closed_unanswered(conns[0])
    finally:
        for c in conns:
            c.close()


def test_connection_cap_stays_below_the_open_files_limit() -> None:
    assert connection_cap(4096, 1024) == 1024 - FD_RESERVE
    assert connection_cap(100, 20000) == 100
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(soft, hard, 1024) - 1, hard))
        assert raise_nofile_limit() == hard
        assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == hard
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"GET /" + b"a" * MAX_REQUEST_LINE + b" HTTP/1.1\r\nHost: x\r\n\r\n", b"414"),
        (b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n", b"431"),
        (b"GET /metrics HTTP/1.1\r\nHost: x\r\n" + b"X-A: b\r\n" * MAX_HEADERS + b"\r\n", b"431"),
        (b"GET /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello", b"413"),
        (b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n", b"405"),
        (b"GARBAGE\r\n\r\n", b"400"),
    ],
)
def test_oversized_or_bad_heads_are_refused(endpoint, request_bytes: bytes, status: bytes) -> None:
    _, port = endpoint()
    answer = raw(port, request_bytes)
    assert answer.split(b" ", 2)[1] == status, answer[:200]
    assert b"nodetune_things" not in answer


def test_large_header_attack_costs_no_memory(endpoint) -> None:
    """30 connections send 99 header lines of 65 KB each and wait: each is cut off at the header
    cap, so the server's memory does not grow while they wait (http.server: +190 MB)."""
    _, port = endpoint()
    line = b"X-Big: " + b"a" * 65_000 + b"\r\n"
    before = rss_kb()
    sent = threading.Semaphore(0)
    release = threading.Event()
    statuses: list[bytes] = []

    def one() -> None:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as c:
            with contextlib.suppress(OSError):  # the server stops reading at its cap
                c.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
                for _ in range(99):
                    c.sendall(line)
            sent.release()
            release.wait(30)  # hold the connection open
            with contextlib.suppress(OSError):
                statuses.append(c.recv(12)[9:12])

    threads = [threading.Thread(target=one) for _ in range(30)]
    for t in threads:
        t.start()
    try:
        for _ in threads:
            assert sent.acquire(timeout=60)
        grown_mb = (rss_kb() - before) / 1024  # while all 30 wait
        assert healthz(port, timeout=5)
    finally:
        release.set()
        for t in threads:
            t.join(30)
    assert grown_mb < 40, f"RSS grew by {grown_mb:.0f} MB"
    assert set(statuses) <= {b"431", b""}


def test_a_cut_off_request_gets_no_answer(endpoint) -> None:
    _, port = endpoint()
    assert raw(port, SLOW_HEAD) == b""
    assert raw(port, b"GET /metrics HT") == b""
    assert raw(port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").startswith(b"HTTP/1.1 200")  # a whole one is


def test_an_unfinished_head_is_closed_after_the_read_timeout(endpoint) -> None:
    _, port = endpoint(Limits(read_timeout_s=0.5, idle_timeout_s=30))
    with socket.create_connection(("127.0.0.1", port), timeout=10) as c:
        c.sendall(SLOW_HEAD)
        started = time.monotonic()
        assert closed_unanswered(c)  # closed without an answer...
        assert time.monotonic() - started < 9  # ...by the read timeout, not by the 30 s idle timeout


def test_resets_mid_request_log_one_line_each_at_most(endpoint, caplog, capfd) -> None:
    caplog.set_level(logging.DEBUG)
    _, port = endpoint()
    linger = struct.pack("ii", 1, 0)
    for _ in range(50):
        c = socket.create_connection(("127.0.0.1", port), timeout=5)
        c.sendall(b"GET /metrics HTTP/1.1\r\nHo")
        c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
        c.close()
    assert healthz(port, timeout=5)  # served after every reset has been seen
    records = [r for r in caplog.records if r.name.startswith("agent")]
    assert len(records) <= 50
    assert not any(r.exc_info for r in records)
    assert all("\n" not in r.getMessage() for r in records)
    assert "Traceback" not in capfd.readouterr().err


def test_keep_alive_and_head(endpoint) -> None:
    _, port = endpoint()
    two = b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\nHEAD /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    answer = raw(port, two)
    get, head = answer.split(b"HTTP/1.1 200 OK\r\n")[1:]  # both answered on one connection
    assert b"nodetune_things" in get
    head_fields, head_body = head.split(b"\r\n\r\n", 1)
    length = [f for f in head_fields.split(b"\r\n") if f.lower().startswith(b"content-length: ")]
    assert head_body == b"" and int(length[0].split(b": ")[1]) > 100  # the length of the body it does not send


def test_stop_right_after_start_stops_the_server_thread() -> None:
    """A stop that arrived while the loop was still starting was once lost (the thread ran on)."""
    for _ in range(20):
        srv = MetricsServer(("127.0.0.1", 0), Exporter(), lambda: True, lambda: True)
        srv.start()
        srv.stop()
        assert srv.http._thread is None  # joined
        assert srv.http.loop.is_closed()


def test_event_log_folds_a_burst_into_one_line_and_counts_the_rest(caplog) -> None:
    caplog.set_level(logging.INFO, logger="agent.httpserver")
    events = EventLog(interval_s=60)
    for i in range(1000):
        events.note("cut", "request from %s cut off", f"peer{i}")
    events.flush()
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["http: request from peer0 cut off", "http: 999 more cut events since the last line of that kind"]


def test_a_client_that_does_not_read_does_not_hold_a_scrape_slot() -> None:
    """The slot is freed when rendering ends (the reviewer's slow.py: 4 slow readers kept Prometheus
    at 503); the unsent bodies are bounded by a byte budget instead (over it: 503), and a reader that
    stalls is cut off after the write timeout, which gives the budget back."""
    exporter = Exporter()
    exporter.render = lambda: b"x" * (32 << 20)  # more than loopback's socket buffers take
    srv = MetricsServer(
        ("127.0.0.1", 0), exporter, lambda: True, lambda: True, 1, Limits(write_timeout_s=2.0), None, 40 << 20
    )
    srv.start()
    port = srv.server_address[1]
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as stalled:
            stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            stalled.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")  # and never reads
            assert poll(lambda: srv.unsent > 0)
            # the one scrape slot is free: the next scrape is rendered, then over the byte budget
            assert raw(port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")[9:12] == b"503"
            assert b"still being sent" in raw(port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            assert poll_status(port, b"200", seconds=30)  # cut off after 2 s: the budget is back
    finally:
        srv.stop()


def test_slow_readers_do_not_keep_scrapes_out() -> None:
    """Four readers that take a 6 MB body in slowly, one slot: scrapes are still served."""
    exporter = Exporter()
    exporter.render = lambda: b"x" * (6 << 20)
    srv = MetricsServer(("127.0.0.1", 0), exporter, lambda: True, lambda: True, 1, Limits(write_timeout_s=60.0))
    srv.start()
    port = srv.server_address[1]
    slow = []
    try:
        for n in range(1, 5):  # one after the other: each was served, and holds its rendered body
            c = socket.create_connection(("127.0.0.1", port), timeout=10)
            c.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            c.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            slow.append(c)
            assert poll(lambda n=n: paused_writing(srv) == n)
        statuses = [raw(port, b"HEAD /metrics HTTP/1.1\r\nHost: x\r\n\r\n")[9:12] for _ in range(5)]
        assert statuses == [b"200"] * 5, statuses
    finally:
        for c in slow:
            c.close()
        srv.stop()


def test_a_405_keeps_the_connection_alive(endpoint) -> None:
    """The reviewer's t405.py: POST then GET on one connection gets both answers."""
    _, port = endpoint()
    out = raw(port, b"POST /metrics HTTP/1.1\r\nHost: x\r\n\r\nGET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 405 ") and out.count(b"HTTP/1.1 200 OK") == 1, out


def test_request_target_forms_and_content_length_zero(endpoint) -> None:
    _, port = endpoint()
    out = raw(port, b"GET http://127.0.0.1/healthz HTTP/1.1\r\nHost: x\r\n\r\n")  # absolute-form
    assert out.startswith(b"HTTP/1.1 200 "), out
    out = raw(port, b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 00\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 200 "), out


def test_stop_waits_for_a_scrape_being_rendered() -> None:
    """The reviewer's stop.py: after stop() no worker thread runs, and the slot was given back."""
    exporter = Exporter()
    rendering = threading.Event()

    def render() -> bytes:
        rendering.set()
        time.sleep(1.0)  # a slow scrape (the server's side; the test waits on events)
        return b"x 1\n"

    exporter.render = render
    srv = MetricsServer(("127.0.0.1", 0), exporter, lambda: True, lambda: True, 1)
    srv.start()
    with socket.create_connection(("127.0.0.1", srv.server_address[1]), timeout=10) as c:
        c.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        assert rendering.wait(10)
        srv.stop()
    assert [t.name for t in threading.enumerate() if t.name.startswith("http")] == []
    assert srv.scrape_slots.acquire(blocking=False)


@pytest.mark.parametrize("path", ["/healthz", "/metrics"])
def test_peers_that_never_read_cannot_keep_a_probe_out(path: str) -> None:
    """The reviewer's busy.py, bounded: every connection slot held by a peer that pipelines
    requests and never reads its answers; a new connection (the kubelet's probe) still gets in.
    /healthz: small answers the kernel takes in, the peer keeps the server busy; /metrics: 64 KiB
    answers fill the kernel's buffers, the writes pause."""
    exporter = Exporter()
    exporter.render = lambda: b"x" * 65536
    srv = MetricsServer(("127.0.0.1", 0), exporter, lambda: True, lambda: True, 4, Limits(max_connections=4))
    srv.start()
    port = srv.server_address[1]
    hogs = []
    senders = []
    requests = f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode() * 200_000  # more than it serves meanwhile

    def send(c: socket.socket) -> None:
        with contextlib.suppress(OSError):  # until the server or the test closes it
            c.sendall(requests)

    try:
        for _ in range(4):
            c = socket.socket()
            c.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2048)
            c.connect(("127.0.0.1", port))
            c.settimeout(30)
            hogs.append(c)
            senders.append(threading.Thread(target=send, args=(c,)))
            senders[-1].start()
        assert poll(lambda: len(srv.http.connections) == 4)
        # within a few probes (a hog may be between two requests, rendering, at the first one)
        assert poll(lambda: healthz(port, timeout=1), 3)
    finally:
        for c in hogs:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)
            c.close()
        for t in senders:
            t.join(30)
        srv.stop()


def test_tls_close_notify_after_a_request_logs_no_asyncio_warning(tmp_path: Path, caplog) -> None:
    """Returning True from eof_received is unsupported with TLS: asyncio warned per connection."""
    import subprocess

    from agent.web_config import WebConfigFile

    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "k.pem",
            "-out",
            "c.pem",
            "-days",
            "1",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
        ],
        cwd=tmp_path,
        check=True,
        capture_output=True,
    )
    (tmp_path / "web.yml").write_text("tls_server_config: {cert_file: c.pem, key_file: k.pem}\n")
    exporter = Exporter()
    srv = MetricsServer(
        ("127.0.0.1", 0), exporter, lambda: True, lambda: True, web_config=WebConfigFile(tmp_path / "web.yml")
    )
    srv.start()
    context = ssl.create_default_context(cafile=str(tmp_path / "c.pem"))
    try:
        with caplog.at_level(logging.DEBUG):
            for _ in range(3):
                with socket.create_connection(("127.0.0.1", srv.server_address[1]), timeout=10) as c:
                    s = context.wrap_socket(c, server_hostname="127.0.0.1")
                    s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
                    with contextlib.suppress(OSError, ssl.SSLError):
                        s.unwrap()  # close_notify right after the request
            assert poll(lambda: srv.http.connections == set(), 30), [
                (x.busy, x.closed, x.h11.our_state, x.h11.their_state, x.transport) for x in srv.http.connections
            ]
        assert asyncio.sslproto.SSLProtocol.max_size == TLS_READ_BUFFER
    finally:
        srv.stop()
    assert not [r for r in caplog.records if "eof_received" in r.getMessage()]
    assert asyncio.sslproto.SSLProtocol.max_size == 256 * 1024  # asyncio's own, put back


def paused_writing(srv: MetricsServer) -> int:
    """Connections whose response waits for its peer to read."""
    return sum(c.drained is not None and not c.drained.done() for c in list(srv.http.connections))


def poll(check, seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.05)
    return False


def poll_status(port: int, status: bytes, seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if raw(port, b"HEAD /metrics HTTP/1.1\r\nHost: x\r\n\r\n")[9:12] == status:
            return True
        time.sleep(0.1)
    return False


@pytest.fixture(scope="module")
def self_signed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A certificate for 127.0.0.1 and its key (cert.pem, key.pem), made by the openssl command."""
    import subprocess

    d = tmp_path_factory.mktemp("tls")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", "key.pem", "-out", "cert.pem", "-days", "1", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1"],
        cwd=d, check=True, capture_output=True,
    )  # fmt: skip
    return d


def tls_server(certs: Path, limits: Limits) -> HttpServer:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(str(certs / "cert.pem"), str(certs / "key.pem"))
    srv = HttpServer(("127.0.0.1", 0), lambda r: Response(200, b"ok\n"), workers=1, limits=limits, tls=lambda: context)
    srv.start()
    return srv


def tls_healthz(certs: Path, port: int) -> int:
    context = ssl.create_default_context(cafile=str(certs / "cert.pem"))
    with urllib.request.urlopen(f"https://127.0.0.1:{port}/healthz", timeout=10, context=context) as r:
        return r.status


def test_tls_sockets_get_no_tls_state_until_a_handshake_byte_and_are_bounded(self_signed: Path) -> None:
    """Issue 21, TLS flood: a socket on the TLS port gets a transport and TLS state only once its
    first byte is a TLS handshake record; until then it waits in a bounded queue, oldest evicted
    first, and any other first byte closes it unanswered."""
    srv = tls_server(self_signed, Limits(max_connections=4))
    port = srv.server_address[1]
    assert srv.hello_cap == 4
    bare = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(10)]
    try:
        for c in bare[:6]:  # accepted first, so evicted first
            assert closed_unanswered(c)
        assert poll(lambda: len(srv.hello_wait) == 4)
        assert srv.connections == set()  # no transport, no TLS state for any of them
        for c in bare[6:8]:
            c.sendall(SLOW_HEAD)  # plain HTTP on the TLS port
            assert closed_unanswered(c)
        assert poll(lambda: len(srv.hello_wait) == 2)
        assert srv.connections == set()
        assert tls_healthz(self_signed, port) == 200  # a real handshake still gets in
        assert poll(lambda: srv.connections == set())
    finally:
        for c in bare:
            c.close()
        srv.stop()
    assert not srv.hello_wait  # stop() closes what still waits


def test_tls_sockets_that_never_send_are_closed_after_the_read_timeout(self_signed: Path) -> None:
    srv = tls_server(self_signed, Limits(read_timeout_s=5.0))
    try:
        with socket.create_connection(("127.0.0.1", srv.server_address[1]), timeout=20) as c:
            assert poll(lambda: len(srv.hello_wait) == 1)  # for 5 s: no race
            assert 0 < next(iter(srv.hello_wait.values())) - srv.loop.time() <= 5.0
            assert closed_unanswered(c)
        assert poll(lambda: not srv.hello_wait)
    finally:
        srv.stop()


def test_tls_connections_and_waiting_sockets_share_one_fd_budget() -> None:
    """With TLS, connections and sockets waiting for their first bytes come out of one fd budget
    (the open-files limit minus FD_RESERVE); the waiting queue keeps a floor (a queue of 1 made two
    clients connecting at once close each other), the connections shrink for it."""
    assert tls_caps(4096, 1024) == (512 - HELLO_FLOOR, HELLO_FLOOR)  # hard limit 1024: was (512, 1)
    assert tls_caps(4096, 1 << 20) == (TLS_MAX_CONNECTIONS, 4096)
    assert tls_caps(4, 1 << 20) == (4, 4)
    for nofile in (1, 100, 513, 514, 600, 700, 1024, 1100, 1600, 4096):
        connections, waiting = tls_caps(4096, nofile)
        budget = max(2, nofile - FD_RESERVE)
        assert connections >= 1 and waiting >= min(HELLO_FLOOR, budget // 2) >= 1, nofile
        assert connections + waiting <= budget, nofile


TLS_SERVER_UNDER_NOFILE = """
import resource, ssl, sys
sys.path[:0] = sys.argv[2:]
from agent.httpserver import HttpServer, Response
resource.setrlimit(resource.RLIMIT_NOFILE, (1024, 1024))
context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
context.load_cert_chain(sys.argv[1] + "/cert.pem", sys.argv[1] + "/key.pem")
srv = HttpServer(("127.0.0.1", 0), lambda r: Response(200, b"ok"), workers=1, tls=lambda: context)
srv.start()
print(srv.server_address[1], srv.limits.max_connections, srv.hello_cap, flush=True)
sys.stdin.read()
srv.stop()
"""


def test_two_tls_clients_connecting_at_once_both_get_in(self_signed: Path) -> None:
    """A hard open-files limit of 1024 (a server in a child process, so the limit of this one
    stays): two clients that both connect, then both handshake, are both served (with a waiting
    queue of 1 the second accept closed the first)."""
    import subprocess
    import sys

    child = subprocess.Popen(
        [sys.executable, "-c", TLS_SERVER_UNDER_NOFILE, str(self_signed), *sys.path],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        port, connections, waiting = map(int, child.stdout.readline().split())
        assert (connections, waiting) == tls_caps(4096, 1024)
        context = ssl.create_default_context(cafile=str(self_signed / "cert.pem"))
        socks = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(2)]
        with contextlib.ExitStack() as stack:
            for c in socks:
                stack.enter_context(c)
            tls = [stack.enter_context(context.wrap_socket(c, server_hostname="127.0.0.1")) for c in socks]
            for c in tls:
                c.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            assert [c.recv(12) for c in tls] == [b"HTTP/1.1 200"] * 2
    finally:
        child.communicate(timeout=30)  # stdin closed: the child stops its server and exits


def client_hello() -> bytes:
    """The first flight of a TLS client (a ClientHello record), made in memory."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    out = ssl.MemoryBIO()
    client = context.wrap_bio(ssl.MemoryBIO(), out)
    with pytest.raises(ssl.SSLWantReadError):
        client.do_handshake()
    return out.read()


def test_tls_read_timeout_counts_from_the_accept_not_from_the_first_bytes(self_signed: Path) -> None:
    """The time a TLS socket waits for its first bytes counts in its read timeout: the connection
    made from it is armed with the deadline of its accept (to within one step, never later), not a
    fresh read timeout (which let a head take up to twice the timeout)."""
    srv = tls_server(self_signed, Limits(read_timeout_s=5.0))
    step = 5.0 / ARM_STEPS
    try:
        with socket.create_connection(("127.0.0.1", srv.server_address[1]), timeout=10) as c:
            assert poll(lambda: len(srv.hello_wait) == 1)
            accept_deadline = next(iter(srv.hello_wait.values()))
            c.sendall(client_hello())
            assert poll(lambda: len(srv.connections) == 1)
            conn = next(iter(srv.connections))
            assert conn.accept_deadline == accept_deadline
            assert conn.deadlines is not None
            assert accept_deadline - step <= conn.deadlines[conn] <= accept_deadline
            c.settimeout(20)
            with contextlib.suppress(ConnectionResetError):
                while c.recv(65536):  # the server's handshake flight, then its close
                    pass
        assert poll(lambda: not srv.connections)
    finally:
        srv.stop()


@pytest.mark.parametrize(
    "first_bytes",
    [
        b"\x16\x07\x01\x00\x30" + b"\x01" * 48,  # a handshake record of version major 7
        b"\x16\x03\x01\x48\x01" + b"\x01" * 48,  # of 18,433 bytes: longer than any record
        b"\x16\x03\x01\x00\x00",  # of none
        b"\x16GET / HTTP/1.1\r\n",  # 0x16, then plain HTTP
    ],
)
def test_tls_gate_checks_the_whole_record_header(self_signed: Path, first_bytes: bytes) -> None:
    """Only the 5-byte header of a TLS handshake record (type 22, version 3.x, a length a record
    may have) gets a socket its transport and TLS state; a first byte of 22 is not enough."""
    srv = tls_server(self_signed, Limits(read_timeout_s=30))
    try:
        with socket.create_connection(("127.0.0.1", srv.server_address[1]), timeout=10) as c:
            c.sendall(first_bytes)
            assert closed_unanswered(c)
        assert poll(lambda: not srv.hello_wait)
        assert srv.accepted == 1 and not srv.connections  # never got a transport
    finally:
        srv.stop()


def test_a_tls_record_header_sent_in_pieces_gets_through(self_signed: Path) -> None:
    srv = tls_server(self_signed, Limits(read_timeout_s=30))
    hello = client_hello()
    try:
        with socket.create_connection(("127.0.0.1", srv.server_address[1]), timeout=10) as c:
            c.sendall(hello[:3])
            assert poll(lambda: len(srv.hello_wait) == 1)
            assert not srv.connections  # the header is not complete
            c.sendall(hello[3:])
            assert c.recv(3) == b"\x16\x03\x03"  # the server's handshake flight: a ServerHello
            assert len(srv.connections) == 1
            assert srv.accepted == 1  # counted once, at its accept (not again when its transport came)
    finally:
        srv.stop()


def test_a_tls_port_after_tls_was_turned_off_says_restart(self_signed: Path, caplog) -> None:
    """A reload that turned TLS off: a socket accepted on the TLS port is closed with the restart
    hint, not told that its bytes are not a TLS handshake."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(str(self_signed / "cert.pem"), str(self_signed / "key.pem"))
    config: list[ssl.SSLContext | None] = [context]
    srv = HttpServer(("127.0.0.1", 0), lambda r: Response(200), workers=1, tls=lambda: config[0])
    srv.start()
    config[0] = None  # the reloaded web config has no TLS
    try:
        with caplog.at_level(logging.INFO, logger="agent.httpserver"):
            with socket.create_connection(("127.0.0.1", srv.server_address[1]), timeout=10) as c:
                c.sendall(SLOW_HEAD)
                assert closed_unanswered(c)
            assert poll(lambda: "TLS turned on or off, restart" in caplog.text)
        assert "not a TLS handshake" not in caplog.text
    finally:
        srv.stop()


def test_stopping_amid_tls_handshakes_leaves_no_socket_nor_task(self_signed: Path) -> None:
    """stop() while sockets are being handed to transports and handshakes run: every socket of
    the server is closed (its peers see it) and no table keeps an entry."""
    srv = tls_server(self_signed, Limits(read_timeout_s=30))
    fds_before = open_fds()
    hello = client_hello()
    clients = [socket.create_connection(("127.0.0.1", srv.server_address[1]), timeout=10) for _ in range(20)]
    try:
        assert poll(lambda: len(srv.hello_wait) + len(srv.handing) + len(srv.connections) == 20)
        for c in clients:
            c.sendall(hello)
        srv.stop()
        assert not any(srv.table_sizes().values()), srv.table_sizes()
        for c in clients:
            with contextlib.suppress(ConnectionResetError):
                while c.recv(65536):  # the server's handshake flight, if it got that far; then EOF
                    pass
    finally:
        for c in clients:
            c.close()
    assert open_fds() <= fds_before


# --- memory after a flood (issue 21): what a connection holds, and that it all goes ---


def test_unfinished_heads_hold_no_parser_nor_timer_and_every_table_empties(endpoint) -> None:
    """A slowloris connection holds its buffered bytes and one entry in a deadline queue: no h11
    parser and no TimerHandle each (a flood of them pinned memory after it, see README). Once
    they have gone, every per-connection table of the server is empty."""
    srv, port = endpoint()
    conns = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(50)]
    try:
        for c in conns:
            c.sendall(SLOW_HEAD)
        assert poll(lambda: sum(x.head_bytes == len(SLOW_HEAD) for x in list(srv.http.connections)) == 50)
        held = list(srv.http.connections)
        assert all(x.h11 is None and x.head == SLOW_HEAD for x in held)
        assert srv.http.table_sizes()["deadlines"] == 50  # one entry each, in one of two queues
        assert len(srv.http.deadline_queues) == 1  # all armed with the read timeout
        with socket.create_connection(("127.0.0.1", port), timeout=10) as c:
            c.sendall(SLOW_HEAD + b"\r\n")  # a complete head gets its parser and an answer
            assert c.recv(12) == b"HTTP/1.1 200"
    finally:
        for c in conns:
            c.close()
    assert poll(lambda: not any(srv.http.table_sizes().values())), srv.http.table_sizes()


def test_bad_heads_get_their_400_as_when_h11_saw_every_byte(endpoint) -> None:
    """Bytes wait for the end of their head before h11 sees them, except a head h11 refuses at its
    first byte (a control byte or a space: a TLS ClientHello on the plain port): answers are as
    when h11 parsed every byte on arrival."""
    _, port = endpoint()
    assert raw(port, b"GET / HTTP/1.1\r\nno colon here\r\n\r\n")[:12] == b"HTTP/1.1 400"
    with socket.create_connection(("127.0.0.1", port), timeout=10) as c:
        c.sendall(b"\x16\x03\x01\x02\x00\x01")  # the start of a ClientHello, no EOF
        assert c.recv(12) == b"HTTP/1.1 400"
    assert raw(port, b" GET / HTTP/1.1\r\n")[:12] == b"HTTP/1.1 400"
    assert raw(port, SLOW_HEAD) == b""  # a valid head cut off: no answer


def test_compacting_the_tables_keeps_timeouts_and_keep_alive_working(endpoint) -> None:
    """compact() (after a burst) replaces every per-connection table with a copy: a connection
    still times out from its new deadline queue, and a kept-alive one still gets answers."""
    srv, port = endpoint(Limits(read_timeout_s=5.0, idle_timeout_s=30))
    with (
        socket.create_connection(("127.0.0.1", port), timeout=20) as slow,
        socket.create_connection(("127.0.0.1", port), timeout=10) as alive,
    ):
        slow.sendall(SLOW_HEAD)
        alive.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert alive.recv(12) == b"HTTP/1.1 200"
        assert poll(lambda: len(srv.http.connections) == 2 and not srv.http.tasks)
        connections, queues = srv.http.connections, list(srv.http.deadline_queues.values())
        done = threading.Event()
        srv.http.loop.call_soon_threadsafe(lambda: (srv.http.compact(), done.set()))
        assert done.wait(10)
        assert srv.http.connections is not connections and srv.http.connections == connections
        assert not any(q is old for q in srv.http.deadline_queues.values() for old in queues)
        in_queues = [c for c in srv.http.connections if c.deadlines is not None]
        assert len(in_queues) == 2  # the slow head (read timeout) and the kept-alive one (idle)
        assert all(any(c.deadlines is q for q in srv.http.deadline_queues.values()) for c in in_queues)
        assert closed_unanswered(slow)  # by the read timeout, from the copied queue
        alive.recv(65536)  # the rest of the first answer
        alive.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert alive.recv(12) == b"HTTP/1.1 200"
    assert poll(lambda: not any(srv.http.table_sizes().values())), srv.http.table_sizes()

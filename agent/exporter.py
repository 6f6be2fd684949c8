"""Prometheus exposition: every probe and collector is a *unit*, wrapped so one failing never fails
the scrape, plus the HTTP server for /metrics, /healthz and /readyz.

Each scrape calls every unit's ``collect()`` once, in the scraping thread, and adds
``nodetune_scrape_collector_success{collector}`` and ``..._duration_seconds{collector}`` (the
node_exporter pattern). Families of the same name from several units are merged so the exposition
never repeats a metric name. Nothing is collected outside a scrape (pull, not push).
"""

from __future__ import annotations

import gzip
import logging
import threading
import time
from collections.abc import Callable, Iterable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Protocol

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.metrics_core import Metric

from probes.families import CompactFamily

log = logging.getLogger(__name__)

IDLE_TIMEOUT_S = 30.0  # Prometheus keeps connections alive between scrapes (default interval 15-60 s)


class Unit(Protocol):
    """Anything with ``collect()``: probes and collectors."""

    def collect(self) -> Iterable[Metric]: ...


class _Metrics:
    """Adapter so ``generate_latest`` can render a list of families."""

    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> list[Metric]:
        return self.families


def render(families: list[Metric]) -> bytes:
    """The text exposition of ``families``, byte-identical to ``generate_latest``'s.

    ``generate_latest`` writes each family independently, so families are rendered one by one: a
    ``CompactFamily`` (per-workload histograms, counters and gauges, probes/families.py) writes its
    own text, which at 500 workloads turns a 400 ms scrape into tens of ms; every other family is
    the library's.
    """
    parts: list[bytes] = []
    for family in families:
        if isinstance(family, CompactFamily) and not family.materialized:
            parts.append(family.exposition().encode())
        else:
            parts.append(generate_latest(_Metrics([family])))
    return b"".join(parts)


class Exporter:
    """Holds the units and renders one scrape."""

    def __init__(self) -> None:
        self._units: dict[str, Unit] = {}
        self._last_error: dict[str, str] = {}
        self._lock = threading.Lock()

    def register(self, name: str, unit: Unit) -> None:
        with self._lock:
            if name in self._units:
                raise ValueError(f"unit {name!r} registered twice")
            self._units[name] = unit

    def unregister(self, name: str) -> None:
        with self._lock:
            self._units.pop(name, None)

    def _note(self, name: str, error: str | None) -> None:
        """Log a unit's failure once per distinct error, and its recovery once."""
        with self._lock:
            previous = self._last_error.get(name)
            if error == previous:
                return
            if error is None:
                self._last_error.pop(name, None)
            else:
                self._last_error[name] = error
        if error is None:
            log.info("collector %s recovered", name)
        else:
            log.error("collector %s failed: %s", name, error)

    def scrape(self) -> list[Metric]:
        with self._lock:
            units = list(self._units.items())
        success = GaugeMetricFamily(
            "nodetune_scrape_collector_success",
            "Whether a collector or probe succeeded in this scrape (1) or failed (0).",
            labels=["collector"],
        )
        duration = GaugeMetricFamily(
            "nodetune_scrape_collector_duration_seconds",
            "Time a collector or probe took in this scrape.",
            labels=["collector"],
        )
        families: dict[str, Metric] = {}

        def add(collected: list[Metric]) -> None:
            """Merge a unit's families into the scrape: all of them, or none if one conflicts."""
            for family in collected:
                existing = families.get(exposed_name(family))
                if existing is not None and existing.type != family.type:
                    raise TypeError(f"metric {family.name} exported as {existing.type} and {family.type}")
            for family in collected:
                key = exposed_name(family)
                existing = families.get(key)
                if existing is None:
                    families[key] = family
                else:
                    existing.samples.extend(family.samples)

        for name, unit in units:
            start = time.perf_counter()
            try:
                add(list(unit.collect()))
                ok, error = True, None
            except Exception as e:  # a unit's bug or a kernel error: report, keep serving
                ok, error = False, f"{type(e).__name__}: {e}"
            self._note(name, error)
            success.add_metric([name], 1.0 if ok else 0.0)
            duration.add_metric([name], time.perf_counter() - start)
        return [*families.values(), success, duration]

    def render(self) -> bytes:
        return render(self.scrape())


def exposed_name(family: Metric) -> str:
    """The name on a family's HELP/TYPE lines in the text format (0.0.4): a counter's carries
    ``_total``, so counter ``x_total`` and histogram ``x`` (its samples ``x_bucket``, ``x_sum``,
    ``x_count``) are distinct metrics, as nodetune_lock_contention_wait_seconds{,_total} are."""
    return family.name + "_total" if family.type == "counter" else family.name


def accepts_gzip(header: str) -> bool:
    """Whether an ``Accept-Encoding`` value allows gzip (RFC 9110 12.5.3: q-values, ``*``, ``q=0`` refuses)."""
    best: float | None = None
    wildcard: float | None = None
    for item in header.split(","):
        coding, _, params = item.strip().partition(";")
        q = 1.0
        for param in params.split(";"):
            key, _, value = param.strip().partition("=")
            if key.strip().lower() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        coding = coding.strip().lower()
        if coding in ("gzip", "x-gzip"):
            best = q if best is None else max(best, q)
        elif coding == "*":
            wildcard = q
    if best is None:
        best = wildcard
    return best is not None and best > 0


class _Handler(BaseHTTPRequestHandler):
    server: MetricsServer
    protocol_version = "HTTP/1.1"
    timeout = IDLE_TIMEOUT_S  # socket timeout: an idle keep-alive connection is closed after this

    def log_message(self, format: str, *args: object) -> None:
        log.debug("http %s %s", self.address_string(), format % args)

    def _send(self, status: int, body: bytes, content_type: str = "text/plain; charset=utf-8") -> None:
        headers = {"Content-Type": content_type, "Vary": "Accept-Encoding"}
        if len(body) > 1024 and accepts_gzip(self.headers.get("Accept-Encoding", "")):
            body = gzip.compress(body, compresslevel=1)
            headers["Content-Encoding"] = "gzip"
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        srv = self.server
        if path == "/metrics":
            if not srv.scrape_slots.acquire(blocking=False):
                self._send(HTTPStatus.SERVICE_UNAVAILABLE, b"too many concurrent scrapes\n")
                return
            try:
                body = srv.exporter.render()
            except Exception:  # never expected: units are already isolated
                log.exception("rendering /metrics failed")
                self._send(HTTPStatus.INTERNAL_SERVER_ERROR, b"internal error\n")
                return
            finally:
                srv.scrape_slots.release()
            self._send(HTTPStatus.OK, body, CONTENT_TYPE_LATEST)
        elif path == "/healthz":
            ok = srv.healthy()
            self._send(HTTPStatus.OK if ok else HTTPStatus.SERVICE_UNAVAILABLE, b"ok\n" if ok else b"stalled\n")
        elif path == "/readyz":
            ok = srv.ready()
            self._send(HTTPStatus.OK if ok else HTTPStatus.SERVICE_UNAVAILABLE, b"ok\n" if ok else b"starting\n")
        elif path == "/":
            self._send(HTTPStatus.OK, b"nodetune: /metrics /healthz /readyz\n")
        else:
            self._send(HTTPStatus.NOT_FOUND, b"not found\n")


class MetricsServer(ThreadingHTTPServer):
    """HTTP server on its own thread; probes and the main loop never block on it.

    One thread per connection; a connection idle for ``IDLE_TIMEOUT_S`` is closed, so idle
    keep-alive clients cannot pile up threads, and the listen backlog is deep enough that a burst
    of connections does not keep a scrape out.
    """

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 256

    def __init__(
        self,
        address: tuple[str, int],
        exporter: Exporter,
        healthy: Callable[[], bool],
        ready: Callable[[], bool],
        max_concurrent_scrapes: int = 4,
    ) -> None:
        if ":" in address[0]:
            import socket

            self.address_family = socket.AF_INET6
        super().__init__(address, _Handler)
        self.exporter = exporter
        self.healthy = healthy
        self.ready = ready
        self.scrape_slots = threading.BoundedSemaphore(max_concurrent_scrapes)
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self.serve_forever, name="http", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self.shutdown()
        self.server_close()

"""Prometheus exposition: every probe and collector is a *unit*, wrapped so one failing never fails
the scrape, plus the routes of /metrics, /healthz and /readyz (served by ``agent.httpserver``).

Each scrape calls every unit's ``collect()`` once, in the scraping thread, and adds
``nodetune_scrape_collector_success{collector}`` and ``..._duration_seconds{collector}`` (the
node_exporter pattern). Families of the same name from several units are merged so the exposition
never repeats a metric name. Nothing is collected outside a scrape (pull, not push).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import gzip
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Iterable
from http import HTTPStatus
from typing import Protocol

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.metrics_core import Metric

from agent.httpserver import HttpServer, Limits, Request, Response, Work
from agent.web_config import WebConfigFile
from metrics.exposition import CompactFamily

log = logging.getLogger(__name__)


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
    ``CompactFamily`` (per-workload histograms, counters and gauges, metrics/exposition.py) writes its
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


def _text(status: int, body: bytes, headers: list[tuple[str, str]] | None = None) -> Response:
    return Response(status, body, [("Content-Type", "text/plain; charset=utf-8"), *(headers or [])])


def encode(body: bytes, content_type: str, accept_encoding: str) -> tuple[bytes, list[tuple[str, str]]]:
    """The body as sent (gzipped when the client allows it and it is worth it) and its headers."""
    headers = [("Content-Type", content_type), ("Vary", "Accept-Encoding")]
    if len(body) > 1024 and accepts_gzip(accept_encoding):
        body = gzip.compress(body, compresslevel=1)
        headers.append(("Content-Encoding", "gzip"))
    return body, headers


AUTH_QUEUE = 8  # password checks waiting for the auth thread; more get 503 at once
UNSENT_BUDGET_BYTES = 64 << 20  # rendered /metrics bodies not yet sent, all connections together


class MetricsServer:
    """/metrics, /healthz, /readyz and / over ``agent.httpserver`` (its docstring says what a peer
    may cost). /healthz and /readyz are answered on the event loop and never wait for a scrape nor
    depend on the web config. /metrics (and /) first pass basic auth when a web config sets users:
    credentials checked before are answered from a cache on the loop, others are checked by bcrypt
    on one auth thread (at most ``AUTH_QUEUE`` waiting, more get 503), so wrong passwords never
    take a scrape slot. Then /metrics takes one of ``max_concurrent_scrapes`` slots (none free: 503)
    for rendering and gzipping on a worker thread; the slot is freed when rendering ends, and the
    bodies still being sent are bounded by ``unsent_budget_bytes`` (over it: 503), so slow readers
    hold memory, not slots.
    """

    def __init__(
        self,
        address: tuple[str, int],
        exporter: Exporter,
        healthy: Callable[[], bool],
        ready: Callable[[], bool],
        max_concurrent_scrapes: int = 4,
        limits: Limits | None = None,
        web_config: WebConfigFile | None = None,
        unsent_budget_bytes: int = UNSENT_BUDGET_BYTES,
    ) -> None:
        self.exporter = exporter
        self.healthy = healthy
        self.ready = ready
        self.web_config = web_config
        self.scrape_slots = threading.BoundedSemaphore(max_concurrent_scrapes)
        self.unsent_budget_bytes = unsent_budget_bytes
        self.unsent = 0  # bytes of rendered bodies not yet sent (under _unsent_lock)
        self._unsent_lock = threading.Lock()
        self.auth_waiting = 0  # password checks queued or running (event loop only)
        self.auth_thread = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="http-auth")
        if web_config is not None:
            exporter.register("web_config", web_config)
        self.http = HttpServer(
            address,
            self.handle,
            workers=max_concurrent_scrapes,
            limits=limits,
            tls=web_config.tls if web_config else (lambda: None),
            check_peer=web_config.check_peer if web_config else (lambda cert: ""),
            extra_headers=web_config.headers if web_config else (lambda: []),
            generation=web_config.tls_generation if web_config else (lambda: 0),
        )
        self.server_address = self.http.server_address

    def handle(self, request: Request) -> Response | Work | Awaitable[Response | Work]:
        """Route one request (event loop: only cheap answers here; the rest is ``Work``)."""
        if request.path == "/healthz":
            ok = self.healthy()
            return _text(HTTPStatus.OK if ok else HTTPStatus.SERVICE_UNAVAILABLE, b"ok\n" if ok else b"stalled\n")
        if request.path == "/readyz":
            ok = self.ready()
            return _text(HTTPStatus.OK if ok else HTTPStatus.SERVICE_UNAVAILABLE, b"ok\n" if ok else b"starting\n")
        if request.path not in ("/metrics", "/"):
            return _text(HTTPStatus.NOT_FOUND, b"not found\n")
        if self.web_config is None:
            return self._scrape(request)
        authorization = request.headers.get("authorization", "")
        known = self.web_config.cached(authorization)
        if known is None:
            return self._authenticate(request, authorization)
        return self._scrape(request) if known else self._unauthorized(request)

    async def _authenticate(self, request: Request, authorization: str) -> Response | Work:
        """A password not checked before: bcrypt on the auth thread, one at a time."""
        assert self.web_config is not None
        if self.auth_waiting >= AUTH_QUEUE:
            self.http.events.note("auth", "503 to %s: %d password checks waiting", request.peer, self.auth_waiting)
            return _text(HTTPStatus.SERVICE_UNAVAILABLE, b"too many password checks waiting\n")
        self.auth_waiting += 1
        try:
            loop = asyncio.get_running_loop()
            ok = await loop.run_in_executor(self.auth_thread, self.web_config.authorized, authorization)
        finally:
            self.auth_waiting -= 1
        return self._scrape(request) if ok else self._unauthorized(request)

    def _unauthorized(self, request: Request) -> Response:
        self.http.events.note("auth", "401 to %s: %s", request.peer, "no or wrong basic auth credentials")
        return _text(HTTPStatus.UNAUTHORIZED, b"unauthorized\n", [("WWW-Authenticate", 'Basic realm="nodetune"')])

    def _scrape(self, request: Request) -> Response | Work:
        if request.path == "/":
            return _text(HTTPStatus.OK, b"nodetune: /metrics /healthz /readyz\n")
        if not self.scrape_slots.acquire(blocking=False):
            return _text(HTTPStatus.SERVICE_UNAVAILABLE, b"too many concurrent scrapes\n")
        sent: list[int] = []  # bytes counted in self.unsent for this response

        def run() -> Response:
            try:
                response = self._render(request)
            finally:
                self.scrape_slots.release()  # rendering is over: a slow reader holds memory, not a slot
            with self._unsent_lock:
                if self.unsent + len(response.body) > self.unsent_budget_bytes:
                    return _text(HTTPStatus.SERVICE_UNAVAILABLE, b"too many responses still being sent\n")
                self.unsent += len(response.body)
            sent.append(len(response.body))
            return response

        def done() -> None:
            with self._unsent_lock:
                self.unsent -= sum(sent)

        return Work(run, done)

    def _render(self, request: Request) -> Response:
        """The /metrics body (worker thread)."""
        try:
            body = self.exporter.render()
        except Exception:  # never expected: units are already isolated
            log.exception("rendering /metrics failed")
            return _text(HTTPStatus.INTERNAL_SERVER_ERROR, b"internal error\n")
        body, headers = encode(body, CONTENT_TYPE_LATEST, request.headers.get("accept-encoding", ""))
        return Response(HTTPStatus.OK, body, headers)

    def start(self) -> None:
        self.http.start()

    def stop(self) -> None:
        self.http.stop()
        self.auth_thread.shutdown(wait=True, cancel_futures=True)  # at most one bcrypt check

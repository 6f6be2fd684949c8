"""Exporter: per-unit success/duration, isolation of failing units, HTTP endpoints and limits."""

from __future__ import annotations

import gzip
import logging
import socket
import threading
import time
import urllib.request

import pytest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from agent.exporter import Exporter, MetricsServer
from agent.httpserver import Limits
from tests.conftest import http_get, parse_metrics


class Good:
    def __init__(self, value: float = 1.0) -> None:
        self.value = value

    def collect(self):
        g = CounterMetricFamily("nodetune_things", "Things.", labels=["unit"])
        g.add_metric([str(self.value)], self.value)
        return [g]


class Raising:
    def __init__(self) -> None:
        self.fail = True

    def collect(self):
        if self.fail:
            raise RuntimeError("map read failed")
        return []


class Blocking:
    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()

    def collect(self):
        self.entered.set()
        self.release.wait(10)
        return []


def test_failing_unit_reports_success_zero_and_others_still_answer(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    exporter = Exporter()
    exporter.register("good", Good(1))
    exporter.register("also_good", Good(2))  # same family from two units: merged, not repeated
    raising = Raising()
    exporter.register("raising", raising)
    text = exporter.render().decode()
    assert text.count("# TYPE nodetune_things") == 1
    m = parse_metrics(text)
    assert sorted(s.value for s in m["nodetune_things"]) == [1.0, 2.0]
    success = {s.labels["collector"]: s.value for s in m["nodetune_scrape_collector_success"]}
    assert success == {"good": 1.0, "also_good": 1.0, "raising": 0.0}
    assert {s.labels["collector"] for s in m["nodetune_scrape_collector_duration_seconds"]} == set(success)
    exporter.render()
    assert sum("collector raising failed" in r.message for r in caplog.records) == 1  # logged once, not per scrape
    raising.fail = False
    exporter.render()
    assert any("collector raising recovered" in r.message for r in caplog.records)


def test_conflicting_types_for_one_name_fail_only_the_second_unit() -> None:
    class Gauge:  # TYPE line "nodetune_things_total gauge" against Good's "nodetune_things_total counter"
        def collect(self):
            g = GaugeMetricFamily("nodetune_things_total", "Things.")
            g.add_metric([], 1)
            return [g]

    exporter = Exporter()
    exporter.register("good", Good())
    exporter.register("gauge", Gauge())
    m = parse_metrics(exporter.render().decode())
    assert {s.labels["collector"]: s.value for s in m["nodetune_scrape_collector_success"]} == {"good": 1, "gauge": 0}
    assert [s.value for s in m["nodetune_things"]] == [1.0]  # nothing of the failed unit leaks in


def test_a_histogram_and_a_counter_named_alike_are_two_metrics() -> None:
    """Histogram x (x_bucket, x_sum, x_count) and counter x_total: distinct in the text format, as
    nodetune_lock_contention_wait_seconds and nodetune_lock_contention_wait_seconds_total are."""

    class Both:
        def collect(self):
            h = HistogramMetricFamily("nodetune_waits_seconds", "Waits.", labels=["t"])
            h.add_metric(["a"], [("1.0", 1), ("+Inf", 2)], 3.0)
            c = CounterMetricFamily("nodetune_waits_seconds", "Total wait.", labels=["t", "caller"])
            c.add_metric(["a", "f"], 3.0)
            return [h, c]

    exporter = Exporter()
    exporter.register("both", Both())
    text = exporter.render().decode()
    assert "# TYPE nodetune_waits_seconds histogram" in text
    assert "# TYPE nodetune_waits_seconds_total counter" in text
    assert 'nodetune_waits_seconds_total{caller="f",t="a"} 3.0' in text
    assert 'nodetune_waits_seconds_count{t="a"} 2.0' in text


def test_duplicate_registration_is_an_error() -> None:
    exporter = Exporter()
    exporter.register("a", Good())
    with pytest.raises(ValueError):
        exporter.register("a", Good())


@pytest.fixture
def server():
    servers: list[MetricsServer] = []

    def start(exporter: Exporter, healthy=lambda: True, ready=lambda: True, limit: int = 4, limits=None) -> str:
        srv = MetricsServer(("127.0.0.1", 0), exporter, healthy, ready, max_concurrent_scrapes=limit, limits=limits)
        srv.start()
        servers.append(srv)
        return f"http://127.0.0.1:{srv.server_address[1]}"

    yield start
    for srv in servers:
        srv.stop()


def test_http_endpoints(server) -> None:
    state = {"healthy": True, "ready": False}
    exporter = Exporter()
    exporter.register("good", Good())
    url = server(exporter, healthy=lambda: state["healthy"], ready=lambda: state["ready"])
    status, body = http_get(url + "/metrics")
    assert status == 200 and "nodetune_things" in body
    assert http_get(url + "/healthz")[0] == 200
    assert http_get(url + "/readyz")[0] == 503
    state.update(healthy=False, ready=True)
    assert http_get(url + "/healthz")[0] == 503
    assert http_get(url + "/readyz")[0] == 200
    assert http_get(url + "/other")[0] == 404


def test_gzip_when_asked(server) -> None:
    exporter = Exporter()
    for i in range(50):
        exporter.register(f"unit{i}", Good(i))
    url = server(exporter)
    req = urllib.request.Request(url + "/metrics", headers={"Accept-Encoding": "gzip"})
    with urllib.request.urlopen(req, timeout=10) as r:
        assert r.headers["Content-Encoding"] == "gzip"
        assert b"nodetune_things" in gzip.decompress(r.read())


@pytest.mark.parametrize(
    ("header", "gzipped"),
    [
        ("gzip", True),
        ("gzip;q=0", False),
        ("gzip; q=0.0, identity", False),
        ("identity;q=1, gzip;q=0.5", True),
        ("*", True),
        ("*;q=0", False),
        ("br, deflate", False),
        ("GZIP;Q=0.3", True),
        ("", False),
    ],
)
def test_accept_encoding_q_values(server, header: str, gzipped: bool) -> None:
    exporter = Exporter()
    for i in range(50):
        exporter.register(f"unit{i}", Good(i))
    url = server(exporter)
    req = urllib.request.Request(url + "/metrics", headers={"Accept-Encoding": header})
    with urllib.request.urlopen(req, timeout=10) as r:
        assert (r.headers.get("Content-Encoding") == "gzip") is gzipped
        assert r.headers["Vary"] == "Accept-Encoding"


def test_idle_connections_are_closed_and_do_not_block_scrapes(server) -> None:
    exporter = Exporter()
    exporter.register("good", Good())
    url = server(exporter, limits=Limits(read_timeout_s=1.0, idle_timeout_s=1.0))
    host, port = url.removeprefix("http://").split(":")
    idle = [socket.create_connection((host, int(port)), timeout=5) for _ in range(200)]
    try:
        status, body = http_get(url + "/metrics")  # 200 idle clients do not keep a scrape out
        assert status == 200 and "nodetune_things" in body
        time.sleep(1.5)
        closed = 0
        for conn in idle:
            try:
                closed += conn.recv(1) == b""  # the server closed it: EOF
            except OSError:
                closed += 1
        assert closed == len(idle)
    finally:
        for conn in idle:
            conn.close()


def test_concurrent_scrapes_are_bounded(server) -> None:
    blocking = Blocking()
    exporter = Exporter()
    exporter.register("blocking", blocking)
    url = server(exporter, limit=1)
    first = threading.Thread(target=http_get, args=(url + "/metrics",))
    first.start()
    assert blocking.entered.wait(10)
    try:
        status, body = http_get(url + "/metrics")
        assert status == 503 and "too many" in body
        assert http_get(url + "/healthz")[0] == 200  # health never waits on a scrape
    finally:
        blocking.release.set()
        first.join(10)
    assert http_get(url + "/metrics")[0] == 200

"""The pod/node watch against a local server speaking the list/watch protocol, driven by the real
``kubernetes`` client: reflector semantics, backoff, faults, and names reaching the labels."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.kube import Backoff, KubeWatch, PodIndex, Reflector, api_client, container_id_of
from agent.workloads import Workloads
from tests.fake_apiserver import FakeAPIServer, node, pod

CID = "a" * 64


@pytest.fixture
def server() -> Iterator[FakeAPIServer]:
    srv = FakeAPIServer().start()
    yield srv
    srv.stop()


class Sleeps:
    """Records the delays a reflector asks for and sleeps a bounded, short time instead."""

    def __init__(self, stop: threading.Event, cap: float = 0.05) -> None:
        self.stop = stop
        self.cap = cap
        self.asked: list[float] = []

    def __call__(self, delay: float) -> bool:
        self.asked.append(delay)
        return self.stop.wait(min(delay, self.cap))


def watch_for(srv: FakeAPIServer, tmp_path: Path, **kw) -> tuple[KubeWatch, threading.Event]:
    stop = threading.Event()
    args = {"startup_jitter_s": 0, "watch_timeout_s": (1, 2), "read_timeout_s": 3} | kw
    kube = KubeWatch(api_client(srv.kubeconfig(tmp_path)), "n1", stop, **args)
    kube.start()
    return kube, stop


def until(check, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def test_container_ids_of_every_runtime() -> None:
    assert container_id_of("containerd://" + CID) == CID
    assert container_id_of("cri-o://" + CID) == CID
    assert container_id_of("docker://" + CID) == CID
    assert container_id_of(None) == "" and container_id_of("") == ""


def test_list_then_watch_names_pods_and_node_labels(server: FakeAPIServer, tmp_path: Path) -> None:
    server.put("pods", pod("u1", "redis-0", "n1", {"redis": CID}, namespace="cache"))
    server.put("nodes", node("n1", {"nodetune.io/profile": "redis"}))
    kube, stop = watch_for(server, tmp_path)
    try:
        until(lambda: kube.index.names("u1", CID) == ("cache", "redis-0", "redis"))
        assert kube.index.names("u1", "") == ("cache", "redis-0", "")
        until(lambda: kube.node_labels == {"nodetune.io/profile": "redis"})
        server.put("pods", pod("u2", "web-0", "n1", {"nginx": "b" * 64}))  # by the watch
        until(lambda: kube.index.names("u2", "b" * 64) == ("default", "web-0", "nginx"))
        server.put("nodes", node("n1", {"nodetune.io/profile": "web"}))
        until(lambda: kube.node_labels == {"nodetune.io/profile": "web"})
    finally:
        stop.set()
        kube.join()
    first = server.requests_of("pods")[0]
    assert not first["watch"] and first["resourceVersion"] == "0"  # from the watch cache
    assert first["fieldSelector"] == "spec.nodeName=n1"
    w = server.requests_of("pods", watch=True)[0]
    assert w["allowWatchBookmarks"] == "true" and 1 <= int(w["timeoutSeconds"]) <= 2


def test_watch_resumes_from_the_bookmark_after_a_normal_close(server: FakeAPIServer, tmp_path: Path) -> None:
    kube, stop = watch_for(server, tmp_path)
    try:
        until(lambda: server.requests_of("pods", watch=True))
        server.bookmark("pods")
        bookmark_rv = str(server.rv)
        until(lambda: len(server.requests_of("pods", watch=True)) >= 2, timeout=10)
    finally:
        stop.set()
        kube.join()
    assert server.requests_of("pods", watch=True)[1]["resourceVersion"] == bookmark_rv
    assert len(server.requests_of("pods", watch=False)) == 1  # no relist
    assert kube.pods.stats.relists == 0


def test_410_relists(server: FakeAPIServer, tmp_path: Path) -> None:
    server.put("pods", pod("u1", "a", "n1", {"c": CID}))
    kube, stop = watch_for(server, tmp_path)
    try:
        until(lambda: server.requests_of("pods", watch=True))
        server.compact()  # history gone: the next watch (after this one times out) gets 410
        until(lambda: len(server.requests_of("pods", watch=False)) >= 2, timeout=10)
        server.put("pods", pod("u2", "b", "n1", {"c": "b" * 64}))
        until(lambda: kube.index.names("u2", "b" * 64) is not None)
    finally:
        stop.set()
        kube.join()
    assert kube.pods.stats.relists >= 1 and kube.pods.stats.errors.get("410", 0) >= 1
    assert all(r["resourceVersion"] == "0" for r in server.requests_of("pods", watch=False))


def test_429_retry_after_is_honoured(server: FakeAPIServer, tmp_path: Path) -> None:
    server.plan["pods"] = [("status", 429, {"Retry-After": "1"})]
    kube, stop = watch_for(server, tmp_path, backoff=Backoff(base_s=0.01, cap_s=0.05))
    try:
        until(lambda: len(server.requests_of("pods")) >= 2)
    finally:
        stop.set()
        kube.join()
    first, second = server.requests_of("pods")[:2]
    assert second["t"] - first["t"] >= 1.0  # never sooner than Retry-After, though backoff said 0.05
    assert kube.pods.stats.errors["429"] == 1


def test_5xx_and_refused_back_off_growing_jittered_capped(tmp_path: Path) -> None:
    stop = threading.Event()
    sleeps = Sleeps(stop)
    # refused: a port nobody listens on
    with FakeAPIServer() as dead:
        kubeconfig = dead.kubeconfig(tmp_path)
    reflector_args = {
        "startup_jitter_s": 0,
        "backoff": Backoff(base_s=1.0, cap_s=16.0, rng=random.Random(1)),
        "sleep": sleeps,
        "read_timeout_s": 2,
    }
    kube = KubeWatch(api_client(kubeconfig), "n1", stop, **reflector_args)
    kube.pods.run(iterations=8)
    delays = [d for d in sleeps.asked if d > 0]
    assert kube.pods.stats.errors["refused"] == 8 and len(delays) == 8
    ceilings = [min(16.0, 2**i) for i in range(8)]
    assert all(0 <= d <= c for d, c in zip(delays, ceilings, strict=True))  # full jitter under the curve
    assert len(set(delays)) == len(delays)  # jittered, not a fixed schedule
    assert max(delays[4:]) > max(delays[:2])  # grows
    assert max(delays) <= 16.0  # capped


def test_500s_back_off_then_recover(server: FakeAPIServer, tmp_path: Path) -> None:
    server.plan["pods"] = [("status", 500), ("status", 503), ("close",)]
    server.put("pods", pod("u1", "a", "n1", {"c": CID}))
    kube, stop = watch_for(server, tmp_path, backoff=Backoff(base_s=0.05, cap_s=0.2))
    try:
        until(lambda: kube.index.names("u1", CID) is not None)
    finally:
        stop.set()
        kube.join()
    errors = kube.pods.stats.errors
    assert errors.get("500") == 1 and errors.get("503") == 1 and errors.get("reset", 0) + errors.get("other", 0) >= 1


def test_stalled_stream_is_detected_and_resumed(server: FakeAPIServer, tmp_path: Path) -> None:
    """A watch that sends nothing for longer than the read timeout is dropped and resumed from the
    last version (no relist)."""
    server.plan["pods"] = [None, ("stall", 5)]  # the list answers; the first watch stalls
    kube, stop = watch_for(server, tmp_path, read_timeout_s=1, backoff=Backoff(base_s=0.01, cap_s=0.02))
    try:
        until(lambda: kube.pods.stats.errors.get("timeout", 0) >= 1, timeout=10)
        server.put("pods", pod("u1", "a", "n1", {"c": CID}))
        until(lambda: kube.index.names("u1", CID) is not None)
    finally:
        stop.set()
        kube.join()
    watches = server.requests_of("pods", watch=True)
    assert len(server.requests_of("pods", watch=False)) == 1 and kube.pods.stats.relists == 0
    assert watches[1]["resourceVersion"] == watches[0]["resourceVersion"]
    assert watches[1]["t"] - watches[0]["t"] >= 1.0  # after the read timeout, not before


def test_malformed_lines_are_skipped_and_counted(server: FakeAPIServer, tmp_path: Path) -> None:
    server.plan["pods"] = [None, ("garbage",)]  # the first watch starts with a line that is not JSON
    kube, stop = watch_for(server, tmp_path)
    try:
        until(lambda: server.requests_of("pods", watch=True))
        server.put("pods", pod("u1", "a", "n1", {"c": CID}))
        until(lambda: kube.index.names("u1", CID) is not None)  # the same stream goes on
    finally:
        stop.set()
        kube.join()
    assert kube.pods.stats.errors.get("malformed") == 1
    assert len(server.requests_of("pods", watch=True)) == 1


def test_pods_of_other_nodes_are_ignored(server: FakeAPIServer, tmp_path: Path) -> None:
    server.honour_field_selector = False  # a misbehaving server (or proxy)
    server.put("pods", pod("u1", "mine", "n1", {"c": CID}))
    server.put("pods", pod("u2", "theirs", "n2", {"c": "b" * 64}))
    kube, stop = watch_for(server, tmp_path)
    try:
        until(lambda: kube.index.names("u1", CID) is not None)
        server.put("pods", pod("u3", "theirs-too", "n2", {"c": "c" * 64}))
        server.put("pods", pod("u4", "mine-too", "n1", {"c": "d" * 64}))
        until(lambda: kube.index.names("u4", "d" * 64) is not None)
    finally:
        stop.set()
        kube.join()
    assert kube.index.names("u2", "") is None and kube.index.names("u3", "") is None


def test_deleted_pod_names_go_after_the_grace_period() -> None:
    now = [0.0]
    index = PodIndex("n1", grace_s=60, clock=lambda: now[0])
    from kubernetes.client import ApiClient

    api = ApiClient()
    obj = api._ApiClient__deserialize(pod("u1", "a", "n1", {"c": CID}), "V1Pod")
    index.apply("ADDED", obj)
    version = index.version
    index.apply("DELETED", obj)
    now[0] = 59
    index.expire()
    assert index.names("u1", CID) == ("default", "a", "c")  # its cgroups outlive it briefly
    now[0] = 61
    index.expire()
    assert index.names("u1", CID) is None and index.version > version


def test_names_switch_the_labels_from_the_fallback() -> None:
    from kubernetes.client import ApiClient

    index = PodIndex("n1")
    workloads = Workloads(None, pod_names=index)
    path = f"/kubepods/burstable/pod00000000-0000-4000-8000-000000000001/{CID}"
    assert workloads.labels_for_path(path) == ("", "", "", path)
    obj = ApiClient()._ApiClient__deserialize(
        pod("00000000-0000-4000-8000-000000000001", "redis-0", "n1", {"redis": CID}, namespace="cache"), "V1Pod"
    )
    index.apply("ADDED", obj)
    assert workloads.labels_for_path(path) == ("cache", "redis-0", "redis", "")  # cache follows version


def test_empty_watches_count_as_errors(server: FakeAPIServer, tmp_path: Path) -> None:
    kube, stop = watch_for(server, tmp_path, backoff=Backoff(base_s=0.01, cap_s=0.02))
    try:
        until(lambda: server.requests_of("pods", watch=True))
        server.plan["pods"] = [("empty",), ("empty",)]
        until(lambda: kube.pods.stats.errors.get("empty_watch", 0) >= 2, timeout=10)
    finally:
        stop.set()
        kube.join()


def test_no_api_outside_a_pod_without_kubeconfig(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    assert api_client(None) is None


def test_reflector_stops_promptly(server: FakeAPIServer, tmp_path: Path) -> None:
    kube, stop = watch_for(server, tmp_path, watch_timeout_s=(30, 30))
    until(lambda: server.requests_of("pods", watch=True))
    stop.set()
    t = time.monotonic()
    kube.join(timeout=10)
    assert all(not th.is_alive() for th in kube._threads) or time.monotonic() - t < 10
    assert isinstance(kube.pods, Reflector)

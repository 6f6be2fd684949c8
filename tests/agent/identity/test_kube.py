"""The pod/node watch against a local server speaking the list/watch protocol, driven by the real
``kubernetes`` client: reflector semantics, backoff, faults, and names reaching the labels."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.identity.kube import Backoff, KubeWatch, PodIndex, api_client, container_id_of
from agent.identity.workloads import Workloads
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


def until(check, timeout: float = 10, why=lambda: "") -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"condition not met in time {why()}"
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
    """Review #5: relists follow client-go's relistResourceVersion: the first list from the watch
    cache ("0"), after a 410 a consistent read (no version: "0" could serve a lagging cache's
    older state), after a jittered 0.8-1.6 s delay (not at once: agents would relist together)."""
    server.put("pods", pod("u1", "a", "n1", {"c": CID}))
    kube, stop = watch_for(server, tmp_path)
    kube.pods.sleep = sleeps = Sleeps(stop, cap=0.05)
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
    lists = server.requests_of("pods", watch=False)
    assert lists[0]["resourceVersion"] == "0" and all("resourceVersion" not in r for r in lists[1:])
    assert sleeps.asked and 0.8 <= sleeps.asked[0] <= 1.6  # the wait before the first relist


def test_429_retry_after_is_honoured(server: FakeAPIServer, tmp_path: Path) -> None:
    server.plan["pods"] = [("status", 429, {"Retry-After": "1"})]
    kube, stop = watch_for(server, tmp_path, backoff_base_s=0.01, backoff_cap_s=5)
    try:
        until(lambda: len(server.requests_of("pods")) >= 2)
    finally:
        stop.set()
        kube.join()
    first, second = server.requests_of("pods")[:2]
    assert second["t"] - first["t"] >= 1.0  # never sooner than Retry-After, though backoff said 0.01
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
    kube, stop = watch_for(server, tmp_path, backoff_base_s=0.05, backoff_cap_s=0.2)
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
    kube, stop = watch_for(server, tmp_path, read_timeout_s=1, backoff_base_s=0.01, backoff_cap_s=0.02)
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


def test_unscheduled_pods_never_enter_and_a_pod_seen_elsewhere_leaves(server: FakeAPIServer, tmp_path: Path) -> None:
    """Review #6: a pod without ``nodeName`` (pending) used to enter the cache when the server
    ignored the field selector; once bound to another node its events were dropped, so it stayed
    forever. Only pods bound to this node enter; an event that puts a known pod elsewhere removes it."""
    server.honour_field_selector = False
    pending = pod("u5", "pending", "n1", {"c": "e" * 64})
    del pending["spec"]["nodeName"]
    server.put("pods", pending)
    server.put("pods", pod("u1", "mine", "n1", {"c": CID}))
    kube, _ = watch_for(server, tmp_path)
    try:
        until(lambda: kube.index.names("u1", CID) is not None)
        assert kube.index.names("u5", "") is None  # by the list
        pending2 = pod("u6", "pending-too", "n1", {"c": "f" * 64})
        del pending2["spec"]["nodeName"]
        server.put("pods", pending2)
        server.put("pods", pod("u6", "pending-too", "n2", {"c": "f" * 64}))  # bound elsewhere
        server.put("pods", pod("u1", "mine", "n2", {"c": CID}))  # a known pod said to be elsewhere
        server.put("pods", pod("u4", "mine-too", "n1", {"c": "d" * 64}))
        until(lambda: kube.index.names("u4", "d" * 64) is not None)
        assert kube.index.names("u6", "") is None and kube.index.names("u1", "") is None
        assert len(kube.index) == 1
    finally:
        kube.close()


def test_an_object_the_client_models_reject_is_skipped_not_replayed(server: FakeAPIServer, tmp_path: Path) -> None:
    """Review #1: kubernetes 37 validates every object; a containerStatus without ``image`` raised
    out of the watch, the next watch resumed from before it and replayed it forever (58 errors in
    6 s, later pods never named), and a list with it failed too. Only the fields the index needs are
    read, from the raw JSON: such a pod is named, one with no readable uid is skipped and counted,
    and the stream goes on past both."""
    bad = pod("u2", "no-image", "n1", {"c": "b" * 64})
    del bad["status"]["containerStatuses"][0]["image"]  # the model requires it
    server.put("pods", bad)  # in the first list
    server.put("pods", pod("u1", "a", "n1", {"c": CID}))
    server.put("nodes", node("n1", {"role": "db"}))
    kube, _ = watch_for(server, tmp_path)
    try:
        until(lambda: kube.index.names("u1", CID) is not None and kube.node_labels == {"role": "db"})
        assert kube.index.names("u2", "b" * 64) == ("default", "no-image", "c")
        worse = pod("u7", "no-image-either", "n1", {"c": "7" * 64})
        del worse["status"]["containerStatuses"][0]["image"]
        server.put("pods", worse)  # by the watch
        server.put_raw("pods", {"kind": "Pod", "metadata": {"name": "no-uid"}, "spec": {"nodeName": "n1"}})
        server.put_raw("pods", ["not", "an", "object"])
        server.put("pods", pod("u3", "c", "n1", {"c": "c" * 64}))
        until(lambda: kube.index.names("u3", "c" * 64) is not None, timeout=5)
        assert kube.index.names("u7", "7" * 64) == ("default", "no-image-either", "c")
        assert kube.pods.stats.errors == {} and kube.pods.stats.relists == 0
        assert len(server.requests_of("pods", watch=True)) == 1  # one stream, never replayed
        skipped = {
            s.labels["resource"]: s.value
            for m in kube.collect()
            if m.name == "nodetune_kube_objects_skipped"
            for s in m.samples
        }
        assert skipped == {"pods": 2.0, "node": 0.0}
    finally:
        kube.close()


def test_container_ids_one_bounded_rule_for_events_and_relists() -> None:
    """Review #3 (issue 22's kube cache): events merged container ids forever (1,000 restarts: 1,000
    ids, every status-only event a new version, so the label cache was cleared each time), while a
    relist dropped them (the container that just exited lost its name at once). One rule now: the
    status's ids, plus exited ids each kept for the grace period, at most MAX_EXITED per pod."""
    now = [0.0]
    index = PodIndex("n1", grace_s=60, clock=lambda: now[0])
    ids = [f"{i:064x}" for i in range(1000)]
    for i, cid in enumerate(ids):  # 1,000 restarts, one a second
        now[0] = float(i)
        index.apply("MODIFIED" if i else "ADDED", pod("u1", "a", "n1", {"c": cid}))
    assert index.names("u1", ids[-1]) == ("default", "a", "c")
    assert index.names("u1", ids[-2]) == ("default", "a", "c")  # just exited: its cgroup may linger
    assert index.names("u1", ids[0]) is None and index.names("u1", ids[-100]) is None  # long gone
    held = index._pods["u1"]
    assert len(held.containers) == 1 and len(held.exited) <= PodIndex.MAX_EXITED
    version = index.version
    for _ in range(10):  # status-only changes (ready flips): no label can change
        index.apply("MODIFIED", pod("u1", "a", "n1", {"c": ids[-1]}))
    assert index.version == version
    # a relist: the same rule (the id that exited before it keeps its name for the grace)
    now[0] += 1
    index.apply("MODIFIED", pod("u1", "a", "n1", {"c": "f" * 64}))
    now[0] += 1
    index.replace([pod("u1", "a", "n1", {"c": "e" * 64})])
    assert index.names("u1", "f" * 64) == ("default", "a", "c") and index.names("u1", ids[-1]) == ("default", "a", "c")
    version = index.version
    index.replace([pod("u1", "a", "n1", {"c": "e" * 64})])  # the same list again: nothing changes
    assert index.version == version
    now[0] += 61
    index.expire()
    assert index.names("u1", "f" * 64) is None and index.names("u1", "e" * 64) == ("default", "a", "c")
    assert index.version > version and not index._pods["u1"].exited


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


def test_labels_computed_from_an_old_index_never_land_in_the_new_cache() -> None:
    """Review (lesser): a scrape thread computing labels from the old index could store them in the
    label dict another thread had just reset for the new version: stale names until the next
    change. Each call takes the (version, dict) pair once and stores only into that dict."""
    old_path = f"/kubepods/burstable/pod00000000-0000-4000-8000-000000000001/{CID}"
    other = "/kubepods/burstable/pod00000000-0000-4000-8000-000000000002/" + "b" * 64

    class Racing:
        version = 1
        renamed = False

        def names(self, pod_uid: str, container_id: str) -> tuple[str, str, str] | None:
            if pod_uid.endswith("1") and not self.renamed:  # read the old state, then the pod changes
                self.renamed = True
                self.version = 2
                workloads.labels_for_path(other)  # meanwhile another thread sees version 2
                return ("ns", "old-name", "c")
            return ("ns", "new-name" if pod_uid.endswith("1") else "other", "c")

    workloads = Workloads(None, pod_names=Racing())
    workloads.labels_for_path(old_path)  # computed from version 1, finished under version 2
    assert workloads.labels_for_path(old_path) == ("ns", "new-name", "c", "")


def test_empty_watches_count_as_errors(server: FakeAPIServer, tmp_path: Path) -> None:
    kube, stop = watch_for(server, tmp_path, backoff_base_s=0.01, backoff_cap_s=0.02)
    try:
        until(lambda: server.requests_of("pods", watch=True))
        server.plan["pods"] = [("empty",), ("empty",)]
        until(lambda: kube.pods.stats.errors.get("empty_watch", 0) >= 2, timeout=10)
    finally:
        stop.set()
        kube.join()


def test_garbage_then_close_counts_once_and_blank_lines_are_nothing(server: FakeAPIServer, tmp_path: Path) -> None:
    """Review (lesser): a line of garbage then the end was counted twice (malformed and
    empty_watch), and blank lines (keep-alives) were counted malformed."""
    server.plan["pods"] = [None, ("garbage_close",), ("blank",)]
    kube, _ = watch_for(server, tmp_path, backoff_base_s=0.01, backoff_cap_s=0.02)
    try:
        until(lambda: len(server.requests_of("pods", watch=True)) >= 3)
        server.put("pods", pod("u1", "a", "n1", {"c": CID}))
        until(lambda: kube.index.names("u1", CID) is not None)
    finally:
        kube.close()
    assert kube.pods.stats.errors == {"malformed": 1}


def test_a_watch_shorter_than_a_second_backs_off_even_with_an_event(server: FakeAPIServer, tmp_path: Path) -> None:
    """Review (lesser): a watch that ended within 1 s after one event or bookmark was no error and
    was re-watched at once, with no limit. It is still no error, but it backs off."""
    server.set_fault(("bookmark_close",), watch_only=True)
    stop = threading.Event()
    sleeps = Sleeps(stop, cap=0.0)
    kube = KubeWatch(
        api_client(server.kubeconfig(tmp_path)),
        "n1",
        stop,
        startup_jitter_s=0,
        sleep=sleeps,
        backoff=Backoff(base_s=1.0, cap_s=120.0, rng=random.Random(2)),
    )
    kube.pods.run(iterations=6)
    assert len(server.requests_of("pods", watch=True)) == 6 and kube.pods.stats.errors == {}
    delays = sleeps.asked[1:]  # after the start-up jitter: one per short watch, growing
    assert len(delays) == 6 and kube.pods.backoff.attempt == 6 and kube.pods.stats.synced_at is not None


def test_a_pod_deleted_while_the_watch_was_down_leaves_after_the_relist(server: FakeAPIServer, tmp_path: Path) -> None:
    server.put("pods", pod("u1", "a", "n1", {"c": CID}))
    server.put("pods", pod("u2", "b", "n1", {"c": "b" * 64}))
    server.put("nodes", node("n1", {"role": "db"}))
    kube, _ = watch_for(server, tmp_path, backoff_base_s=0.05, backoff_cap_s=0.1, relist_delay_s=(0.01, 0.02))
    try:
        until(lambda: len(kube.index) == 2 and kube.node_labels == {"role": "db"})
        server.set_fault(("close",))  # the watch goes down, the pod is deleted, history compacted
        server.drop_watches()
        server.delete("pods", "u1")
        server.delete("nodes", "n1")
        server.compact()
        server.clear_fault()
        until(lambda: len(kube.index) == 1 and kube.pods.stats.relists >= 1)
        assert kube.pods.stats.errors.get("410") == 1  # the relisted version is watched: no 410 again
        assert kube.index.names("u1", CID) == ("default", "a", "c")  # for the grace period
        assert kube.node_labels == {"role": "db"}  # a Node missing from the relist keeps its last labels
    finally:
        kube.close()


def test_start_twice_keeps_one_thread_per_reflector_and_metrics_readable(server: FakeAPIServer, tmp_path: Path) -> None:
    """Review (lesser): running() and collect() zipped the reflectors with the threads strictly, so
    a second start() (4 threads) made both raise."""
    kube, _ = watch_for(server, tmp_path)
    try:
        kube.start()
        assert len(kube._threads) == 2
        until(kube.running)
        up = {
            s.labels["resource"]: s.value
            for m in kube.collect()
            if m.name == "nodetune_kube_reflector_up"
            for s in m.samples
        }
        assert up == {"pods": 1.0, "node": 1.0}
    finally:
        kube.close()


def test_no_api_outside_a_pod_without_kubeconfig(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    assert api_client(None) is None


def test_close_with_default_timeouts_ends_both_threads_at_once(server: FakeAPIServer, tmp_path: Path) -> None:
    """Review #2: with the defaults (120 s read timeout, 5-10 min watches) an idle watch used to
    block until its read timeout: join took 20 s and both threads were still alive. close() shuts
    the open watches' sockets and joins both threads against one deadline."""
    server.put("nodes", node("n1", {}))
    stop = threading.Event()
    kube = KubeWatch(api_client(server.kubeconfig(tmp_path)), "n1", stop, startup_jitter_s=0)  # defaults
    kube.start()
    until(lambda: server.requests_of("pods", watch=True) and server.requests_of("nodes", watch=True))
    kube.close(timeout=5)  # far below the 120 s read timeout a blocked read would wait
    assert [th.is_alive() for th in kube._threads] == [False, False]
    assert stop.is_set() and kube.pods.stats.errors == {} and kube.node.stats.errors == {}


# --- backoff and Retry-After ------------------------------------------------------------------


def test_retry_after_is_waited_then_spread() -> None:
    """Seed 003: agents told 429 with the same Retry-After must not all come back together. Each
    waits at least Retry-After, then a jitter over at least as long again."""
    delays = [Backoff(rng=random.Random(seed)).next_delay(1.0) for seed in range(200)]
    assert min(delays) >= 1.0 and max(delays) <= 2.0
    assert max(delays) - min(delays) > 0.9  # spread over the whole second, not all at 1.0
    assert len({round(d, 3) for d in delays}) > 150
    # A long Retry-After is spread in proportion (1 s of jitter would bring 30,000 agents back in 1 s)
    long = [Backoff(rng=random.Random(seed)).next_delay(60.0) for seed in range(200)]
    assert min(long) >= 60.0 and max(long) - min(long) > 50


@pytest.mark.parametrize("value", ["inf", "1e300", "Infinity", "99999999999"])
def test_retry_after_is_clamped_to_the_cap(value: str) -> None:
    from agent.identity.kube import parse_retry_after

    backoff = Backoff(base_s=1.0, cap_s=120.0, rng=random.Random(1))
    delay = backoff.next_delay(parse_retry_after(value))
    assert 120.0 <= delay <= 240.0  # the cap, then spread: a number a thread can sleep (inf overflowed)


def test_retry_after_forms() -> None:
    from email.utils import formatdate

    from agent.identity.kube import parse_retry_after

    assert parse_retry_after("3") == 3.0 and parse_retry_after(None) is None
    assert parse_retry_after("soon") is None and parse_retry_after("") is None
    assert 25 < parse_retry_after(formatdate(time.time() + 30, usegmt=True)) <= 30  # an HTTP date
    backoff = Backoff(base_s=1.0, cap_s=8.0, rng=random.Random(1))
    assert backoff.clamp_retry_after(float("nan")) is None and backoff.clamp_retry_after(-5.0) == 0.0


def test_backoff_starts_again_only_after_a_quiet_period() -> None:
    now = [0.0]
    backoff = Backoff(base_s=1.0, cap_s=64.0, rng=random.Random(3), reset_after_s=300, clock=lambda: now[0])
    for _ in range(6):
        now[0] += backoff.next_delay() + 120  # each retry fails after a 120 s read timeout (a stall)
    assert backoff.attempt == 6  # failures in a row keep growing, whatever succeeded between them
    now[0] += 301
    backoff.next_delay()
    assert backoff.attempt == 1  # after five quiet minutes the next failure starts from the base


# --- faults, against many agents ----------------------------------------------------------------
#
# Each fault is played on every request (or every watch) for a window, against AGENTS agents (a
# KubeWatch each: pods and node reflectors) in this process. Time is scaled by SCALE: the backoff
# base is 1 s x SCALE (the agent's default is 1 s) and the cap 1 s (the default 120 s, scaled, is
# 6 s: a lower cap only makes the agents retry sooner, so the bound is harder to meet). "At most 1
# request per second on average over a minute after the first error" becomes at most 60 requests
# in the 60 x SCALE seconds after each agent's first faulted request. The read timeout is 0.5 s for
# the stalled stream (the default is 120 s) and 5 s otherwise; the backoff's quiet period before it
# starts again and the first 410's relist delay are scaled too. Retry-After values are not scaled:
# 1 s here is 20 scaled seconds (0 is played too), and inf and 1e300 are clamped to the 1 s cap.
# MIN_WATCH_S stays 1 s: scaled to 50 ms, a loaded machine would make a garbage-then-close watch
# last longer than that, and whether it backs off would depend on the machine.

SCALE = 0.05
WINDOW_S = 60 * SCALE
AGENTS = 8
MAX_REQUESTS = 60  # per agent in WINDOW_S: 1 per (1 s x SCALE)

FAULTS = {
    # id: (action, watch_only, error code the agents must count for each faulted request)
    "429-retry-after-1": (("status", 429, {"Retry-After": "1"}), False, "429"),
    # Retry-After 1 s is 20 scaled seconds, which meets the bound trivially; 0 leaves it to the backoff
    "429-retry-after-0": (("status", 429, {"Retry-After": "0"}), False, "429"),
    "429-retry-after-inf": (("status", 429, {"Retry-After": "inf"}), False, "429"),
    "429-retry-after-1e300": (("status", 429, {"Retry-After": "1e300"}), False, "429"),
    "410-event": (("gone",), True, "410"),
    "410-status": (("status", 410), True, "410"),
    "malformed-line-then-close": (("garbage_close",), True, "malformed"),
    "500": (("status", 500), False, "500"),
    "reset": (("close",), False, "reset"),
    "stall": (("stall", 30), True, "timeout"),
}


def agents_for(
    srv: FakeAPIServer, tmp_path: Path, n: int, stop: threading.Event, read_timeout_s: float
) -> list[KubeWatch]:
    kubeconfig = srv.kubeconfig(tmp_path)
    agents = []
    for i in range(n):
        kube = KubeWatch(
            api_client(kubeconfig),
            f"n{i}",
            stop,
            startup_jitter_s=0,
            watch_timeout_s=(1, 2),
            read_timeout_s=read_timeout_s,
        )
        for r, salt in ((kube.pods, 0), (kube.node, 1)):  # each its own, seeded: reproducible delays
            r.backoff = Backoff(
                base_s=1.0 * SCALE, cap_s=1.0, reset_after_s=300 * SCALE, rng=random.Random(100 * i + salt)
            )
            r.relist_delay_s = (0.8 * SCALE, 1.6 * SCALE)
            r.sleep = Sleeps(stop, cap=float("inf"))  # real sleeps, recorded
        agents.append(kube)
    return agents


def requests_of_agent(srv: FakeAPIServer, node_name: str) -> list[dict]:
    return sorted((r for r in srv.requests if r["node"] == node_name), key=lambda r: r["t"])


@pytest.mark.parametrize("fault", list(FAULTS))
def test_fault_on_many_agents_is_gentle_jittered_counted_and_recovers(
    server: FakeAPIServer, tmp_path: Path, fault: str
) -> None:
    action, watch_only, code = FAULTS[fault]
    for i in range(AGENTS):
        server.put("nodes", node(f"n{i}", {}))
    stop = threading.Event()
    agents = agents_for(server, tmp_path, AGENTS, stop, 0.5 if fault == "stall" else 5)
    server.set_fault(action, watch_only)
    for kube in agents:
        kube.start()
    try:
        # every agent met the fault, and a whole window has passed since
        def first_fault(name: str) -> float | None:
            return next((r["t"] for r in requests_of_agent(server, name) if r["fault"]), None)

        until(lambda: all(first_fault(f"n{i}") is not None for i in range(AGENTS)), timeout=10)
        last_start = max(first_fault(f"n{i}") for i in range(AGENTS))
        until(lambda: time.monotonic() > last_start + WINDOW_S, timeout=WINDOW_S + 5)
        counts, offsets = [], []
        for i in range(AGENTS):
            reqs = requests_of_agent(server, f"n{i}")
            t0 = first_fault(f"n{i}")
            counts.append(sum(1 for r in reqs if t0 <= r["t"] <= t0 + WINDOW_S))
            offsets.append([r["t"] - t0 for r in reqs if r["fault"] and r["t"] >= t0])
        # 1. gentle: at most one request per (scaled) second, on average over the (scaled) minute;
        #    and, whatever the speed of this machine, a backoff delay after every error but the
        #    one relist a first 410 makes at once and the last, maybe still in flight (the first
        #    sleep is the start-up jitter)
        assert max(counts) <= MAX_REQUESTS, f"requests per agent in the window: {counts}"
        for i, kube in enumerate(agents):
            for r, kind in ((kube.pods, "pods"), (kube.node, "nodes")):
                faulted = sum(1 for q in requests_of_agent(server, f"n{i}") if q["kind"] == kind and q["fault"])
                assert len(r.sleep.asked) - 1 >= faulted - 2, f"{kind} of n{i}: {faulted} errors, {r.sleep.asked}"
        # 2. jittered: the agents' k-th faulted requests (the last k all of them reached) are spread,
        #    not in step: the spread exceeds a tenth of the time they took to get there
        k = min(len(o) for o in offsets) - 1
        assert k >= 1, offsets
        at_k = sorted(o[k] for o in offsets)
        print(f"{fault}: requests per agent in {WINDOW_S:g} s: {counts}; faulted request {k} at {at_k}")
        assert at_k[-1] - at_k[0] > 0.1 * at_k[len(at_k) // 2], f"in step: request {k} at {at_k}"
        # 3. recovers by itself once the server does
        server.clear_fault()
        for i in range(AGENTS):
            server.put("pods", pod(f"u{i}", f"p{i}", f"n{i}", {"c": f"{i:064x}"}))
        until(lambda: all(kube.index.names(f"u{i}", f"{i:064x}") for i, kube in enumerate(agents)), timeout=20)

        # 4. every faulted request was counted under its code (a stalled stream: also requests the
        #    busy server had not read yet when the client's 0.5 s ran out)
        def counted(kube: KubeWatch) -> int:
            return sum(r.stats.errors.get(code, 0) for r in (kube.pods, kube.node))

        faulted = [sum(1 for r in requests_of_agent(server, f"n{i}") if r["fault"]) for i in range(AGENTS)]
        same = (lambda a, b: a >= b) if fault == "stall" else (lambda a, b: a == b)
        until(
            lambda: all(same(counted(kube), n) for kube, n in zip(agents, faulted, strict=True)),
            timeout=5,
            why=lambda: (
                f"counted {[counted(kube) for kube in agents]}, faulted {faulted}: "
                f"{[(kube.pods.stats.errors, kube.node.stats.errors) for kube in agents]}"
            ),
        )
    finally:
        stop.set()
        for kube in agents:
            kube.join()


def test_410_on_every_watch_relists_once_then_backs_off(server: FakeAPIServer, tmp_path: Path) -> None:
    """With a list of 100 pods, each 410 used to cost a full list at once, forever (54 lists of
    3.5 MB in 35 s with 5,000 pods). One relist at once is normal; the next ones wait a backoff delay."""
    for i in range(100):
        server.put("pods", pod(f"u{i}", f"p{i}", "n1", {"c": f"{i:064x}"}))
    server.set_fault(("gone",), watch_only=True)
    stop = threading.Event()
    sleeps = Sleeps(stop, cap=0.0)
    kube = KubeWatch(
        api_client(server.kubeconfig(tmp_path)),
        "n1",
        stop,
        startup_jitter_s=0,
        sleep=sleeps,
        backoff=Backoff(base_s=1.0, cap_s=120.0, rng=random.Random(7)),
    )
    kube.pods.run(iterations=12)
    lists = len(server.requests_of("pods", watch=False))
    relist_wait, *delays = sleeps.asked[1:]  # after the start-up jitter
    assert kube.pods.stats.errors["410"] >= 6 and kube.pods.stats.relists == lists - 1
    assert 0.8 <= relist_wait <= 1.6  # the first relist: a short jittered wait (client-go's 0.8-1.6 s)
    assert lists - 2 <= len(delays) <= lists  # every relist but the first one backed off
    ceilings = [min(120.0, 2.0**n) for n in range(len(delays))]
    assert all(0 <= d <= c for d, c in zip(delays, ceilings, strict=True)) and max(delays) > 1.0  # growing


def test_a_reflector_that_dies_is_restarted_counted_and_the_agent_stays_ready(
    server: FakeAPIServer, tmp_path: Path
) -> None:
    """Its loop fails (here: its sleep raises, as OverflowError did for Retry-After: inf): the
    reflector is restarted after a backoff delay and counted; reflector_up says 0 meanwhile. The
    agent stays ready (review #4): names fall back to cgroup paths by contract, and a bug hitting
    every agent must not make the fleet unready (stalled rollouts, targets dropped)."""
    from agent.daemon import Agent

    server.put("pods", pod("u1", "a", "n1", {"c": CID}))
    stop = threading.Event()
    broken = threading.Event()
    broken.set()

    def sleep(delay: float) -> bool:
        if broken.is_set():
            raise OverflowError("timeout value is too large")
        return stop.wait(delay)

    kube = KubeWatch(
        api_client(server.kubeconfig(tmp_path)), "n1", stop, startup_jitter_s=0, sleep=sleep, watch_timeout_s=(1, 2)
    )
    for r in (kube.pods, kube.node):
        r.backoff = Backoff(base_s=0.2, cap_s=0.5, rng=random.Random(1))
    agent = Agent.__new__(Agent)  # only what Agent.ready() reads: probes tried, and the watch
    agent._ready, agent.kube = True, kube
    kube.start()
    try:
        until(lambda: kube.pods.stats.restarts >= 2 and not kube.running())
        metrics = {(m.name, s.labels.get("resource")): s.value for m in kube.collect() for s in m.samples}
        assert metrics[("nodetune_kube_reflector_restarts", "pods")] >= 2
        assert metrics[("nodetune_kube_reflector_up", "pods")] == 0
        assert agent.ready()
        broken.clear()
        until(lambda: kube.running() and kube.index.names("u1", CID) is not None)
        metrics = {(m.name, s.labels.get("resource")): s.value for m in kube.collect() for s in m.samples}
        assert metrics[("nodetune_kube_reflector_up", "pods")] == 1
    finally:
        stop.set()
        kube.close()
    assert not kube.running()  # stopped: its thread ended


def test_retry_after_inf_leaves_both_reflectors_running_and_the_agent_ready(
    server: FakeAPIServer, tmp_path: Path
) -> None:
    """``Retry-After: inf`` used to kill both reflector threads (OverflowError) while /readyz stayed
    200. Now both wait out the delay clamped to the cap (here 0.3 s) and retry; readiness does not
    depend on them (review #4), reflector_up does."""
    from agent.daemon import Agent

    server.set_fault(("status", 429, {"Retry-After": "inf"}))
    stop = threading.Event()
    kube = KubeWatch(
        api_client(server.kubeconfig(tmp_path)), "n1", stop, startup_jitter_s=0, backoff_base_s=0.1, backoff_cap_s=0.3
    )
    agent = Agent.__new__(Agent)  # only what Agent.ready() reads: probes tried, and the watch
    agent._ready, agent.kube = True, kube
    kube.start()
    try:
        until(lambda: len(server.requests_of("pods")) >= 3 and len(server.requests_of("nodes")) >= 3)
        assert kube.pods.stats.errors["429"] >= 2 and kube.pods.stats.restarts == 0
        assert agent.ready()
    finally:
        kube.close()
    assert agent.ready() and not kube.running()  # its reflectors ended: reflector_up 0, still ready


def test_agent_process_survives_retry_after_inf(server: FakeAPIServer, tmp_path: Path, agent_process) -> None:
    """The issue's reproduction, on ``nodetune run --probes none --collectors none``: both
    reflectors told 429 ``Retry-After: inf`` used to die of OverflowError while /readyz said 200.
    Now both wait out the clamped delay (120-240 s with the defaults), alive and ready."""
    from tests.conftest import http_get

    server.set_fault(("status", 429, {"Retry-After": "inf"}))
    kubeconfig = server.kubeconfig(tmp_path)
    args = ["--probes", "none", "--collectors", "none", "--kubeconfig", str(kubeconfig), "--node-name", "n1"]
    agent = agent_process(*args)

    def samples(name: str) -> dict[str, float]:
        return {"|".join(s.labels.values()): s.value for s in agent.metrics().get(name, [])}

    until(lambda: samples("nodetune_kube_watch_errors").get("429") == 2, timeout=20)  # after the start-up jitter
    assert samples("nodetune_kube_reflector_up") == {"pods": 1.0, "node": 1.0}
    assert samples("nodetune_kube_reflector_restarts") == {"pods": 0.0, "node": 0.0}
    assert http_get(agent.url + "/readyz")[0] == 200 and http_get(agent.url + "/healthz")[0] == 200
    assert "Traceback" not in (tmp_path / "agent.log").read_text()

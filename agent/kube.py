"""Kubernetes identity: the pods of this node (and this Node's labels) from the API server.

Kernel interface: none. API interface: ``GET /api/v1/pods?fieldSelector=spec.nodeName=<node>``
list + watch, and ``GET /api/v1/nodes?fieldSelector=metadata.name=<node>``, through the official
``kubernetes`` client (in-cluster service account, or ``--kubeconfig``).

Reflector semantics, as client-go's, so that 30,000 agents can do this at once (seed 003):

* The first list is served from the API server's watch cache (``resourceVersion=0``). A watch
  follows from the list's version, with bookmarks on and a server-side timeout drawn from
  5–10 min, so that the nodes' watches do not all end together.
* After a normal close the watch resumes from the last version seen (bookmarks included). Only a
  410 Gone relists. A watch that closes at once with no event counts as an error.
* Errors (429, 5xx, refused, reset, timeout) back off exponentially with full jitter, to a cap
  of minutes, and never sooner than a ``Retry-After`` the server sent. urllib3's own immediate
  retries are off. A read timeout catches a stalled stream.
* The first request waits a random start-up jitter.

Everything is kept in memory: pod UID → (namespace, name), container id → container name, and this
Node's labels. ``PodIndex`` is the ``PodNames`` source of ``agent/workloads.py``; its ``version``
changes with every change that can change a label. A deleted pod's names stay for a grace period
(its cgroups outlive it briefly), then go.
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric

log = logging.getLogger(__name__)

IN_CLUSTER_TOKEN = Path("/var/run/secrets/kubernetes.io/serviceaccount/token")
RUNTIME_PREFIXES = ("containerd://", "cri-o://", "docker://", "crio://")


def container_id_of(status_id: str | None) -> str:
    """``containerd://<id>`` (and CRI-O's, Docker's) -> ``<id>``; "" when not running yet."""
    if not status_id:
        return ""
    for prefix in RUNTIME_PREFIXES:
        if status_id.startswith(prefix):
            return status_id[len(prefix) :]
    return status_id.rsplit("://", 1)[-1]


@dataclass
class PodEntry:
    namespace: str
    name: str
    containers: dict[str, str]  # container id -> container name
    deleted_at: float | None = None


class PodIndex:
    """Pod UID and container ids -> names, for this node's pods. Thread-safe."""

    def __init__(self, node_name: str, grace_s: float = 60.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.node_name = node_name
        self.grace_s = grace_s
        self.clock = clock
        self.version = 0
        self._pods: dict[str, PodEntry] = {}
        self._lock = threading.Lock()

    # --- PodNames (agent/workloads.py) -----------------------------------------------------
    def names(self, pod_uid: str, container_id: str) -> tuple[str, str, str] | None:
        with self._lock:
            pod = self._pods.get(pod_uid)
            if pod is None:
                return None
            if not container_id:
                return (pod.namespace, pod.name, "")
            container = pod.containers.get(container_id)
            return None if container is None else (pod.namespace, pod.name, container)

    # --- fed by the reflector ----------------------------------------------------------------
    def _entry(self, pod: Any) -> tuple[str, PodEntry] | None:
        meta, spec, status = pod.metadata, pod.spec, pod.status
        if meta is None or not meta.uid or (spec is not None and spec.node_name not in (None, self.node_name)):
            return None  # another node's pod: a server that ignored the field selector
        containers: dict[str, str] = {}
        if status is not None:
            for statuses in (
                status.container_statuses,
                status.init_container_statuses,
                status.ephemeral_container_statuses,
            ):
                for cs in statuses or []:
                    cid = container_id_of(cs.container_id)
                    if cid:
                        containers[cid] = cs.name
        return meta.uid, PodEntry(meta.namespace or "", meta.name or "", containers)

    def replace(self, pods: Iterable[Any]) -> None:
        """A list: the whole state. Pods missing from it are deleted (with the grace period)."""
        fresh = dict(e for e in map(self._entry, pods) if e is not None)
        now = self.clock()
        with self._lock:
            for uid, old in self._pods.items():
                if uid not in fresh and old.deleted_at is None:
                    old.deleted_at = now
                    fresh[uid] = old
                elif uid not in fresh:
                    fresh[uid] = old
            changed = fresh.keys() != self._pods.keys() or any(
                (p.namespace, p.name, p.containers) != (o.namespace, o.name, o.containers)
                for uid, p in fresh.items()
                if (o := self._pods.get(uid)) is not None
            )
            self._pods = fresh
            if changed:
                self.version += 1

    def apply(self, event_type: str, pod: Any) -> None:
        found = self._entry(pod)
        if found is None:
            return
        uid, entry = found
        with self._lock:
            if event_type == "DELETED":
                old = self._pods.get(uid)
                if old is not None and old.deleted_at is None:
                    old.deleted_at = self.clock()
                return
            old = self._pods.get(uid)
            if old is not None and (old.namespace, old.name, old.containers) == (
                entry.namespace,
                entry.name,
                entry.containers,
            ):
                return
            if old is not None:  # keep ids of containers that already exited (their cgroups may linger)
                entry.containers = {**old.containers, **entry.containers}
            self._pods[uid] = entry
            self.version += 1

    def expire(self) -> None:
        """Forget pods deleted more than ``grace_s`` ago (timer)."""
        cutoff = self.clock() - self.grace_s
        with self._lock:
            gone = [uid for uid, p in self._pods.items() if p.deleted_at is not None and p.deleted_at < cutoff]
            for uid in gone:
                del self._pods[uid]
            if gone:
                self.version += 1

    def __len__(self) -> int:
        with self._lock:
            return sum(1 for p in self._pods.values() if p.deleted_at is None)


@dataclass
class ReflectorStats:
    errors: dict[str, int] = field(default_factory=dict)  # code -> count
    relists: int = 0
    synced_at: float | None = None  # monotonic time the cache was last known current


@dataclass
class Backoff:
    """Exponential backoff with full jitter (AWS architecture blog, "Exponential Backoff And Jitter"):
    sleep uniform(0, min(cap, base * 2^attempt)), and never less than a server's Retry-After."""

    base_s: float = 1.0
    cap_s: float = 120.0
    rng: random.Random = field(default_factory=random.Random)
    attempt: int = 0

    def next_delay(self, retry_after_s: float | None = None) -> float:
        ceiling = min(self.cap_s, self.base_s * (2**self.attempt))
        self.attempt = min(self.attempt + 1, 32)
        delay = self.rng.uniform(0, ceiling)
        return max(delay, retry_after_s or 0.0)

    def reset(self) -> None:
        self.attempt = 0


def error_code(error: BaseException) -> tuple[str, float | None]:
    """(label for kube_watch_errors_total{code}, Retry-After seconds or None) of an API error."""
    from kubernetes.client.rest import ApiException
    from urllib3.exceptions import NewConnectionError, ProtocolError, ReadTimeoutError

    if isinstance(error, ApiException):
        retry_after = None
        headers = error.headers or {}
        value = headers.get("Retry-After") if hasattr(headers, "get") else None
        if value:
            try:
                retry_after = float(value)
            except ValueError:
                retry_after = None
        return str(error.status or "unknown"), retry_after
    text = f"{type(error).__name__} {error}"
    if isinstance(error, ReadTimeoutError) or "timed out" in text or isinstance(error, TimeoutError):
        return "timeout", None
    if isinstance(error, NewConnectionError) or "refused" in text.lower() or isinstance(error, ConnectionRefusedError):
        return "refused", None
    if isinstance(error, ProtocolError | ConnectionResetError) or "reset" in text.lower():
        return "reset", None
    return "other", None


class Reflector:
    """List + watch of one kind of object, into a store; see module docstring. ``run()`` returns
    when ``stop`` is set (or after ``iterations`` list/watch rounds, for tests)."""

    def __init__(
        self,
        kind: str,
        list_func: Callable[..., Any],
        field_selector: str,
        replace: Callable[[list[Any]], None],
        apply: Callable[[str, Any], None],
        stop: threading.Event,
        watch_timeout_s: tuple[float, float] = (300.0, 600.0),
        read_timeout_s: float = 120.0,
        connect_timeout_s: float = 10.0,
        startup_jitter_s: float = 5.0,
        backoff: Backoff | None = None,
        rng: random.Random | None = None,
        sleep: Callable[[float], bool] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.kind = kind
        self.list_func = list_func
        self.field_selector = field_selector
        self.replace = replace
        self.apply = apply
        self.stop = stop
        self.watch_timeout_s = watch_timeout_s
        self.timeouts = (connect_timeout_s, read_timeout_s)
        self.startup_jitter_s = startup_jitter_s
        self.rng = rng or random.Random()
        self.backoff = backoff or Backoff(rng=self.rng)
        self.sleep = sleep or stop.wait  # returns True when stopped
        self.clock = clock
        self.stats = ReflectorStats()
        self.resource_version: str | None = None
        self._lists = 0

    def _error(self, code: str) -> None:
        self.stats.errors[code] = self.stats.errors.get(code, 0) + 1

    def _list(self) -> None:
        result = self.list_func(
            field_selector=self.field_selector,
            resource_version="0",  # from the API server's watch cache, not etcd
            _request_timeout=self.timeouts,
        )
        self.replace(list(result.items or []))
        self.resource_version = result.metadata.resource_version
        self._lists += 1
        if self._lists > 1:
            self.stats.relists += 1
        self.stats.synced_at = self.clock()

    def _watch(self) -> int:
        """One watch from ``resource_version``; the number of events it delivered."""
        from kubernetes import watch

        w = watch.Watch()
        events = 0
        timeout = int(self.rng.uniform(*self.watch_timeout_s))
        for event in w.stream(
            self.list_func,
            field_selector=self.field_selector,
            resource_version=self.resource_version,
            allow_watch_bookmarks=True,
            timeout_seconds=timeout,
            _request_timeout=self.timeouts,
        ):
            if self.stop.is_set():
                w.stop()
                break
            events += 1
            if not isinstance(event, dict) or "type" not in event:
                self._error("malformed")  # a line that is not JSON: skipped
                continue
            if event["type"] != "BOOKMARK":
                self.apply(event["type"], event["object"])
            if w.resource_version:
                self.resource_version = w.resource_version
            self.stats.synced_at = self.clock()
        if w.resource_version:
            self.resource_version = w.resource_version
        return events

    def run(self, iterations: int | None = None) -> None:
        from kubernetes.client.rest import ApiException

        if self.sleep(self.rng.uniform(0, self.startup_jitter_s)):
            return
        need_list = True
        done = 0
        while not self.stop.is_set() and (iterations is None or done < iterations):
            done += 1
            try:
                if need_list:
                    self._list()
                    need_list = False
                started = self.clock()
                events = self._watch()
                if events == 0 and self.clock() - started < 1.0 and not self.stop.is_set():
                    self._error("empty_watch")  # closed at once: treat as a failure, back off
                    if self.sleep(self.backoff.next_delay()):
                        return
                    continue
                self.backoff.reset()
            except ApiException as e:
                code, retry_after = error_code(e)
                self._error(code)
                if e.status == 410:
                    log.info("%s watch expired (410): relisting", self.kind)
                    need_list = True
                    continue  # client-go relists at once; the list comes from the watch cache
                delay = self.backoff.next_delay(retry_after)
                log.warning("%s list/watch failed (%s); retrying in %.1fs", self.kind, code, delay)
                if self.sleep(delay):
                    return
            except Exception as e:  # refused, reset, stalled stream, a bug: back off, never spin
                code, _ = error_code(e)
                self._error(code)
                delay = self.backoff.next_delay()
                log.warning("%s list/watch failed (%s: %s); retrying in %.1fs", self.kind, code, e, delay)
                if self.sleep(delay):
                    return


def api_client(kubeconfig: Path | None) -> Any | None:
    """An API client from ``kubeconfig``, or in-cluster configuration inside a pod; None outside a
    pod without a kubeconfig (a plain host: no API is used)."""
    from kubernetes import client, config

    if kubeconfig is None and not (os.environ.get("KUBERNETES_SERVICE_HOST") and IN_CLUSTER_TOKEN.exists()):
        return None
    cfg = client.Configuration()
    if kubeconfig is not None:
        config.load_kube_config(config_file=str(kubeconfig), client_configuration=cfg)
    else:
        config.load_incluster_config(client_configuration=cfg)
    cfg.retries = False  # urllib3 would retry a refused connection at once, three times: we back off
    return client.ApiClient(cfg)


class KubeWatch:
    """This node's pods and Node object, watched on threads of their own; the ``kube`` unit."""

    def __init__(
        self,
        api: Any,
        node_name: str,
        stop: threading.Event,
        index: PodIndex | None = None,
        clock: Callable[[], float] = time.monotonic,
        **reflector_args: Any,
    ) -> None:
        from kubernetes import client

        self.node_name = node_name
        self.index = index or PodIndex(node_name, clock=clock)
        self.node_labels: dict[str, str] = {}
        self.node_labels_version = 0
        self.clock = clock
        core = client.CoreV1Api(api)
        self.pods = Reflector(
            "pods",
            core.list_pod_for_all_namespaces,
            f"spec.nodeName={node_name}",
            self.index.replace,
            self.index.apply,
            stop,
            clock=clock,
            **reflector_args,
        )
        self.node = Reflector(
            "node",
            core.list_node,
            f"metadata.name={node_name}",
            self._node_replace,
            self._node_apply,
            stop,
            clock=clock,
            **reflector_args,
        )
        self._threads: list[threading.Thread] = []

    def _node_replace(self, nodes: list[Any]) -> None:
        for node in nodes:
            self._node_apply("ADDED", node)

    def _node_apply(self, event_type: str, node: Any) -> None:
        if node.metadata is None or node.metadata.name != self.node_name or event_type == "DELETED":
            return
        labels = dict(node.metadata.labels or {})
        if labels != self.node_labels:
            self.node_labels = labels
            self.node_labels_version += 1

    def start(self) -> None:
        for reflector in (self.pods, self.node):
            t = threading.Thread(target=reflector.run, name=f"kube-{reflector.kind}", daemon=True)
            t.start()
            self._threads.append(t)

    def join(self, timeout: float = 10.0) -> None:
        for t in self._threads:
            t.join(timeout)

    def maintain(self) -> None:
        self.index.expire()

    def collect(self) -> list[Metric]:
        errors = CounterMetricFamily(
            "nodetune_kube_watch_errors", "Failed list/watch requests to the API server, by code.", labels=["code"]
        )
        merged: dict[str, int] = {}
        for reflector in (self.pods, self.node):
            # dict() copies in one step under the GIL; the reflector's thread may add a code meanwhile
            for code, n in dict(reflector.stats.errors).items():
                merged[code] = merged.get(code, 0) + n
        for code, n in sorted(merged.items()):
            errors.add_metric([code], n)
        relists = CounterMetricFamily("nodetune_kube_relists", "Lists after the first (410 Gone).")
        relists.add_metric([], self.pods.stats.relists + self.node.stats.relists)
        age = GaugeMetricFamily(
            "nodetune_kube_pod_cache_age_seconds",
            "Seconds since the pod cache was last known current (a list, an event or a bookmark).",
        )
        synced = self.pods.stats.synced_at
        if synced is not None:
            age.add_metric([], max(0.0, self.clock() - synced))
        pods = GaugeMetricFamily("nodetune_kube_pods", "Pods of this node in the cache.")
        pods.add_metric([], len(self.index))
        return [errors, relists, age, pods]

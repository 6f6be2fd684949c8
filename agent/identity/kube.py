"""Kubernetes identity: the pods of this node (and this Node's labels) from the API server.

Kernel interface: none. API interface: ``GET /api/v1/pods?fieldSelector=spec.nodeName=<node>``
list + watch, and ``GET /api/v1/nodes?fieldSelector=metadata.name=<node>``, through the official
``kubernetes`` client (in-cluster service account, or ``--kubeconfig``).

Reflector semantics, as client-go's, so that 30,000 agents can do this at once (seed 003):

* Lists follow client-go's ``relistResourceVersion``: the first from the API server's watch cache
  (``resourceVersion=0``), later ones from the last version synced (state never goes back), and
  after a 410 Expired a consistent read (no version). A watch follows from the list's version,
  with bookmarks on and a server-side timeout drawn from 5–10 min, so that the nodes' watches do
  not all end together.
* After a normal close the watch resumes from the last version seen (bookmarks included). Only a
  410 Gone relists: after a jittered 0.8–1.6 s the first time (client-go), so that agents do not
  relist in the same instant; a 410 again before a watch has worked backs off like any error.
  A watch that closes within a second backs off; with no event (a line that is not JSON is no
  event) it is also an error (``empty_watch``, unless its garbage was counted ``malformed``).
* Errors (429, 5xx, 410 again, refused, reset, timeout, malformed, empty) back off exponentially
  with full jitter, to a cap of minutes. A ``Retry-After`` (clamped to the cap) is waited out and
  then spread: the delay is ``Retry-After + uniform(0, max(ceiling, Retry-After))``, so agents
  told the same ``Retry-After`` do not come back in step. urllib3's own immediate retries are
  off. A read timeout catches a stalled stream.
* The first request waits a random start-up jitter.
* A reflector whose thread fails (a bug) is restarted after a backoff delay, and counted.
* Bodies are read as raw JSON (``_preload_content=False``), never through the client's models:
  those (pydantic in 37.x) reject whole objects for fields nobody here reads, which stopped the
  cache for good (one event replayed by every watch, every list failing). Only the fields the
  cache needs are read; an object without them is skipped and counted, and the version moves on.
* ``KubeWatch.close()`` shuts the open requests' sockets: an idle watch ends at once, not at its
  read timeout.

Everything is kept in memory: pod UID → (namespace, name), container id → container name (the
current ones, and exited ones for a grace period, bounded), and this Node's labels. ``PodIndex``
is the ``PodNames`` source of ``agent/identity/workloads.py``; its ``version`` changes with every change
that can change a label, and only then. Only pods bound to this node are kept. A deleted pod's
names stay for a grace period (its cgroups outlive it briefly), then go.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
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


def _str(value: Any) -> str:
    return value if isinstance(value, str) else ""


def _as_json(obj: Any) -> Any:
    """The raw JSON form of ``obj``: a dict as is; a ``kubernetes`` model object (callers outside
    the reflector, tests) serialised back to its JSON field names."""
    if isinstance(obj, dict) or not hasattr(obj, "to_dict"):
        return obj
    from kubernetes.client import ApiClient

    return ApiClient().sanitize_for_serialization(obj)


@dataclass
class PodEntry:
    namespace: str
    name: str
    containers: dict[str, str]  # current container id -> container name
    deleted_at: float | None = None
    # ids of containers no longer in the pod's status -> (name, monotonic expiry): their cgroups
    # may outlive them briefly; bounded per pod (PodIndex.MAX_EXITED)
    exited: dict[str, tuple[str, float]] = field(default_factory=dict)


class PodIndex:
    """Pod UID and container ids -> names, for this node's pods. Thread-safe.

    Objects are read as raw JSON (the API's field names), and only the fields the index needs:
    ``metadata.uid/name/namespace``, ``spec.nodeName`` and the container statuses' ``name`` and
    ``containerID``. An object without a readable uid is skipped (``apply`` returns False,
    ``replace`` the number skipped); nothing else about it can stop the watch (review #1: the
    client's models reject objects the index does not care about).

    One rule for container ids on both paths (an event, a relist): the current ids are the
    status's; an id that leaves it stays, as exited, for ``grace_s`` (the series grace), at most
    ``MAX_EXITED`` per pod. ``version`` changes only when a label can change: a pod's names or
    its current ids, a pod leaving, an exited id expiring."""

    MAX_EXITED = 16

    def __init__(self, node_name: str, grace_s: float = 60.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.node_name = node_name
        self.grace_s = grace_s
        self.clock = clock
        self.version = 0
        self._pods: dict[str, PodEntry] = {}
        self._lock = threading.Lock()

    # --- PodNames (agent/identity/workloads.py) -----------------------------------------------------
    def names(self, pod_uid: str, container_id: str) -> tuple[str, str, str] | None:
        with self._lock:
            pod = self._pods.get(pod_uid)
            if pod is None:
                return None
            if not container_id:
                return (pod.namespace, pod.name, "")
            container = pod.containers.get(container_id)
            if container is None and container_id in pod.exited:
                container = pod.exited[container_id][0]
            return None if container is None else (pod.namespace, pod.name, container)

    # --- fed by the reflector ----------------------------------------------------------------
    def _read(self, obj: Any) -> tuple[str, str, PodEntry] | None:
        """(uid, node name, entry) of a raw pod object; None when it has no readable uid."""
        obj = _as_json(obj)
        meta = obj.get("metadata") if isinstance(obj, dict) else None
        if not isinstance(meta, dict) or not _str(meta.get("uid")):
            return None
        spec = obj.get("spec") if isinstance(obj.get("spec"), dict) else {}
        status = obj.get("status") if isinstance(obj.get("status"), dict) else {}
        containers: dict[str, str] = {}
        for key in ("containerStatuses", "initContainerStatuses", "ephemeralContainerStatuses"):
            statuses = status.get(key)
            for cs in statuses if isinstance(statuses, list) else []:
                if isinstance(cs, dict) and (cid := container_id_of(_str(cs.get("containerID")))):
                    containers[cid] = _str(cs.get("name"))
        entry = PodEntry(_str(meta.get("namespace")), _str(meta.get("name")), containers)
        return meta["uid"], _str(spec.get("nodeName")), entry

    def _merge(self, old: PodEntry | None, new: PodEntry, now: float) -> bool:
        """Carry ``old``'s exited ids (and the ids that just left) into ``new``; True when a label
        can change (names or current ids differ)."""
        if old is None:
            return True
        exited = {cid: e for cid, e in old.exited.items() if e[1] > now and cid not in new.containers}
        for cid, name in old.containers.items():
            if cid not in new.containers:
                exited[cid] = (name, now + self.grace_s)
        if len(exited) > self.MAX_EXITED:  # keep the ones that left last
            exited = dict(sorted(exited.items(), key=lambda e: e[1][1])[-self.MAX_EXITED :])
        new.exited = exited
        return (old.namespace, old.name, old.containers) != (new.namespace, new.name, new.containers)

    def replace(self, pods: Iterable[Any]) -> int:
        """A list: the whole state. Pods missing from it are deleted (with the grace period).
        Returns the number of objects skipped (unreadable)."""
        skipped = 0
        fresh: dict[str, PodEntry] = {}
        for obj in pods:
            found = self._read(obj)
            if found is None:
                skipped += 1
            elif found[1] == self.node_name:  # bound to this node (not pending, not elsewhere)
                fresh[found[0]] = found[2]
        now = self.clock()
        with self._lock:
            changed = False
            for uid, old in self._pods.items():
                if uid in fresh:
                    changed |= self._merge(old, fresh[uid], now)
                else:
                    if old.deleted_at is None:
                        old.deleted_at = now
                    fresh[uid] = old
            changed |= fresh.keys() != self._pods.keys()
            self._pods = fresh
            if changed:
                self.version += 1
        return skipped

    def apply(self, event_type: str, pod: Any) -> bool:
        """A watch event; False when the object was unreadable (skipped)."""
        found = self._read(pod)
        if found is None:
            return False
        uid, node_name, entry = found
        with self._lock:
            old = self._pods.get(uid)
            if node_name != self.node_name:  # pending, or bound elsewhere: never ours
                if old is not None:
                    del self._pods[uid]
                    self.version += 1
                return True
            if event_type == "DELETED":
                if old is not None and old.deleted_at is None:
                    old.deleted_at = self.clock()
                return True
            if self._merge(old, entry, self.clock()):
                self.version += 1
            self._pods[uid] = entry
        return True

    def expire(self) -> None:
        """Forget pods deleted more than ``grace_s`` ago, and exited ids past their grace (timer)."""
        now = self.clock()
        cutoff = now - self.grace_s
        with self._lock:
            gone = [uid for uid, p in self._pods.items() if p.deleted_at is not None and p.deleted_at < cutoff]
            for uid in gone:
                del self._pods[uid]
            dropped = False
            for p in self._pods.values():
                if any(e[1] <= now for e in p.exited.values()):
                    p.exited = {cid: e for cid, e in p.exited.items() if e[1] > now}
                    dropped = True
            if gone or dropped:
                self.version += 1

    def __len__(self) -> int:
        with self._lock:
            return sum(1 for p in self._pods.values() if p.deleted_at is None)


@dataclass
class ReflectorStats:
    errors: dict[str, int] = field(default_factory=dict)  # code -> count
    relists: int = 0
    synced_at: float | None = None  # monotonic time the cache was last known current
    restarts: int = 0  # times the reflector's loop failed and was started again
    running: bool = False  # inside its list/watch loop (False: not started, stopped, or restarting)
    skipped: int = 0  # objects without a readable uid (or name, for the Node), skipped


@dataclass
class Backoff:
    """Exponential backoff with full jitter (AWS architecture blog, "Exponential Backoff And Jitter").

    The n-th delay in a row (n from 0) is ``uniform(0, ceiling)`` with ``ceiling = min(cap, base *
    2^n)``. With a ``Retry-After`` of r seconds (clamped to ``[0, cap]``; ``inf`` and ``1e300`` are
    the cap) it is ``r + uniform(0, max(ceiling, r))``: never sooner than the server asked, and
    spread over at least as long again, so that clients told the same r do not return together.
    The run of delays starts again from ``base`` once the last retry has gone ``reset_after_s``
    without an error (client-go's backoff manager resets after 2 min), so a healthy watch between
    two failures is what resets it, not a successful request in a failing loop, nor a request that
    stalls until its read timeout."""

    base_s: float = 1.0
    cap_s: float = 120.0
    rng: random.Random = field(default_factory=random.Random)
    reset_after_s: float = 300.0
    clock: Callable[[], float] = time.monotonic
    attempt: int = 0
    _retry_at: float | None = None

    def clamp_retry_after(self, retry_after_s: float | None) -> float | None:
        if retry_after_s is None or math.isnan(retry_after_s):
            return None
        return min(self.cap_s, max(0.0, retry_after_s))  # inf -> cap; a date in the past -> 0

    def next_delay(self, retry_after_s: float | None = None) -> float:
        now = self.clock()
        if self._retry_at is not None and now - self._retry_at > self.reset_after_s:
            self.attempt = 0  # the last retry went well for that long (a stalled request does not)
        ceiling = min(self.cap_s, self.base_s * (2**self.attempt))
        self.attempt = min(self.attempt + 1, 32)
        retry_after = self.clamp_retry_after(retry_after_s)
        if retry_after is None:
            delay = self.rng.uniform(0, ceiling)
        else:
            delay = retry_after + self.rng.uniform(0, max(ceiling, retry_after))
        self._retry_at = now + delay
        return delay

    def reset(self) -> None:
        self.attempt = 0
        self._retry_at = None


def parse_retry_after(value: str | None) -> float | None:
    """Seconds of a ``Retry-After`` header: delta-seconds or an HTTP date (RFC 9110 10.2.3); None
    when absent or unreadable. Not clamped: ``inf`` stays inf (``Backoff`` clamps)."""
    if not value:
        return None
    try:
        return float(value)
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        return None
    return when.timestamp() - time.time()


class MalformedResponse(ValueError):
    """A list body that is not a JSON list object."""


def error_code(error: BaseException) -> tuple[str, float | None]:
    """(label for kube_watch_errors_total{code}, Retry-After seconds or None) of an API error."""
    from kubernetes.client.rest import ApiException
    from urllib3.exceptions import NewConnectionError, ProtocolError, ReadTimeoutError

    if isinstance(error, MalformedResponse):
        return "malformed", None
    if isinstance(error, ApiException):
        headers = error.headers or {}
        value = headers.get("Retry-After") if hasattr(headers, "get") else None
        return str(error.status or "unknown"), parse_retry_after(value)
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

    MIN_WATCH_S = 1.0  # a watch closed sooner with no event is an error (client-go: "very short watch")

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
        backoff_base_s: float = 1.0,
        backoff_cap_s: float = 120.0,
        relist_delay_s: tuple[float, float] = (0.8, 1.6),
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
        self.backoff = backoff or Backoff(backoff_base_s, backoff_cap_s, rng=self.rng, clock=clock)
        self.sleep = sleep or stop.wait  # returns True when stopped
        self.clock = clock
        self.stats = ReflectorStats()
        self.resource_version: str | None = None
        self.relist_delay_s = relist_delay_s
        self._version_unavailable = False
        self._lists = 0
        self._resp: Any = None  # the request in progress (close() shuts its socket)
        self._resp_lock = threading.Lock()

    def _error(self, code: str) -> None:
        self.stats.errors[code] = self.stats.errors.get(code, 0) + 1

    def _wait(self, delay: float) -> bool:
        """Sleep ``delay`` (bounded: a sleep never overflows); True when stopped meanwhile."""
        if not math.isfinite(delay) or delay < 0:
            delay = self.backoff.cap_s
        return self.sleep(min(delay, 2 * self.backoff.cap_s))

    def _back_off(self, code: str | None, retry_after: float | None = None, detail: str = "") -> bool:
        """Count an error (``code`` None: already counted, or none), log it, wait the next backoff
        delay; True when stopped meanwhile."""
        if code is not None:
            self._error(code)
        delay = self.backoff.next_delay(retry_after)
        what = code or f"watch ended within {self.MIN_WATCH_S:g} s"
        log.warning("%s list/watch failed (%s%s); retrying in %.1fs", self.kind, what, detail, delay)
        return self._wait(delay)

    def _request(self, **params: Any) -> Any:
        """The raw response (urllib3) of a list or watch: the body is read as JSON here, never
        through the client's models (review #1). Non-2xx raise ``ApiException``."""
        resp = self.list_func(
            field_selector=self.field_selector,
            _request_timeout=self.timeouts,
            _preload_content=False,
            **params,
        )
        with self._resp_lock:
            self._resp = resp
        if self.stop.is_set():  # close() came between our check and the request: do not block on it
            self.interrupt()
        return resp

    def _release(self, resp: Any, close: bool = False) -> None:
        """Done with ``resp``: a list's connection goes back to the pool; a watch's is closed (it
        may have ended mid-stream), as the client's own ``Watch`` does."""
        with self._resp_lock:
            self._resp = None
        with contextlib.suppress(Exception):
            if close:
                resp.close()
            resp.release_conn()

    def interrupt(self) -> None:
        """Unblock a request in progress (its socket is shut; the read ends at once): close()."""
        with self._resp_lock:
            resp = self._resp
        if resp is not None:
            with contextlib.suppress(Exception):
                resp.shutdown()

    def _list_version(self) -> str | None:
        """client-go's relistResourceVersion: "0" (the watch cache) for the first list; the last
        version synced afterwards (the state never goes back in time); None (a consistent read
        from etcd) when that version is unavailable (410 Expired, "too large resource version")."""
        if self._version_unavailable:
            return None
        return self.resource_version or "0"

    def _list(self) -> None:
        version = self._list_version()
        resp = self._request(**({"resource_version": version} if version is not None else {}))
        try:
            body = json.loads(resp.data)
        except ValueError as e:
            raise MalformedResponse(f"list is not JSON: {e}") from None
        finally:
            self._release(resp)
        items = body.get("items") if isinstance(body, dict) else None
        meta = body.get("metadata") if isinstance(body, dict) else None
        if not isinstance(items, list) or not isinstance(meta, dict):
            raise MalformedResponse("list without items or metadata")
        self.stats.skipped += self.replace(items) or 0
        self.resource_version = _str(meta.get("resourceVersion")) or None
        self._version_unavailable = False
        self._lists += 1
        if self._lists > 1:
            self.stats.relists += 1
        self.stats.synced_at = self.clock()

    def _watch(self) -> tuple[int, int]:
        """One watch from ``resource_version``: (events, malformed lines). A line that is not a
        JSON event is skipped and counted; a blank line is nothing; an object the store cannot
        read is skipped and counted, and the version still moves past it."""
        from kubernetes.client.rest import ApiException

        events = malformed = 0
        resp = self._request(
            watch=True,
            resource_version=self.resource_version,
            allow_watch_bookmarks=True,
            timeout_seconds=int(self.rng.uniform(*self.watch_timeout_s)),
        )
        try:
            for line in _lines(resp):
                if self.stop.is_set():
                    break
                try:
                    event = json.loads(line)
                except ValueError:
                    event = None
                kind = event.get("type") if isinstance(event, dict) else None
                if not isinstance(kind, str):
                    self._error("malformed")
                    malformed += 1
                    continue
                obj = event.get("object")
                if kind == "ERROR":
                    status = obj if isinstance(obj, dict) else {}
                    code = status.get("code") if isinstance(status.get("code"), int) else 500
                    raise ApiException(status=code, reason=f"{status.get('reason')}: {status.get('message')}")
                events += 1
                if kind != "BOOKMARK" and not self.apply(kind, obj):
                    self.stats.skipped += 1
                meta = obj.get("metadata") if isinstance(obj, dict) else None
                version = _str(meta.get("resourceVersion")) if isinstance(meta, dict) else ""
                if version:
                    self.resource_version = version
                self.stats.synced_at = self.clock()
        finally:
            self._release(resp, close=True)
        return events, malformed

    def run(self, iterations: int | None = None) -> None:
        """The list/watch loop. Every way round it either waits for the server (a watch that
        stayed open) or waits a delay: a backoff delay after an error or a watch shorter than
        ``MIN_WATCH_S``, a short jittered one before the relist after a first 410."""
        from kubernetes.client.rest import ApiException

        if self.sleep(self.rng.uniform(0, self.startup_jitter_s)):
            return
        need_list = True
        expired_again = False  # a 410 came since the last watch that worked: the next one backs off
        done = 0
        while not self.stop.is_set() and (iterations is None or done < iterations):
            done += 1
            try:
                if need_list:
                    self._list()
                    need_list = False
                started = self.clock()
                events, malformed = self._watch()
                if self.clock() - started < self.MIN_WATCH_S and not self.stop.is_set():
                    # closed at once: with no event it failed (counted, unless its garbage was);
                    # with events, it is no error, but re-watching at once could spin
                    if events == 0 and malformed == 0:
                        self._error("empty_watch")
                    if self._back_off(None):
                        return
                    continue
                expired_again = False
            except ApiException as e:
                if self.stop.is_set():
                    return
                code, retry_after = error_code(e)
                if e.status == 410 or (e.status == 504 and "too large resource version" in str(e.reason).lower()):
                    need_list = True
                    self._version_unavailable = True  # relist with a consistent read
                    if not expired_again:
                        expired_again = True
                        self._error(code)
                        delay = self.rng.uniform(*self.relist_delay_s)
                        log.info("%s watch expired (%s): relisting in %.1fs", self.kind, code, delay)
                        if self._wait(delay):  # client-go: 0.8-1.6 s, so that agents do not relist together
                            return
                        continue
                if self._back_off(code, retry_after):
                    return
            except Exception as e:  # refused, reset, stalled stream, a bug: back off, never spin
                if self.stop.is_set():
                    return  # close() shut the socket under the read: not an error
                code, _ = error_code(e)
                if self._back_off(code, detail=f": {type(e).__name__}: {e}"):
                    return


def _lines(resp: Any) -> Iterator[bytes]:
    """The non-blank lines of a streamed (chunked) response."""
    buffer = b""
    for chunk in resp.stream(amt=None, decode_content=False):
        buffer += chunk
        if b"\n" not in chunk:  # a big object arrives in many chunks: split once it is whole
            continue
        *lines, buffer = buffer.split(b"\n")
        for line in lines:
            if line.strip():
                yield line
    if buffer.strip():
        yield buffer


def _node_name(node: Any) -> str | None:
    meta = node.get("metadata") if isinstance(node, dict) else None
    name = meta.get("name") if isinstance(meta, dict) else None
    return name if isinstance(name, str) and name else None


def _node_labels(node: dict) -> dict[str, str]:
    labels = node["metadata"].get("labels")
    return {k: v for k, v in labels.items() if isinstance(v, str)} if isinstance(labels, dict) else {}


def api_client(kubeconfig: Path | None) -> Any | None:
    """An API client from ``kubeconfig``, or in-cluster configuration inside a pod; None outside a
    pod without a kubeconfig (a plain host: no API is used)."""
    if kubeconfig is None and not (os.environ.get("KUBERNETES_SERVICE_HOST") and IN_CLUSTER_TOKEN.exists()):
        return None
    from kubernetes import client, config  # 0.2 s of imports: not on a host without an API

    cfg = client.Configuration()
    if kubeconfig is not None:
        config.load_kube_config(config_file=str(kubeconfig), client_configuration=cfg)
    else:
        config.load_incluster_config(client_configuration=cfg)
    cfg.retries = False  # urllib3 would retry a refused connection at once, three times: we back off
    return client.ApiClient(cfg)


class KubeWatch:
    """This node's pods and Node object, watched on threads of their own; the ``kube`` unit.
    ``reflector_args`` go to both reflectors (each gets its own backoff: pass ``backoff_base_s``
    and ``backoff_cap_s`` rather than a shared ``backoff``)."""

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
        self.stop = stop
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
        self.reflectors = (self.pods, self.node)
        self._threads: list[threading.Thread] = []

    def _node_replace(self, nodes: list[Any]) -> int:
        """A list of this Node. One missing from it (or DELETED) keeps its last labels, on both
        paths alike: the tuning profiles select on them, and a Node object re-registered by its
        kubelet must not revert a node's tuning in between."""
        for node in map(_as_json, nodes):
            if _node_name(node) == self.node_name:
                self._set_node_labels(_node_labels(node))
        return sum(1 for n in nodes if _node_name(_as_json(n)) is None)

    def _node_apply(self, event_type: str, node: Any) -> bool:
        node = _as_json(node)
        name = _node_name(node)
        if name is None:
            return False
        if name == self.node_name and event_type != "DELETED":
            self._set_node_labels(_node_labels(node))
        return True

    def _set_node_labels(self, labels: dict[str, str]) -> None:
        if labels != self.node_labels:
            self.node_labels = labels
            self.node_labels_version += 1

    def _supervise(self, reflector: Reflector) -> None:
        """Run ``reflector`` until stopped; when its loop fails (a bug, or a fault its error
        handling did not foresee), count it, wait a backoff delay and start it again (it relists)."""
        while not self.stop.is_set():
            reflector.stats.running = True
            try:
                reflector.run()
                return  # stopped
            except Exception:
                reflector.stats.restarts += 1
                log.exception("%s reflector failed; restarting it", reflector.kind)
            finally:
                reflector.stats.running = False
            try:
                delay = reflector.backoff.next_delay()
            except Exception:  # the backoff itself is broken: a fixed, still jittered pause
                delay = random.uniform(1.0, 10.0)
            if self.stop.wait(min(max(delay, 0.0), 600.0) if math.isfinite(delay) else 600.0):
                return

    def start(self) -> None:
        if self._threads:
            return  # started already
        for reflector in self.reflectors:
            reflector.stats.running = True  # from now on; readiness must not see a gap before the thread runs
            t = threading.Thread(target=self._supervise, args=(reflector,), name=f"kube-{reflector.kind}", daemon=True)
            t.start()
            self._threads.append(t)

    def running(self) -> bool:
        """Every reflector is in its list/watch loop (it may be backing off). False while one is
        being restarted, or once its thread has ended: ``nodetune_kube_reflector_up``. Not the
        agent's readiness (review #4: names fall back to cgroup paths by contract)."""
        return len(self._threads) == len(self.reflectors) and all(
            r.stats.running and t.is_alive() for r, t in zip(self.reflectors, self._threads, strict=True)
        )

    def close(self, timeout: float = 10.0) -> None:
        """Stop both reflectors: the stop event, then their open requests' sockets shut (an idle
        watch would otherwise block until its read timeout, 120 s), then one join deadline for
        both threads."""
        self.stop.set()
        for reflector in self.reflectors:
            reflector.interrupt()
        self.join(timeout)

    def join(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))

    def maintain(self) -> None:
        self.index.expire()

    def collect(self) -> list[Metric]:
        errors = CounterMetricFamily(
            "nodetune_kube_watch_errors", "Failed list/watch requests to the API server, by code.", labels=["code"]
        )
        merged: dict[str, int] = {}
        for reflector in self.reflectors:
            # dict() copies in one step under the GIL; the reflector's thread may add a code meanwhile
            for code, n in dict(reflector.stats.errors).items():
                merged[code] = merged.get(code, 0) + n
        for code, n in sorted(merged.items()):
            errors.add_metric([code], n)
        relists = CounterMetricFamily("nodetune_kube_relists", "Lists after the first (410 Gone, or a restart).")
        relists.add_metric([], self.pods.stats.relists + self.node.stats.relists)
        restarts = CounterMetricFamily(
            "nodetune_kube_reflector_restarts",
            "Times a reflector's list/watch loop failed and was started again.",
            labels=["resource"],
        )
        up = GaugeMetricFamily(
            "nodetune_kube_reflector_up",
            "1 while the reflector runs its list/watch loop (backing off included), 0 while restarting or ended.",
            labels=["resource"],
        )
        threads = self._threads if len(self._threads) == len(self.reflectors) else [None] * len(self.reflectors)
        for reflector, thread in zip(self.reflectors, threads, strict=True):
            restarts.add_metric([reflector.kind], reflector.stats.restarts)
            alive = thread is not None and thread.is_alive() and reflector.stats.running
            up.add_metric([reflector.kind], 1 if alive else 0)
        age = GaugeMetricFamily(
            "nodetune_kube_pod_cache_age_seconds",
            "Seconds since the pod cache was last known current (a list, an event or a bookmark).",
        )
        synced = self.pods.stats.synced_at
        if synced is not None:
            age.add_metric([], max(0.0, self.clock() - synced))
        pods = GaugeMetricFamily("nodetune_kube_pods", "Pods of this node in the cache.")
        pods.add_metric([], len(self.index))
        skipped = CounterMetricFamily(
            "nodetune_kube_objects_skipped",
            "Objects from the API server the cache could not read (no uid or name), skipped.",
            labels=["resource"],
        )
        for reflector in self.reflectors:
            skipped.add_metric([reflector.kind], reflector.stats.skipped)
        return [errors, relists, restarts, up, age, pods, skipped]

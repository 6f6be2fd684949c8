"""A local HTTP server that speaks the Kubernetes API's list/watch protocol for pods and nodes.

What the real API server does that the agent depends on: lists with a ``resourceVersion``,
watches streamed as chunked JSON lines from a version (history replayed, then live events),
``BOOKMARK`` events, ``ERROR`` 410 for a version older than the compacted history, the server-side
``timeoutSeconds``, and field selectors.

Faults, each an action tuple (see ``Handler.do_GET``):

* ``("status", code[, headers])``: that status (429 + ``Retry-After``, 500, 410 ...);
* ``("close",)``: the connection dropped before any answer (a reset);
* ``("stall", seconds)``: a watch's headers, then nothing for that long (a stalled stream);
* ``("garbage",)``: a line that is not JSON first; ``("garbage_close",)``: that line, then the end;
* ``("gone",)``: a watch answered by an ``ERROR`` event with code 410 (history compacted);
* ``("empty",)``: a watch that ends at once;
* ``("blank",)``: blank lines first (a keep-alive), then the normal stream;
* ``("bookmark_close",)``: a watch that sends one ``BOOKMARK`` and ends (a very short watch).

They are played either per request, in order (``plan[kind]``: one action per request, ``None`` for
a normal answer), or on every request until cleared (``set_fault``; ``watch_only`` spares lists).
``limit_rate`` sheds load like the API server's Priority and Fairness: a token bucket admits so many
requests per second, the others get 429 with ``Retry-After``. Every request is recorded with its
time, its node (from the field selector) and the fault it got, so tests can check what each client
did and when. Used by the tests and by ``bench/api_storm.py``.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse


def pod(uid: str, name: str, node: str, containers: dict[str, str] | None = None, namespace: str = "default") -> dict:
    """A pod object; ``containers`` maps container name -> runtime id (without the prefix)."""
    containers = containers or {}
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "uid": uid},
        "spec": {"nodeName": node, "containers": [{"name": c, "image": "img"} for c in containers] or [{"name": "c"}]},
        "status": {
            "containerStatuses": [
                {
                    "name": c,
                    "containerID": f"containerd://{cid}",
                    "image": "img",
                    "imageID": "img@sha256:0",
                    "ready": True,
                    "restartCount": 0,
                }
                for c, cid in containers.items()
            ]
        },
    }


def node(name: str, labels: dict[str, str]) -> dict:
    return {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name, "labels": labels}}


class TokenBucket:
    """Admits ``rate`` requests per second, with a burst of one second's worth."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.tokens = rate
        self.at = time.monotonic()
        self.lock = threading.Lock()

    def take(self) -> bool:
        with self.lock:
            now = time.monotonic()
            self.tokens = min(self.rate, self.tokens + (now - self.at) * self.rate)
            self.at = now
            if self.tokens >= 1:
                self.tokens -= 1
                return True
            return False


class FakeAPIServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    # listen() backlog, read by the constructor: with the default 5, a burst of connects loses SYNs
    # and the clients retry them a second later (the bench set it after listen(), to no effect)
    request_queue_size = 1024

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.rv = 100
        self.objects: dict[str, dict[str, dict]] = {"pods": {}, "nodes": {}}
        self.history: list[tuple[int, str, str, dict]] = []  # (rv, kind, type, object)
        self.compacted = 0
        self.requests: list[dict[str, Any]] = []
        self.plan: dict[str, list[tuple]] = {"pods": [], "nodes": []}
        self.honour_field_selector = True
        self.fault: tuple | None = None  # played on every request (set_fault)
        self.fault_watch_only = False
        self.bucket: TokenBucket | None = None  # limit_rate
        self.rejected = 0  # requests the bucket refused
        self.cond = threading.Condition()
        self.generation = 0  # drop_watches() ends the streams of earlier generations
        self._thread = threading.Thread(target=self.serve_forever, daemon=True)
        self._closing = False

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    # --- state changes (tests) --------------------------------------------------------------
    def _event(self, kind: str, event_type: str, obj: dict) -> None:
        with self.cond:
            self.rv += 1
            obj = json.loads(json.dumps(obj))
            obj["metadata"]["resourceVersion"] = str(self.rv)
            key = obj["metadata"].get("uid") or obj["metadata"]["name"]
            if event_type == "DELETED":
                self.objects[kind].pop(key, None)
            else:
                self.objects[kind][key] = obj
            self.history.append((self.rv, kind, event_type, obj))
            self.cond.notify_all()

    def put(self, kind: str, obj: dict) -> None:
        key = obj["metadata"].get("uid") or obj["metadata"]["name"]
        self._event(kind, "MODIFIED" if key in self.objects[kind] else "ADDED", obj)

    def put_raw(self, kind: str, obj: Any, event_type: str = "ADDED") -> None:
        """An object as is, in the next lists and as a watch event: one the client's models reject
        (a field they require missing), or one that is no object at all. A dict ``metadata`` gets
        the event's ``resourceVersion``; the object is listed under a key of its own."""
        with self.cond:
            self.rv += 1
            obj = json.loads(json.dumps(obj))
            meta = obj.get("metadata") if isinstance(obj, dict) else None
            if isinstance(meta, dict):
                meta["resourceVersion"] = str(self.rv)
            self.objects[kind][f"raw-{self.rv}"] = obj
            self.history.append((self.rv, kind, event_type, obj))
            self.cond.notify_all()

    def delete(self, kind: str, key: str) -> None:
        self._event(kind, "DELETED", self.objects[kind][key])

    def bookmark(self, kind: str) -> None:
        with self.cond:
            self.rv += 1
            self.history.append((self.rv, kind, "BOOKMARK", {"metadata": {"resourceVersion": str(self.rv)}}))
            self.cond.notify_all()

    def compact(self) -> None:
        """Forget the history: a watch from any version seen so far gets 410 Gone."""
        with self.cond:
            self.rv += 1  # a version of its own: a list made after this can be watched
            self.compacted = self.rv
            self.cond.notify_all()

    def set_fault(self, action: tuple, watch_only: bool = False) -> None:
        """Answer every request (every watch, with ``watch_only``) with ``action`` until cleared."""
        with self.cond:
            self.fault, self.fault_watch_only = action, watch_only
            self.cond.notify_all()

    def clear_fault(self) -> None:
        with self.cond:
            self.fault = None
            self.cond.notify_all()

    def drop_watches(self) -> None:
        """Reset every open watch connection at once, as an API server that restarts does."""
        with self.cond:
            self.generation += 1
            self.cond.notify_all()

    def limit_rate(self, rate: float | None) -> None:
        """Admit ``rate`` requests per second; answer the others 429 ``Retry-After: 1``. None: no limit."""
        self.bucket = TokenBucket(rate) if rate else None

    def requests_of(self, kind: str, watch: bool | None = None) -> list[dict[str, Any]]:
        return [r for r in self.requests if r["kind"] == kind and (watch is None or r["watch"] == watch)]

    def requests_by_node(self, kind: str = "pods") -> dict[str, list[dict[str, Any]]]:
        """Requests of each client, told apart by the node of their field selector."""
        out: dict[str, list[dict[str, Any]]] = {}
        for r in self.requests_of(kind):
            out.setdefault(r["node"], []).append(r)
        return out

    def start(self) -> FakeAPIServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._closing = True
        with self.cond:
            self.cond.notify_all()
        self.shutdown()
        self.server_close()

    def kubeconfig(self, directory: Path) -> Path:
        path = directory / "kubeconfig"
        path.write_text(
            json.dumps(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
                    "users": [{"name": "u", "user": {"token": "t"}}],
                    "contexts": [{"name": "c", "context": {"cluster": "fake", "user": "u"}}],
                    "current-context": "c",
                }
            )
        )
        return path


class Handler(BaseHTTPRequestHandler):
    server: FakeAPIServer
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: object) -> None:
        pass

    def _json(self, status: int, body: dict, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def do_GET(self) -> None:
        srv = self.server
        url = urlparse(self.path)
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        kind = "pods" if url.path.endswith("/pods") else "nodes" if url.path.endswith("/nodes") else ""
        watch = query.get("watch") in ("true", "1", "True")
        selector = query.get("fieldSelector", "")
        want = selector.split("=", 1)[1] if "=" in selector else None
        record = {**query, "t": time.monotonic(), "kind": kind, "watch": watch, "node": want or "", "fault": None}
        generation = srv.generation  # a watch recorded before drop_watches() is dropped
        srv.requests.append(record)
        if not kind:
            self._json(404, {"kind": "Status", "code": 404})
            return
        with srv.cond:
            fault = srv.fault if srv.fault and (watch or not srv.fault_watch_only) else None
            action = srv.plan[kind].pop(0) if srv.plan[kind] else fault
        if srv.bucket is not None and not srv.bucket.take():
            srv.rejected += 1
            action = ("status", 429, {"Retry-After": "1"})
        record["fault"] = action[0] if action else None
        if action and action[0] == "status":
            code, headers = action[1], (action[2] if len(action) > 2 else {})
            self._json(code, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": code}, headers)
            return
        if action and action[0] == "close":
            self.connection.shutdown(socket.SHUT_RDWR)  # dropped before any answer
            self.close_connection = True
            return

        def visible(obj: dict) -> bool:
            if not srv.honour_field_selector or want is None:
                return True
            if not isinstance(obj, dict) or not isinstance(obj.get("metadata"), dict):
                return True  # a raw object (put_raw): shown to every client
            if kind == "pods":
                return (obj.get("spec") or {}).get("nodeName") == want
            return obj["metadata"].get("name") == want

        if not watch:
            with srv.cond:
                items = [o for o in srv.objects[kind].values() if visible(o)]
                rv = srv.rv
            self._json(
                200,
                {
                    "apiVersion": "v1",
                    "kind": "PodList" if kind == "pods" else "NodeList",
                    "metadata": {"resourceVersion": str(rv)},
                    "items": items,
                },
            )
            return
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        try:
            if action and action[0] == "empty":
                return
            if action and action[0] == "stall":
                until = time.monotonic() + action[1]
                with srv.cond:  # ends early when the server stops
                    while not srv._closing and time.monotonic() < until:
                        srv.cond.wait(until - time.monotonic())
                return
            if action and action[0] == "blank":
                self._chunk(b"\n\n")
            if action and action[0] == "bookmark_close":
                with srv.cond:
                    rv = srv.rv
                event = {"type": "BOOKMARK", "object": {"kind": "Pod", "metadata": {"resourceVersion": str(rv)}}}
                self._chunk(json.dumps(event).encode() + b"\n")
                return
            if action and action[0] in ("garbage", "garbage_close"):
                self._chunk(b"{this is not json\n")
                if action[0] == "garbage_close":
                    return
            since = int(query.get("resourceVersion") or 0)
            deadline = time.monotonic() + float(query.get("timeoutSeconds") or 600)
            with srv.cond:
                if since < srv.compacted or (action and action[0] == "gone"):
                    error = {
                        "type": "ERROR",
                        "object": {
                            "kind": "Status",
                            "apiVersion": "v1",
                            "status": "Failure",
                            "message": "too old resource version",
                            "reason": "Expired",
                            "code": 410,
                        },
                    }
                    self._chunk(json.dumps(error).encode() + b"\n")
                    return
            sent = since
            while not srv._closing and time.monotonic() < deadline:
                if srv.generation != generation:
                    self.connection.shutdown(socket.SHUT_RDWR)  # reset: no end-of-stream chunk
                    self.close_connection = True
                    return
                with srv.cond:
                    pending = [h for h in srv.history if h[0] > sent and h[1] == kind]
                    if not pending:
                        srv.cond.wait(min(0.2, max(0.0, deadline - time.monotonic())))
                        continue
                for rv, _kind, event_type, obj in pending:
                    sent = rv
                    if event_type != "BOOKMARK" and not visible(obj):
                        continue
                    if event_type == "BOOKMARK" and query.get("allowWatchBookmarks") not in ("true", "True"):
                        continue
                    self._chunk(json.dumps({"type": event_type, "object": obj}).encode() + b"\n")
        except (BrokenPipeError, ConnectionResetError):
            return
        finally:
            with contextlib.suppress(OSError):
                self.wfile.write(b"0\r\n\r\n")


@contextmanager
def fake_apiserver() -> Iterator[FakeAPIServer]:
    srv = FakeAPIServer().start()
    try:
        yield srv
    finally:
        srv.stop()

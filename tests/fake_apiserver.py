"""A local HTTP server that speaks the Kubernetes API's list/watch protocol for pods and nodes.

What the real API server does that the agent depends on: lists with a ``resourceVersion``,
watches streamed as chunked JSON lines from a version (history replayed, then live events),
``BOOKMARK`` events, ``ERROR`` 410 for a version older than the compacted history, the server-side
``timeoutSeconds``, and field selectors. Faults are scripted per request: a status code with
headers (429 + Retry-After, 500), a dropped connection, a stalled stream, a malformed line, a
watch that closes at once, a server that ignores the field selector. Every request is recorded
with its time, so tests can check what the client did and when.
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


class FakeAPIServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.rv = 100
        self.objects: dict[str, dict[str, dict]] = {"pods": {}, "nodes": {}}
        self.history: list[tuple[int, str, str, dict]] = []  # (rv, kind, type, object)
        self.compacted = 0
        self.requests: list[dict[str, Any]] = []
        self.plan: dict[str, list[tuple]] = {"pods": [], "nodes": []}
        self.honour_field_selector = True
        self.cond = threading.Condition()
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
            self.compacted = self.rv + 1
            self.cond.notify_all()

    def requests_of(self, kind: str, watch: bool | None = None) -> list[dict[str, Any]]:
        return [r for r in self.requests if r["kind"] == kind and (watch is None or r["watch"] == watch)]

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


class _Handler(BaseHTTPRequestHandler):
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
        srv.requests.append({**query, "t": time.monotonic(), "kind": kind, "watch": watch})
        if not kind:
            self._json(404, {"kind": "Status", "code": 404})
            return
        action = srv.plan[kind].pop(0) if srv.plan[kind] else None
        if action and action[0] == "status":
            code, headers = action[1], (action[2] if len(action) > 2 else {})
            self._json(code, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": code}, headers)
            return
        if action and action[0] == "close":
            self.connection.shutdown(socket.SHUT_RDWR)  # dropped before any answer
            self.close_connection = True
            return
        selector = query.get("fieldSelector", "")
        want = selector.split("=", 1)[1] if "=" in selector else None

        def visible(obj: dict) -> bool:
            if not srv.honour_field_selector or want is None:
                return True
            if kind == "pods":
                return obj.get("spec", {}).get("nodeName") == want
            return obj["metadata"]["name"] == want

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
                time.sleep(action[1])
                return
            if action and action[0] == "garbage":
                self._chunk(b"{this is not json\n")
            since = int(query.get("resourceVersion") or 0)
            deadline = time.monotonic() + float(query.get("timeoutSeconds") or 600)
            with srv.cond:
                if since < srv.compacted:
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

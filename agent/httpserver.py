"""The agent's HTTP/1.1 server: one event loop (asyncio's API; uvloop for plain HTTP) reads every
connection, a bounded pool of worker threads does the slow work (rendering a scrape, checking a
password). Kernel interfaces: TCP sockets, epoll (via the loop), RLIMIT_NOFILE.

Why this shape (issue 21): a reader thread per connection (``http.server``) or a bounded pool of
threads that each read a request head (cheroot) lets slow peers hold the threads, and /healthz
waits behind them. Here no thread ever waits on a peer: the loop parses heads with h11 (the
HTTP/1.1 state machine from python-hyper) under fixed limits, answers /healthz itself, and hands a
request to a worker only once its head is complete and admitted.

What holds against hostile or broken peers:

- at most ``max_connections`` connections; when full, a new connection closes the one that has
  waited longest without a complete request (idle keep-alive or unfinished head), or else the one
  that has not read its response for longest or keeps pipelined requests queued, so slow peers
  cannot keep a liveness probe out;
- the next request on a connection is read once the previous response has reached the kernel
  (plain HTTP), so a peer that pipelines and never reads holds one response;
- a request line over ``MAX_REQUEST_LINE`` bytes gets 414, a head over ``max_header_bytes`` or
  with more than ``MAX_HEADERS`` fields 431; a request with a body 413; then the connection closes;
- a request head must be complete ``read_timeout_s`` after its first byte (after the connection
  opened, for the first request; the TLS handshake included), a kept-alive connection may idle
  ``idle_timeout_s`` between requests, a response must have reached the kernel
  ``write_timeout_s`` after it was written (one deadline for all of it);
- a request cut off before the end of its head (EOF, reset, timeout) gets no response;
- each of these is one log line (``EventLog``: at most one per second per kind, with a count of
  the ones folded into it), never a traceback;
- TLS is negotiated per connection with the context the server's ``tls()`` returns at accept
  time, so a reloaded web config applies to the next connection (asyncio ``start_tls``); a socket
  on the TLS port gets its transport and TLS state only once its first byte starts a TLS
  handshake record (until then: an fd in a bounded queue, closed by any other byte), so a flood
  of bare or plain-HTTP connections costs the loop one ``recv()`` each and leaves room for a probe.

What a flood leaves behind (memory back near its baseline, issue 21): a connection without a
complete head holds its bytes and an entry in a deadline queue, not an h11 parser and a timer of
its own; the connection tables are copied into smaller ones once a burst is over (``compact``).
What remains is pymalloc arenas pinned by a few objects allocated at the flood's peak (README,
Memory after a flood); it does not grow from one flood to the next.
"""

from __future__ import annotations

import asyncio
import asyncio.sslproto
import collections
import concurrent.futures
import errno
import gc
import inspect
import logging
import re
import resource
import socket
import ssl
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from http import HTTPStatus

import h11

from host import libc

try:
    import uvloop
except ImportError:  # a platform without its wheels: asyncio's own loop, slower to accept
    uvloop = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

MAX_REQUEST_LINE = 8190  # bytes, as Apache's LimitRequestLine; longer gets 414
MAX_HEADERS = 100  # header fields, as Apache's LimitRequestFields; more gets 431
LISTEN_BACKLOG = 4096  # the kernel caps it at net.core.somaxconn
ACCEPT_BATCH = 32  # connections accepted per loop iteration
TRIM_AFTER = 1024  # connections accepted after which, once few are left, memory is handed back
TLS_MAX_CONNECTIONS = 1024  # with TLS, whatever --http-max-connections says
FLUSH_EVERY_S = 5.0  # folded log events are counted at least this often
TLS_READ_BUFFER = 17 * 1024  # bytes; a TLS record is at most 16 KiB of data plus its framing
PIPELINE_EVICTABLE = 16  # requests in a row found already buffered, after which a connection is evictable
RELEASE_EVERY_S = 60.0  # memory is handed back at most this often (gc.collect and malloc_trim take ms)
STOP_ROUNDS = 10  # stop() cancels tasks and closes connections at most this many times over
STOP_JOIN_S = 10.0  # stop() waits this long for a worker thread still rendering
FD_RESERVE = 512  # fds kept for everything else the agent opens (BPF maps and programs, cgroup and proc files)
HELLO_FLOOR = 4 * ACCEPT_BATCH  # with TLS, sockets that may wait for their first bytes, at least (fds permitting)
TLS_HANDSHAKE_RECORD = 0x16  # the content type of a TLS record carrying a ClientHello (RFC 8446 5.1)
TLS_RECORD_HEADER = 5  # bytes: content type, legacy version (major 3), length (RFC 8446 5.1)
TLS_MAX_RECORD = 16384 + 2048  # a record's length, at most (RFC 8446 5.2, TLSCiphertext)
ACCEPT_RETRY_S = 1.0  # after ACCEPT_PAUSE_ERRNOS, accepting resumes this much later (as asyncio's own accept does)
SWEEP_EVERY_S = 0.5  # how often sockets still waiting for their first TLS byte are checked for the read timeout
DEADLINE_SLACK_S = 0.05  # read and idle deadlines due within this much are closed together, in one wake-up
ARM_STEPS = 64  # a TLS connection's read deadline (from its accept) is kept to within 1/64 of the read timeout
# accept(2) errors after which accepting pauses for ACCEPT_RETRY_S: out of fds or memory. Any other
# (ECONNABORTED, and the network errors accept(2) says to treat as EAGAIN and retry) concerns one
# connection: the next is accepted at once.
ACCEPT_PAUSE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
END_OF_HEAD = re.compile(b"\n\r?\n")  # a blank line, as h11 finds it (h11/_receivebuffer.py, blank_line_regex)


_SSL_MAX_SIZE = asyncio.sslproto.SSLProtocol.max_size  # asyncio's own, put back when no TLS server runs
_tls_servers: list[HttpServer] = []
_tls_servers_lock = threading.Lock()


@dataclass(frozen=True)
class Limits:
    """What one peer may cost the server (README, HTTP endpoint)."""

    max_connections: int = 4096
    max_header_bytes: int = 16384  # all header lines of a request, without its request line
    read_timeout_s: float = 10.0
    idle_timeout_s: float = 30.0
    write_timeout_s: float = 30.0


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]  # lower-case names; a repeated field's values joined with ", "
    peer: str
    peercert: dict | None = None


@dataclass
class Response:
    status: int
    body: bytes = b""
    headers: list[tuple[str, str]] = field(default_factory=list)


@dataclass
class Work:
    """Slow work for a worker thread; ``done`` runs once the response has left (or the connection
    is gone), whatever happened: it releases what the handler reserved."""

    run: Callable[[], Response]
    done: Callable[[], None] = lambda: None


Handler = Callable[[Request], "Response | Work | Awaitable[Response | Work]"]


class EventLog:
    """One log line per event kind per second at most; the events folded meanwhile are counted on
    the next line of that kind, so an attack of 5,000 connections writes a few lines, not 5,000."""

    def __init__(self, interval_s: float = 1.0) -> None:
        self.interval_s = interval_s
        self._last: dict[str, float] = {}
        self._folded: collections.Counter[str] = collections.Counter()
        self._lock = threading.Lock()  # notes come from the loop and from worker threads

    def note(self, kind: str, message: str, *args: object) -> None:
        now = time.monotonic()
        with self._lock:
            if now - self._last.get(kind, -1e9) < self.interval_s:
                self._folded[kind] += 1
                return
            self._last[kind] = now
            folded = self._folded.pop(kind, 0)
        suffix = f" (and {folded} more like it in the last {self.interval_s:g}+ s)" if folded else ""
        log.info("http: " + message + suffix, *args)

    def flush(self) -> None:
        """Count the events folded since their kind's last line, so none goes unreported."""
        with self._lock:
            folded_now = sorted(self._folded.items())
            self._folded.clear()
            for kind, _ in folded_now:
                self._last[kind] = time.monotonic()
        for kind, folded in folded_now:
            log.info("http: %d more %s events since the last line of that kind", folded, kind)


def raise_nofile_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit (connections need an fd each); return it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as e:
            log.warning("could not raise the open-files limit from %d to %d: %s", soft, hard, e)
    return soft


def release_memory() -> None:
    """After a burst of connections: hand the heap memory they used back to the kernel. Python keeps
    freed objects' memory in glibc's heap, which does not shrink by itself (RSS stayed 15 MB above
    its baseline after 5,000 connections); malloc_trim(3) returns it."""
    gc.collect()
    libc.malloc_trim()  # False (nothing done) where libc has none


def connection_cap(wanted: int, nofile: int) -> int:
    """Connections allowed: ``wanted``, kept ``FD_RESERVE`` below the open-files limit."""
    return max(1, min(wanted, nofile - FD_RESERVE))


def tls_caps(wanted: int, nofile: int) -> tuple[int, int]:
    """With TLS: (connections, sockets waiting for their first TLS bytes), from one budget of fds,
    the open-files limit minus ``FD_RESERVE``. The waiting sockets keep ``HELLO_FLOOR`` of it (half
    of it if smaller), and the connections shrink to leave that room: with the queue given only
    the fds the connections left, a hard limit of 1024 left it 1 socket, and two clients
    connecting at once closed each other."""
    budget = max(2, nofile - FD_RESERVE)
    connections = min(wanted, TLS_MAX_CONNECTIONS, budget)
    waiting = min(wanted, max(min(HELLO_FLOOR, budget // 2), budget - connections))
    return max(1, min(connections, budget - waiting)), max(1, waiting)


class _Connection(asyncio.Protocol):
    """One client connection: head parsing under limits, timeouts, one request at a time.

    Slots, no per-instance dict, and the peer's address read only when a log line or a request
    needs it: thousands of them at once in a flood, and what they allocate from Python's small-
    object arenas at the peak of one is what can stay pinned after it (see ``release_memory``)."""

    __slots__ = (
        "accept_deadline",
        "busy",
        "closed",
        "deadlines",
        "drained",
        "generation",
        "h11",
        "head",
        "head_bytes",
        "line_bytes",
        "line_done",
        "peercert",
        "pipelined",
        "raw_transport",
        "server",
        "timer_why",
        "transport",
        "write_timer",
    )

    def __init__(self, server: HttpServer, accept_deadline: float | None = None) -> None:
        self.server = server
        # TLS: when the read timeout counted from the accept ends (loop time); the time the socket
        # waited for its first bytes counts, so the timeout does not start again here
        self.accept_deadline = accept_deadline
        self.transport: asyncio.Transport | None = None
        self.raw_transport: asyncio.Transport | None = None  # the TCP one, under TLS's
        self.peercert: dict | None = None
        # Made once a request head is complete (or cannot be one): until then the bytes wait in
        # ``head``, so the thousands of unfinished heads of a slowloris flood cost no parser each.
        self.h11: h11.Connection | None = None
        self.head: bytearray | None = None
        self.busy = False  # a request is being served: reading paused, not evictable
        self.closed = False
        self.head_bytes = 0  # bytes of the request head received so far
        self.line_done = False  # the request line has ended
        self.line_bytes = 0  # its length, once it has
        self.deadlines: collections.OrderedDict[_Connection, float] | None = None  # the server's queue it is in
        self.timer_why = ""
        self.write_timer: asyncio.TimerHandle | None = None
        self.drained: asyncio.Future[None] | None = None
        self.pipelined = 0  # requests in a row that were already buffered when the previous ended
        self.generation = 0  # of the TLS settings this connection's handshake was made with

    # --- asyncio callbacks ----------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.raw_transport = transport  # type: ignore[assignment]
        if not self.server.admit(self):
            return
        # Paused as soon as a response does not fit the kernel's socket buffer: the next request
        # is then read only once this one has left (wait_drained), so pipelining stays bounded.
        self.transport.set_write_buffer_limits(high=0)
        why = "no complete request head in time"
        left = self.server.limits.read_timeout_s
        if self.accept_deadline is None:
            self.arm(left, why)
        else:
            left = self.accept_deadline - self.server.loop.time()
            if left <= 0:  # its first bytes came just in time, the rest cannot
                self.timed_out(why)
                return
            self.timer_why = why
            self.server.arm_until(self, self.accept_deadline)
        context = self.server.tls()
        self.generation = self.server.generation()  # of that context
        if self.server.tls_mode != isinstance(context, ssl.SSLContext):  # fail closed until a restart
            self.server.events.note("config", "closed a connection from %s: TLS turned on or off, restart", self.peer)
            self.abort()
        elif context is not None:
            transport.pause_reading()  # nothing is read in the clear before start_tls takes over
            self.server.spawn(self.start_tls(context, left))

    @property
    def peer(self) -> str:
        """host:port of the peer, made when a log line or a request needs it."""
        # asyncio keeps it from the start; uvloop asks the socket each time, closed or not
        peer = self.raw_transport.get_extra_info("peername") if self.raw_transport is not None else "?"
        return f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)

    def parser(self) -> h11.Connection:
        """The connection's h11 state machine, made at its first use, with what was buffered."""
        if self.h11 is None:
            limit = MAX_REQUEST_LINE + self.server.limits.max_header_bytes
            self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=limit)
            if self.head:
                self.h11.receive_data(bytes(self.head))
            self.head = None
        return self.h11

    async def start_tls(self, context: ssl.SSLContext, timeout_s: float) -> None:
        assert self.transport is not None
        loop = asyncio.get_running_loop()
        try:
            transport = await loop.start_tls(
                self.transport,
                self,
                context,
                server_side=True,
                ssl_handshake_timeout=timeout_s,
            )
        except (TimeoutError, OSError, ssl.SSLError, ConnectionError) as e:
            self.server.events.note("tls", "TLS handshake with %s failed: %s", self.peer, _reason(e))
            self.abort()
            return
        if transport is None or self.closed:
            return
        self.transport = transport  # its write buffer keeps asyncio's limits (high=0 here left a
        # response paused for good after a close_notify)
        self.peercert = transport.get_extra_info("peercert")
        refusal = self.server.check_peer(self.peercert)
        if refusal:
            self.server.events.note("tls", "refused client certificate of %s: %s", self.peer, refusal)
            self.abort()

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        if self.head_bytes == 0 and self.timer_why == "idle":  # a kept-alive connection's next request
            self.arm(self.server.limits.read_timeout_s, "no complete request head in time")
        if not self.line_done and b"\n" in data:
            self.line_done = True
            self.line_bytes = self.head_bytes + data.index(b"\n")
        self.head_bytes += len(data)
        if self.h11 is not None:
            self.h11.receive_data(data)
        else:
            if self.head is None:
                self.head = bytearray()
            start = max(0, len(self.head) - 2)
            self.head += data
            # Until its blank line h11 refuses a head only if it starts with a control byte or a
            # space (h11/_readers.py, is_next_line_obviously_invalid_request_line), and the size
            # limits are checked here before its own: so a head cut off before its end gets the
            # same answer as when h11 parsed every byte (none), without a parser made at its EOF.
            if self.head[0] < 0x21 or END_OF_HEAD.search(self.head, start):
                self.parser()
        self.process()

    def eof_received(self) -> bool:
        if self.busy:  # a complete request, then EOF (a half-close): answer it, then close
            self.parser().receive_data(b"")
            # With TLS (a close_notify) asyncio closes the transport whatever this returns, and
            # warns at each connection that returned True (asyncio/sslproto.py, _do_read__copied).
            return not self.server.tls_mode
        if not self.closed:
            if self.head_bytes:
                self.server.events.note("cut", "request from %s ended before its head did: not answered", self.peer)
            self.abort()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed and not self.busy and self.head_bytes:
            self.server.events.note("cut", "connection from %s lost mid-request: %s", self.peer, _reason(exc))
        self.closed = True
        self.disarm()
        if self.write_timer is not None:
            self.write_timer.cancel()
            self.write_timer = None
        if self.drained is not None and not self.drained.done():
            self.drained.set_result(None)
        self.server.forget(self)

    def pause_writing(self) -> None:
        self.drained = asyncio.get_running_loop().create_future()
        self.server.stall(self)

    def resume_writing(self) -> None:
        self.server.unstall(self)
        if self.drained is not None and not self.drained.done():
            self.drained.set_result(None)

    # --- requests -------------------------------------------------------------------------------
    def process(self) -> None:
        """Parse what has arrived; serve a request whose head is complete."""
        if self.busy or self.closed:
            return
        limits = self.server.limits
        if (self.line_bytes if self.line_done else self.head_bytes) > MAX_REQUEST_LINE:
            self.refuse(HTTPStatus.REQUEST_URI_TOO_LONG, "request line too long")
            return
        if self.h11 is None:  # no complete head yet
            if self.head_bytes - self.line_bytes > limits.max_header_bytes:
                self.refuse(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, "request head too large")
            return
        parser = self.h11
        try:
            event = parser.next_event()
        except h11.RemoteProtocolError as e:
            self.refuse(e.error_status_hint, f"bad request head: {e}")
            return
        if event is h11.NEED_DATA:
            if self.head_bytes - self.line_bytes > limits.max_header_bytes:
                self.refuse(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, "request head too large")
            return
        if isinstance(event, h11.ConnectionClosed):
            self.abort()
            return
        if not isinstance(event, h11.Request):
            self.refuse(HTTPStatus.BAD_REQUEST, f"unexpected {type(event).__name__}")
            return
        if len(event.headers) > MAX_HEADERS:
            self.refuse(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, f"{len(event.headers)} header fields")
            return
        if sum(len(name) + len(value) + 4 for name, value in event.headers) > limits.max_header_bytes:
            self.refuse(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, "request head too large")
            return
        headers: dict[str, str] = {}
        for name, value in event.headers:
            key = name.decode("latin-1")
            text = value.decode("latin-1")
            headers[key] = f"{headers[key]}, {text}" if key in headers else text
        if headers.get("transfer-encoding") or headers.get("content-length", "0").strip("0"):
            self.refuse(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, "request with a body")
            return
        try:
            end = parser.next_event()  # a request without a body ends with its head
        except h11.RemoteProtocolError as e:
            end = e
        if not isinstance(end, h11.EndOfMessage):
            self.refuse(HTTPStatus.BAD_REQUEST, f"no end of request: {end}")
            return
        if self.server.tls_mode and self.generation != self.server.generation():
            # The TLS settings changed since this connection's handshake (a renewed certificate, a
            # new client CA or client_allowed_sans): closed unanswered, so that the client, as Go's
            # does with a kept-alive connection closed under it, asks again on a new connection.
            self.server.events.note("config", "closed %s: TLS settings changed since its handshake", self.peer)
            self.abort()
            return
        method = event.method.decode("ascii", "replace")
        target = event.target.decode("latin-1")
        if target.startswith(("http://", "https://")):  # absolute-form: a server MUST accept it (RFC 9112 3.2.2)
            target = "/" + target.split("://", 1)[1].partition("/")[2]
        self.disarm()
        self.busy = True
        self.server.unidle(self)
        assert self.transport is not None
        self.transport.pause_reading()
        request = Request(method, target.split("?", 1)[0], headers, self.peer, self.peercert)
        if method not in ("GET", "HEAD"):  # answered like any other, so keep-alive goes on after it
            answer = Response(HTTPStatus.METHOD_NOT_ALLOWED, b"only GET and HEAD\n", [("Allow", "GET, HEAD")])
            self.server.spawn(self.serve(request, answer))
        else:
            self.server.spawn(self.serve(request))

    async def serve(self, request: Request, answer: Response | Work | None = None) -> None:
        try:
            if answer is None:
                answer = self.server.handle(request)
                if inspect.isawaitable(answer):  # the handler waits for something first (authentication)
                    answer = await answer
        except asyncio.CancelledError:  # the server stops
            raise
        except Exception:  # a handler bug: one line, and the peer gets a 500
            log.exception("http: handler failed for %s %s", request.method, request.path)
            answer = Response(HTTPStatus.INTERNAL_SERVER_ERROR, b"internal error\n")
        assert answer is not None
        if isinstance(answer, Response):
            self.respond(request.method, answer)
            await self.wait_drained()
            self.next_cycle()
            return
        try:
            try:
                response = await asyncio.get_running_loop().run_in_executor(self.server.workers, answer.run)
            except Exception:
                log.exception("http: handler failed for %s %s", request.method, request.path)
                response = Response(HTTPStatus.INTERNAL_SERVER_ERROR, b"internal error\n")
            if not self.closed:
                self.respond(request.method, response)
                await self.wait_drained()
        finally:
            answer.done()
        self.next_cycle()

    def respond(self, method: str, response: Response) -> None:
        if self.closed or self.transport is None:
            return
        headers = [*response.headers, *self.server.extra_headers(), ("Content-Length", str(len(response.body)))]
        parser = self.parser()
        try:
            out = parser.send(
                h11.Response(status_code=int(response.status), headers=headers, reason=_reason_phrase(response.status))
            )
            if method != "HEAD" and response.body:
                out += parser.send(h11.Data(data=response.body))
            out += parser.send(h11.EndOfMessage())
        except h11.LocalProtocolError as e:
            log.error("http: could not answer %s: %s", self.peer, e)
            self.abort()
            return
        # One deadline for the whole response, armed here, not at each pause: with TLS our protocol
        # is not even told when the TCP transport under it pauses (the body sits in its buffer),
        # and a reader taking a trickle made the writes pause and resume again and again.
        if self.write_timer is not None:
            self.write_timer.cancel()
        self.write_timer = asyncio.get_running_loop().call_later(self.server.limits.write_timeout_s, self.write_timeout)
        self.transport.write(out)

    async def wait_drained(self) -> None:
        """Until the response has been handed to the kernel: the next (pipelined) request is not
        read before, so a peer that does not read holds one response, not thousands."""
        if self.drained is not None and not self.drained.done():
            await self.drained

    def next_cycle(self) -> None:
        """After a response: keep the connection for the next request, or close it."""
        self.busy = False
        if self.closed or self.transport is None:
            return
        parser = self.parser()
        if parser.our_state is h11.DONE and parser.their_state is h11.DONE:
            parser.start_next_cycle()
            # A peer that keeps requests queued (pipelining, maybe never reading an answer) keeps
            # the connection busy without ever waiting: after a few in a row it may be evicted.
            if parser.trailing_data[0]:
                self.pipelined += 1
                if self.pipelined >= PIPELINE_EVICTABLE:
                    self.server.stall(self)
            elif self.pipelined:
                self.pipelined = 0
                self.server.unstall(self)
            self.head_bytes = 0
            self.line_done = False
            self.line_bytes = 0
            self.server.idle(self)
            self.arm(self.server.limits.idle_timeout_s, "idle")
            self.transport.resume_reading()
            self.process()  # a pipelined request already buffered
        else:
            self.close()

    def refuse(self, status: int, why: str) -> None:
        """Answer an unacceptable request with ``status`` and close (no more is read)."""
        self.server.events.note(str(int(status)), "%d to %s: %s", int(status), self.peer, why)
        parser = self.parser()
        if parser.our_state in (h11.IDLE, h11.SEND_RESPONSE):
            body = f"{int(status)} {_reason_phrase(status).decode()}\n".encode()
            headers = [("Content-Type", "text/plain; charset=utf-8"), ("Connection", "close")]
            try:
                out = parser.send(
                    h11.Response(
                        status_code=int(status),
                        headers=[*headers, ("Content-Length", str(len(body)))],
                        reason=_reason_phrase(status),
                    )
                )
                out += parser.send(h11.Data(data=body)) + parser.send(h11.EndOfMessage())
                assert self.transport is not None
                self.transport.write(out)
            except h11.LocalProtocolError:
                pass
        self.close()

    # --- timers and closing ---------------------------------------------------------------------
    def arm(self, seconds: float, why: str) -> None:
        self.timer_why = why
        self.server.arm(self, seconds)

    def disarm(self) -> None:
        self.timer_why = ""
        self.disarm_queue()

    def disarm_queue(self) -> None:
        if self.deadlines is not None:
            self.deadlines.pop(self, None)
            self.deadlines = None

    def timed_out(self, why: str) -> None:
        if why != "idle":
            self.server.events.note("timeout", "closed %s: %s", self.peer, why)
        self.abort()

    def write_timeout(self) -> None:
        self.write_timer = None
        unsent = sum(t.get_write_buffer_size() for t in {self.transport, self.raw_transport} if t is not None)
        if not unsent or self.closed:  # it all reached the kernel in time
            return
        self.server.events.note("timeout", "closed %s: response not read within the write timeout", self.peer)
        self.abort()

    def close(self) -> None:
        """Close after what is written has been sent."""
        if not self.closed and self.transport is not None:
            self.closed = True
            self.disarm()
            self.transport.close()
            self.server.forget(self)

    def abort(self) -> None:
        """Close now, dropping anything unsent."""
        if not self.closed and self.transport is not None:
            self.closed = True
            self.disarm()
            self.transport.abort()
            self.server.forget(self)


def _tls_handshake_header(header: bytes, partial: bool = False) -> bool:
    """``header`` (5 bytes; with ``partial``, its start) is the header of a TLS handshake record:
    content type 22, legacy version 3.x, a length a record may have."""
    if len(header) < TLS_RECORD_HEADER and not partial:
        return False
    if header[:1] != bytes([TLS_HANDSHAKE_RECORD]) or header[1:2] not in (b"", b"\x03"):
        return False
    return len(header) < TLS_RECORD_HEADER or 0 < int.from_bytes(header[3:5], "big") <= TLS_MAX_RECORD


def _reason(exc: BaseException | None) -> str:
    if exc is None:
        return "closed"
    text = str(exc) or type(exc).__name__
    return text.splitlines()[0][:200]


def _reason_phrase(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode()
    except ValueError:
        return b""


class HttpServer:
    """The server on its own thread and event loop; ``handle`` decides what each request gets.

    ``tls()`` is asked at each accepted connection: an ``SSLContext`` (TLS), ``None`` (plain
    HTTP) or ``False`` (no valid configuration: the connection is closed). ``check_peer`` may
    refuse a verified client certificate (returns why). ``extra_headers`` go on every response.
    ``generation`` changes when the TLS settings do: a TLS connection made before is closed at its
    next request.
    """

    def __init__(
        self,
        address: tuple[str, int],
        handle: Handler,
        workers: int,
        limits: Limits | None = None,
        tls: Callable[[], ssl.SSLContext | bool | None] = lambda: None,
        check_peer: Callable[[dict | None], str] = lambda cert: "",
        extra_headers: Callable[[], list[tuple[str, str]]] = lambda: [],
        generation: Callable[[], int] = lambda: 0,
    ) -> None:
        self.handle = handle
        self.generation = generation
        self.tls = tls
        self.check_peer = check_peer
        self.extra_headers = extra_headers
        limits = limits or Limits()
        self.tls_mode = isinstance(tls(), ssl.SSLContext)
        nofile = raise_nofile_limit()
        # TLS: accepted sockets whose first bytes have not arrived, oldest first, with their
        # deadline. Each holds an fd and this entry only (no transport, no TLS state): as many as
        # --http-max-connections asked for, in one fd budget with the connections (tls_caps).
        self.hello_wait: collections.OrderedDict[socket.socket, float] = collections.OrderedDict()
        self.handing: set[socket.socket] = set()  # TLS: out of hello_wait, not yet in a transport
        if self.tls_mode:
            cap, self.hello_cap = tls_caps(limits.max_connections, nofile)
            if cap < min(limits.max_connections, TLS_MAX_CONNECTIONS):
                log.warning(
                    "http: TLS: at most %d connections and %d sockets before their handshake (open-files limit %d),"
                    " not %d",
                    cap,
                    self.hello_cap,
                    nofile,
                    limits.max_connections,
                )
            elif cap == TLS_MAX_CONNECTIONS < limits.max_connections:
                log.info("http: TLS: at most %d connections (each holds about 80 KB of TLS state)", cap)
        else:
            cap, self.hello_cap = connection_cap(limits.max_connections, nofile), 0
            if cap < limits.max_connections:
                log.warning(
                    "http: at most %d connections (open-files limit %d), not %d", cap, nofile, limits.max_connections
                )
        if cap < limits.max_connections:
            limits = Limits(
                cap, limits.max_header_bytes, limits.read_timeout_s, limits.idle_timeout_s, limits.write_timeout_s
            )
        self.limits = limits
        self.events = EventLog()
        self.workers = concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="http-worker")
        family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.socket = socket.socket(family, socket.SOCK_STREAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.socket.bind(address)
        self.socket.listen(LISTEN_BACKLOG)
        self.socket.setblocking(False)
        self.server_address = self.socket.getsockname()
        self.connections: set[_Connection] = set()
        self.tasks: set[asyncio.Task[None]] = set()
        self.accepted = 0  # connections since memory was last handed back
        self.waiting: collections.OrderedDict[_Connection, None] = collections.OrderedDict()  # oldest first
        # connections whose peer does not take a response in (writes paused) or keeps requests
        # queued (pipelining), longest first: when full, evicted after the waiting ones, so peers
        # that never read cannot keep a probe out
        self.stalled: collections.OrderedDict[_Connection, None] = collections.OrderedDict()
        self.released_at = -RELEASE_EVERY_S
        # Read and idle deadlines, one queue per duration: a queue's deadlines come in the order
        # its connections were armed, so the due ones are at its front, and one timer (at the
        # earliest front) serves every connection; a TimerHandle per connection cost the loop
        # about 650 bytes each (uvloop: handle, timer, libuv timer) in a flood of thousands.
        self.deadline_queues: dict[float, collections.OrderedDict[_Connection, float]] = {}
        self._wake: asyncio.TimerHandle | None = None
        self._wake_at = 0.0
        # TLS or plain HTTP is decided at start, as exporter-toolkit does. Plain HTTP runs on uvloop
        # (libuv): its accept path is C, so a flood of connections is drained several times faster
        # than by asyncio's (bench/http_attacks.py). TLS stays on asyncio's loop, whose transports
        # honour pause_reading() in connection_made; uvloop starts reading right after it, so a
        # ClientHello would reach the HTTP parser before start_tls took over (seen: 400s).
        if self.tls_mode:
            # asyncio gives each TLS connection a 256 KiB read buffer (SSLProtocol.max_size): 5,000
            # connections took 1.1 GB. One TLS record (16 KiB + overhead) per read is enough here.
            # It is process-wide: restored by the stop() of the last TLS server.
            with _tls_servers_lock:
                _tls_servers.append(self)
                asyncio.sslproto.SSLProtocol.max_size = TLS_READ_BUFFER
        self.loop = asyncio.new_event_loop() if self.tls_mode or uvloop is None else uvloop.new_event_loop()
        self.loop.set_exception_handler(self._loop_error)
        self._thread: threading.Thread | None = None
        self._server: asyncio.AbstractServer | None = None
        self._sweeper: asyncio.TimerHandle | None = None
        self._started = threading.Event()
        self._stopping: asyncio.Event | None = None

    # --- connection accounting (loop thread only) -----------------------------------------------
    def spawn(self, coro: Coroutine[object, object, None]) -> None:
        """Run a connection's coroutine; the loop holds tasks weakly, so they are kept here."""
        task = self.loop.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self.tasks.discard(task)  # the set of now: compact() replaces it

    def admit(self, conn: _Connection) -> bool:
        """Count a new connection in, closing the longest-waiting one if full; False: refused."""
        while len(self.connections) >= self.limits.max_connections and (self.waiting or self.stalled):
            queue, what = (self.waiting, "waiting for a request") if self.waiting else (self.stalled, "not reading")
            oldest, _ = queue.popitem(last=False)
            self.events.note(
                "evict", "%d connections: closed the longest %s, from %s", len(self.connections), what, oldest.peer
            )
            oldest.abort()
        if len(self.connections) >= self.limits.max_connections:  # every slot serves a request right now
            self.events.note("evict", "%d connections, all busy: refused %s", len(self.connections), conn.peer)
            conn.closed = True
            if conn.transport is not None:
                conn.transport.abort()
            return False
        self.connections.add(conn)
        self.waiting[conn] = None
        if conn.accept_deadline is None:  # from the TLS accept path: counted when accepted
            self.accepted += 1
        return True

    def arm(self, conn: _Connection, seconds: float) -> None:
        """``conn`` times out in ``seconds`` (its previous deadline, if any, is dropped)."""
        conn.disarm_queue()
        queue = self.deadline_queues.get(seconds)
        if queue is None:
            queue = self.deadline_queues[seconds] = collections.OrderedDict()
        deadline = self.loop.time() + seconds
        queue[conn] = deadline
        conn.deadlines = queue
        self._wake_by(deadline)

    def arm_until(self, conn: _Connection, deadline: float) -> None:
        """``conn`` times out at ``deadline`` (loop time; a TLS connection's accept deadline). It
        joins the queue of the time left rounded down to a step of 1/``ARM_STEPS`` of the read
        timeout, so that each queue stays in deadline order (at most ARM_STEPS + 1 of them): it is
        closed up to one step early, never late."""
        step = max(DEADLINE_SLACK_S, self.limits.read_timeout_s / ARM_STEPS)
        steps = max(0, int((deadline - self.loop.time()) // step))
        self.arm(conn, steps * step)

    def _wake_by(self, deadline: float) -> None:
        if self._wake is None or deadline + DEADLINE_SLACK_S < self._wake_at:
            if self._wake is not None:
                self._wake.cancel()
            self._wake_at = deadline + DEADLINE_SLACK_S
            self._wake = self.loop.call_at(self._wake_at, self._expire)

    def _expire(self) -> None:
        """Close the connections whose deadline has passed; wake again at the next one."""
        self._wake = None
        now = self.loop.time()
        for queue in list(self.deadline_queues.values()):
            while queue:
                conn, deadline = next(iter(queue.items()))
                if deadline > now:
                    break
                queue.popitem(last=False)
                conn.deadlines = None
                conn.timed_out(conn.timer_why)
        fronts = [next(iter(queue.values())) for queue in self.deadline_queues.values() if queue]
        if fronts:
            self._wake_by(min(fronts))

    def compact(self) -> None:
        """After a burst: copy the connection tables into new ones sized for what is left. A set or
        dict never shrinks as entries leave it, so the tables of a 5,000-connection flood (about
        0.7 MB, in glibc's heap) stayed allocated, and each conn's deadline queue is its own."""
        self.connections = set(self.connections)
        self.waiting = collections.OrderedDict(self.waiting)
        self.stalled = collections.OrderedDict(self.stalled)
        self.tasks = set(self.tasks)
        self.hello_wait = collections.OrderedDict(self.hello_wait)
        for seconds, queue in list(self.deadline_queues.items()):
            if not queue:  # the queues of TLS connections' time left come and go (arm_until)
                del self.deadline_queues[seconds]
                continue
            fresh = self.deadline_queues[seconds] = collections.OrderedDict(queue)
            for conn in fresh:
                conn.deadlines = fresh

    def table_sizes(self) -> dict[str, int]:
        """Entries in each per-connection table (all 0 once every connection has gone)."""
        return {
            "connections": len(self.connections),
            "waiting": len(self.waiting),
            "stalled": len(self.stalled),
            "tasks": len(self.tasks),
            "hello_wait": len(self.hello_wait),
            "handing": len(self.handing),
            "deadlines": sum(len(queue) for queue in self.deadline_queues.values()),
        }

    def unidle(self, conn: _Connection) -> None:
        self.waiting.pop(conn, None)

    def idle(self, conn: _Connection) -> None:
        self.waiting.pop(conn, None)
        self.waiting[conn] = None

    def stall(self, conn: _Connection) -> None:
        if conn not in self.stalled:
            self.stalled[conn] = None

    def unstall(self, conn: _Connection) -> None:
        self.stalled.pop(conn, None)

    def forget(self, conn: _Connection) -> None:
        self.connections.discard(conn)
        self.waiting.pop(conn, None)
        self.stalled.pop(conn, None)

    # --- TLS accept path (loop thread only) -------------------------------------------------------
    # A flood of connections that never send a ClientHello (slowloris bytes, resets, bare connects)
    # cost each a transport, asyncio's TLS protocol and an SSL object (about 0.5 ms of the loop
    # each): the loop fell behind the peers, and a liveness probe waited in the kernel's accept
    # queue for more than 1 s (3 of 11 probes failed). Here a socket gets its transport and TLS
    # state only once its first byte has arrived and is a TLS handshake record; until then it is
    # an fd and an entry in ``hello_wait``, and anything else closes it at the cost of a recv().
    def _accept_tls(self) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                sock, _addr = self.socket.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                if e.errno not in ACCEPT_PAUSE_ERRNOS:  # that connection's own failure
                    self.events.note("accept", "accept failed: %s", _reason(e))
                    continue
                self.events.note("accept", "accept failed: %s; retrying in %g s", _reason(e), ACCEPT_RETRY_S)
                self.loop.remove_reader(self.socket.fileno())
                self.loop.call_later(ACCEPT_RETRY_S, self.loop.add_reader, self.socket.fileno(), self._accept_tls)
                return
            sock.setblocking(False)
            # epoll reports it readable once the whole record header is there, or at EOF or an
            # error (SO_RCVLOWAT, socket(7); tcp_poll honours it): no wake-up per byte of a
            # header sent a byte at a time
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, TLS_RECORD_HEADER)
            self.accepted += 1
            while len(self.hello_wait) >= self.hello_cap:
                oldest = next(iter(self.hello_wait))
                self.events.note(
                    "evict", "%d connections before their TLS handshake: closed the oldest", len(self.hello_wait)
                )
                self._drop_hello(oldest)
            self.hello_wait[sock] = self.loop.time() + self.limits.read_timeout_s
            if self._sweeper is None:  # none while nothing waits: an idle agent wakes for nothing
                self._sweeper = self.loop.call_later(SWEEP_EVERY_S, self._sweep_hello)
            self.loop.add_reader(sock.fileno(), self._hello_ready, sock)

    def _hello_ready(self, sock: socket.socket) -> None:
        """The first bytes of a TLS connection have arrived: if they are the header of a TLS
        handshake record, the connection gets its transport; anything else closes it."""
        try:
            header = sock.recv(TLS_RECORD_HEADER, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            header = b""
            self.events.note("tls", "connection reset before its TLS handshake: %s", _reason(e))
        if not _tls_handshake_header(header):
            if len(header) == TLS_RECORD_HEADER or (header and not _tls_handshake_header(header, partial=True)):
                if isinstance(self.tls(), ssl.SSLContext):
                    self.events.note("tls", "closed a connection: its first bytes are not a TLS handshake")
                else:
                    self.events.note("config", "closed a connection: TLS turned on or off, restart")
            # else EOF or an error before a whole header (with SO_RCVLOWAT, what else wakes us)
            self._drop_hello(sock)
            return
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)  # the transport reads what comes
        self.loop.remove_reader(sock.fileno())
        deadline = self.hello_wait.pop(sock)
        self.spawn(self._connect(sock, deadline))

    async def _connect(self, sock: socket.socket, deadline: float) -> None:
        self.handing.add(sock)  # until a transport has it: stop() closes it if the server stops first
        taken = False
        try:
            await self.loop.connect_accepted_socket(lambda: _Connection(self, deadline), sock)
            taken = True
        except OSError as e:  # the peer went away meanwhile
            self.events.note("tls", "connection lost before its TLS handshake: %s", _reason(e))
        finally:
            self.handing.discard(sock)
            if not taken:  # failed or cancelled (asyncio closes a transport it made, not the socket)
                sock.close()

    def _drop_hello(self, sock: socket.socket) -> None:
        self.hello_wait.pop(sock, None)
        self.loop.remove_reader(sock.fileno())
        sock.close()

    def _sweep_hello(self) -> None:
        """Close the sockets that sent nothing within the read timeout (the oldest are first)."""
        now = self.loop.time()
        while self.hello_wait:
            sock, deadline = next(iter(self.hello_wait.items()))
            if deadline > now:
                break
            self.events.note("timeout", "closed a connection: no TLS handshake in time")
            self._drop_hello(sock)
        self._sweeper = self.loop.call_later(SWEEP_EVERY_S, self._sweep_hello) if self.hello_wait else None

    def _loop_error(self, loop: asyncio.AbstractEventLoop, context: dict) -> None:
        exc = context.get("exception")
        self.events.note("loop", "%s%s", context.get("message", "error"), f": {_reason(exc)}" if exc else "")

    # --- lifecycle --------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="http", daemon=True)
        self._thread.start()
        if not self._started.wait(10):
            raise RuntimeError("HTTP server did not start")

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)

        async def serve() -> None:
            # asyncio accepts up to ``backlog`` connections per wake-up and listen()s with it: a small
            # batch keeps each loop iteration short under a connection flood (a liveness probe is
            # answered between batches), then the kernel's queue is made deep again.
            if self.tls_mode:
                self.loop.add_reader(self.socket.fileno(), self._accept_tls)
            else:
                self._server = await self.loop.create_server(
                    lambda: _Connection(self), sock=self.socket, backlog=ACCEPT_BATCH
                )
                self.socket.listen(LISTEN_BACKLOG)
            self._stopping = asyncio.Event()
            self._started.set()
            while True:
                try:
                    await asyncio.wait_for(self._stopping.wait(), FLUSH_EVERY_S)
                    break
                except TimeoutError:
                    self.events.flush()
                    now = time.monotonic()
                    if self.accepted >= TRIM_AFTER and len(self.connections) < TRIM_AFTER // 4:
                        self.accepted = 0  # a burst is over
                        self.compact()
                        if now - self.released_at >= RELEASE_EVERY_S:
                            self.released_at = now
                            release_memory()
            self.events.flush()
            if self._server is not None:
                self._server.close()
            else:
                self.loop.remove_reader(self.socket.fileno())
            if self._sweeper is not None:
                self._sweeper.cancel()
            while self.hello_wait:
                self._drop_hello(next(iter(self.hello_wait)))
            # Each request's task runs its done() (releases scrape slots) before the loop goes. A
            # cancelled task may have made a connection (and its start_tls task) meanwhile: again
            # until nothing is left.
            for _round in range(STOP_ROUNDS):
                if not (self.tasks or self.connections):
                    break
                for conn in list(self.connections):
                    conn.abort()
                tasks = list(self.tasks)
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                await asyncio.sleep(0)  # let the aborted transports call connection_lost
            for sock in list(self.handing):  # never expected once the tasks are done
                sock.close()
            self.handing.clear()

        self.loop.run_until_complete(serve())

    def stop(self) -> None:
        if self._thread is not None:
            if self._stopping is not None:
                self.loop.call_soon_threadsafe(self._stopping.set)
            self._thread.join(10)
            if self._thread.is_alive():  # never expected: the loop is stuck in a callback
                log.error("http: the server thread did not stop in 10 s")
                return
            self._thread = None
        # Wait for a worker still rendering (bounded: a render never blocks on a peer).
        joiner = threading.Thread(target=self.workers.shutdown, kwargs={"wait": True, "cancel_futures": True})
        joiner.start()
        joiner.join(STOP_JOIN_S)
        if joiner.is_alive():
            log.error("http: a worker thread did not finish in %g s", STOP_JOIN_S)
        self.loop.close()
        self.socket.close()
        if self.tls_mode:
            with _tls_servers_lock:
                if self in _tls_servers:
                    _tls_servers.remove(self)
                if not _tls_servers:
                    asyncio.sslproto.SSLProtocol.max_size = _SSL_MAX_SIZE

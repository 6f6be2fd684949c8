"""TCP sockets of one network namespace via sock_diag netlink (``NETLINK_SOCK_DIAG``,
``SOCK_DIAG_BY_FAMILY`` with ``struct inet_diag_req_v2``; include/uapi/linux/inet_diag.h).

A netlink socket belongs to the network namespace it was created in: ``agent/identity/netns.py`` creates
one per namespace (from a thread that entered it) and any thread can dump through it later. States
are filtered in the kernel (``idiag_states``), so a dump of listeners never walks established
sockets' messages. Replies are parsed with ``struct``: no subprocess, no ``/proc/net/tcp``.

One socket, several users (the ports and listen collectors, the timer and every scraping thread):
a dump is a request followed by many replies on the same socket, so two dumps at once would read
each other's replies, and the kernel answers a second dump request with EBUSY while one is in
progress (netlink_dump_start: ``nlk->cb_running``). ``SockDiag`` gives each dump exclusive use
of its socket (a lock with a bounded wait), stamps each request with its own sequence number and
drops any reply that is not for it (``nlmsg_seq``, and ``nlmsg_pid``: our port id), reads
with a timeout, and after a dump that was cut short (timeout, error, exception in the middle)
drains what is left of it before the next request, so one bad dump never desyncs the next.
"""

from __future__ import annotations

import errno
import itertools
import socket
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLM_F_REQUEST, NLM_F_DUMP = 0x1, 0x300
NLMSG_ERROR, NLMSG_DONE = 2, 3
TCP_LISTEN = 10
_NLMSG = struct.Struct("=IHHII")
_REQ = struct.Struct("=BBBBI")  # family, protocol, ext, pad, states (then a 48-byte inet_diag_sockid)
# inet_diag_msg: family, state, timer, retrans, sockid (sport, dport, src, dst, if, cookie), expires,
# rqueue, wqueue, uid, inode: 72 bytes
_MSG = struct.Struct("=BBBB2s2s16s16sI8sIIIII")
assert _MSG.size == 72
# The part of inet_diag_msg that decides port usage: family, sport, dport (network order), dst.
_PEER = struct.Struct("!B3xHH16x16s")


@dataclass(frozen=True)
class DiagSocket:
    family: int
    state: int
    sport: int
    dport: int
    src: str
    dst: str
    rqueue: int  # LISTEN: connections in the accept queue
    wqueue: int  # LISTEN: the backlog the listener asked for (capped at somaxconn)


def address(family: int, raw: bytes) -> str:
    """An inet_diag_sockid address (16 bytes; IPv4 in the first 4) as text."""
    if family == socket.AF_INET:
        return socket.inet_ntop(socket.AF_INET, raw[:4])
    return socket.inet_ntop(socket.AF_INET6, raw)


def _diag_socket(data: bytes, offset: int) -> DiagSocket:
    fam, state, _t, _r, sport, dport, src, dst, _if, _c, _e, rqueue, wqueue, _u, _i = _MSG.unpack_from(data, offset)
    sport_, dport_ = int.from_bytes(sport, "big"), int.from_bytes(dport, "big")
    return DiagSocket(fam, state, sport_, dport_, address(fam, src), address(fam, dst), rqueue, wqueue)


INET_DIAG_REQ_BYTECODE = 1
INET_DIAG_BC_S_GE, INET_DIAG_BC_S_LE = 2, 3
ALL_STATES = 0xFFF  # TCP_ESTABLISHED (1) .. TCP_NEW_SYN_RECV (12)


def sport_range_bytecode(low: int, high: int) -> bytes:
    """An inet_diag filter program ``low <= sport <= high`` (net/ipv4/inet_diag.c inet_diag_bc_run:
    an op jumps ``yes`` bytes on a match, ``no`` on a miss; ending exactly at the program's end
    accepts, jumping 4 bytes past it rejects). Each comparison is an op followed by an op that
    carries the port in ``no``."""
    length = 16
    prog = struct.pack("=BBH", INET_DIAG_BC_S_GE, 8, length + 4) + struct.pack("=BBH", 0, 0, low)
    prog += struct.pack("=BBH", INET_DIAG_BC_S_LE, 8, length - 8 + 4) + struct.pack("=BBH", 0, 0, high)
    return prog


class SockDiag:
    """A sock_diag netlink socket of one namespace, shared safely by threads (module docstring).

    ``wait_s`` bounds both the wait for the socket (another dump in progress) and each ``recv``;
    a dump that cannot finish within it raises ``TimeoutError`` (an ``OSError``)."""

    def __init__(self, sock: socket.socket, wait_s: float = 5.0) -> None:
        self.sock = sock
        self.wait_s = wait_s
        self._lock = threading.Lock()
        self._seq = itertools.count(1)
        self._dirty = False  # a dump was cut short: replies of it may still be queued
        self.stale_dropped = 0  # replies of earlier, abandoned dumps that were thrown away
        sock.settimeout(wait_s)

    def close(self) -> None:
        self.sock.close()

    def _drain(self) -> None:
        """Throw away whatever is queued (the rest of an abandoned dump)."""
        # Non-blocking for the drain (a socket with a timeout would wait it out instead of EAGAIN).
        # Each recv of a dump's reply makes the kernel queue its next part (netlink_recvmsg calls
        # netlink_dump while the dump runs), so this reads an abandoned dump to its end.
        self.sock.setblocking(False)
        try:
            while True:
                try:
                    data = self.sock.recv(1 << 20)
                except (BlockingIOError, InterruptedError):
                    break
                if not data:
                    break
                self.stale_dropped += 1
        finally:
            self.sock.settimeout(self.wait_s)
        self._dirty = False

    def dump(
        self,
        family: int,
        states: int,
        bytecode: bytes | None = None,
        row: Callable[[bytes, int], Any] = _diag_socket,
    ) -> list[Any]:
        """Every TCP socket of ``family`` whose state bit is in ``states`` (1 << TCP_* values), and
        that passes ``bytecode`` if given (filtered in the kernel), each as ``row(reply, offset of
        its inet_diag_msg)`` makes it (default: a ``DiagSocket``)."""
        if not self._lock.acquire(timeout=self.wait_s):
            raise TimeoutError(errno.ETIMEDOUT, f"sock_diag socket busy for {self.wait_s} s")
        try:
            if self._dirty:
                self._drain()
            for attempt in (1, 2):
                seq = next(self._seq) & 0xFFFFFFFF
                self._dirty = True
                try:
                    out = _dump(self.sock, family, states, seq, bytecode, row)
                except OSError as e:
                    # EBUSY: a dump of the socket's is still running in the kernel (one that was
                    # not ours to drain): read it to its end and ask once more.
                    if e.errno != errno.EBUSY or attempt == 2:
                        raise
                    self._drain()
                    continue
                self._dirty = False
                return out
            raise AssertionError("unreachable")
        finally:
            self._lock.release()

    def ephemeral(
        self, low: int, high: int, families: tuple[int, ...] = (socket.AF_INET, socket.AF_INET6)
    ) -> list[tuple[int, int, int, bytes]]:
        """Sockets in every state but LISTEN whose local port is in [low, high], of ``families``, as
        (family, sport, dport, raw dst address: 16 bytes, an IPv4 one in the first 4). Only these
        fields, unformatted: a node's TIME_WAIT sockets make thousands per dump, and building a
        ``DiagSocket`` with both addresses formatted took 5.6 us each, 24 ms for 4,300 sockets
        (bench/footprint.py profile); ``address()`` formats a destination once."""
        states = ALL_STATES & ~(1 << TCP_LISTEN)
        code = sport_range_bytecode(low, high)
        out: list[tuple[int, int, int, bytes]] = []
        for family in families:
            out += self.dump(family, states, bytecode=code, row=_PEER.unpack_from)
        return out

    def listeners(self) -> list[DiagSocket]:
        """LISTEN sockets, IPv4 and IPv6."""
        return self.dump(socket.AF_INET, 1 << TCP_LISTEN) + self.dump(socket.AF_INET6, 1 << TCP_LISTEN)


def _dump(
    sock: socket.socket,
    family: int,
    states: int,
    seq: int,
    bytecode: bytes | None,
    row: Callable[[bytes, int], Any] = _diag_socket,
) -> list[Any]:
    """One request and its replies; the caller holds the socket. A reply whose sequence number is
    not ``seq`` belongs to an abandoned dump. Replies carry our socket's port id (the kernel fills
    ``nlmsg_pid`` with the requester's: net/netlink/af_netlink.c, ``netlink_dump``), assigned by
    autobind at the first send; anything else is not for us."""
    request = _REQ.pack(family, socket.IPPROTO_TCP, 0, 0, states) + b"\0" * 48
    if bytecode:
        request += struct.pack("=HH", 4 + len(bytecode), INET_DIAG_REQ_BYTECODE) + bytecode
    sock.send(
        _NLMSG.pack(_NLMSG.size + len(request), SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | NLM_F_DUMP, seq, 0) + request
    )
    portid = sock.getsockname()[0]
    out: list[Any] = []
    while True:
        data = sock.recv(1 << 20)
        if not data:
            raise OSError(errno.EPIPE, "sock_diag socket closed")
        offset = 0
        while offset + _NLMSG.size <= len(data):
            length, msg_type, _flags, msg_seq, msg_pid = _NLMSG.unpack_from(data, offset)
            if length < _NLMSG.size:
                raise OSError(errno.EPROTO, "malformed netlink message")
            if msg_seq != seq or msg_pid != portid:
                offset += (length + 3) & ~3
                continue
            if msg_type == NLMSG_DONE:
                return out
            if msg_type == NLMSG_ERROR:
                errno_ = -struct.unpack_from("=i", data, offset + _NLMSG.size)[0]
                raise OSError(errno_, f"sock_diag dump failed (errno {errno_})")
            if msg_type == SOCK_DIAG_BY_FAMILY:
                out.append(row(data, offset + _NLMSG.size))
            offset += (length + 3) & ~3

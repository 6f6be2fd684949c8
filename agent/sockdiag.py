"""TCP sockets of one network namespace via sock_diag netlink (``NETLINK_SOCK_DIAG``,
``SOCK_DIAG_BY_FAMILY`` with ``struct inet_diag_req_v2``; include/uapi/linux/inet_diag.h).

A netlink socket belongs to the network namespace it was created in: ``agent/netns.py`` creates
one per namespace (from a thread that entered it) and any thread can dump through it later. States
are filtered in the kernel (``idiag_states``), so a dump of listeners never walks established
sockets' messages. Replies are parsed with ``struct``: no subprocess, no ``/proc/net/tcp``.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass

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


def _address(family: int, raw: bytes) -> str:
    if family == socket.AF_INET:
        return socket.inet_ntop(socket.AF_INET, raw[:4])
    return socket.inet_ntop(socket.AF_INET6, raw)


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


def dump(
    sock: socket.socket, family: int, states: int, seq: int = 1, bytecode: bytes | None = None
) -> list[DiagSocket]:
    """Every TCP socket of ``family`` whose state bit is in ``states`` (1 << TCP_* values), and
    that passes ``bytecode`` if given (filtered in the kernel)."""
    request = _REQ.pack(family, socket.IPPROTO_TCP, 0, 0, states) + b"\0" * 48
    if bytecode:
        request += struct.pack("=HH", 4 + len(bytecode), INET_DIAG_REQ_BYTECODE) + bytecode
    sock.send(
        _NLMSG.pack(_NLMSG.size + len(request), SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | NLM_F_DUMP, seq, 0) + request
    )
    out: list[DiagSocket] = []
    while True:
        data = sock.recv(1 << 20)
        offset = 0
        while offset + _NLMSG.size <= len(data):
            length, msg_type, _flags, _seq, _pid = _NLMSG.unpack_from(data, offset)
            if length < _NLMSG.size:
                raise OSError("malformed netlink message")
            if msg_type == NLMSG_DONE:
                return out
            if msg_type == NLMSG_ERROR:
                errno_ = -struct.unpack_from("=i", data, offset + _NLMSG.size)[0]
                raise OSError(errno_, f"sock_diag dump failed (errno {errno_})")
            if msg_type == SOCK_DIAG_BY_FAMILY:
                fam, state, _t, _r, sport, dport, src, dst, _if, _c, _e, rqueue, wqueue, _u, _i = _MSG.unpack_from(
                    data, offset + _NLMSG.size
                )
                out.append(
                    DiagSocket(
                        fam,
                        state,
                        int.from_bytes(sport, "big"),
                        int.from_bytes(dport, "big"),
                        _address(fam, src),
                        _address(fam, dst),
                        rqueue,
                        wqueue,
                    )
                )
            offset += (length + 3) & ~3


def ephemeral(
    sock: socket.socket, low: int, high: int, families: tuple[int, ...] = (socket.AF_INET, socket.AF_INET6)
) -> list[DiagSocket]:
    """Sockets in every state but LISTEN whose local port is in [low, high], of ``families``."""
    states = ALL_STATES & ~(1 << TCP_LISTEN)
    code = sport_range_bytecode(low, high)
    out: list[DiagSocket] = []
    for seq, family in enumerate(families, 1):
        out += dump(sock, family, states, seq=seq, bytecode=code)
    return out


def listeners(sock: socket.socket) -> list[DiagSocket]:
    """LISTEN sockets, IPv4 and IPv6."""
    return dump(sock, socket.AF_INET, 1 << TCP_LISTEN) + dump(sock, socket.AF_INET6, 1 << TCP_LISTEN, seq=2)

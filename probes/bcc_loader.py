"""Compile, load and attach a probe's program in a short-lived child process; get back a ``bcc.BPF``
that holds its maps, programs and attachments through file descriptors only.

Why a child: BCC cannot compile on two threads of one process (iovisor/bcc#4500: clang's virtual
header files and BCC's table storage are process-wide), so in the agent's process the probes
compiled one after the other, and the compile is most of a start (0.3-0.6 s a probe here). Each
probe now compiles in a process of its own (probes/bcc_child.py), ``MAX_PARALLEL`` at a time, and
clang and LLVM never run in the agent (it imports BCC's Python layer, and so maps libbcc, for the
table classes only).

How the descriptors come back: the child sends them with ``SCM_RIGHTS`` over a ``SOCK_SEQPACKET``
socket pair (unix(7)), with a JSON description. Every kernel object here is reference-counted by
its fds: a map or program lives while an fd or a mapping refers to it, and an attachment (the perf
event of a tracepoint or kprobe, a raw tracepoint or a link) while its fd is open. The child exits
once it has sent them (``os._exit``: BCC's ``atexit`` clean-up would detach them), and the agent's
copies keep everything in place. ``rebuild`` makes a ``bcc.BPF`` with no module around them: BCC's
table objects read and write through their map fd (bcc/table.py), ``load_func`` answers from
``funcs`` for a program the child loaded, and ``cleanup()`` detaches and closes as it would have.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

CHILD = Path(__file__).with_name("bcc_child.py")
REPLY_BYTES = 1 << 20  # the JSON description (about 20 kB for lockstat's 30 maps)
TIMEOUT_S = 300.0  # a compile and verify take seconds on a loaded node; a child stuck longer is killed


class LoaderError(Exception):
    """The child failed to compile, load or attach (BCC's message), or died or hung."""


class ChildDied(LoaderError):
    """The child exited without answering."""


MAX_PARALLEL = 2
"""Children compiling at once. Each holds clang's and LLVM's heap while it compiles (memory peak of
a warm start, the agent's cgroup here: 135 MiB compiling in the agent, 226-240 MiB with all three
children at once), and the agent's container has a memory limit: two at a time keep the peak near
the in-process one (README, Memory and start-up)."""

_slots = threading.BoundedSemaphore(MAX_PARALLEL)
_lock = threading.Lock()
_spares: list[Child] = []
_live: set[Child] = set()  # started and not yet reaped: abort_all() ends them
_aborted = False
_told: set[str] = set()  # what _once has logged


def _once(key: str, message: str, *args: object) -> None:
    """Log ``message`` at info the first time ``key`` comes, never again in this process."""
    with _lock:
        if key in _told:
            return
        _told.add(key)
    log.info(message, *args)


class Child:
    """One loader process, possibly started ahead of its request (``prespawn``): its interpreter
    start and BCC import (about 0.15 s) then overlap the agent's own work. In a session of its own,
    so that a terminal's Ctrl-C reaches the agent, which ends it (``abort_all``)."""

    def __init__(self) -> None:
        self.kallsyms_not_hidden: str | None = None  # the child's reply: why BCC read all of it
        self.kallsyms_restored = False  # the child's reply: the real file was back for the attach
        self.sock, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        # -P: the script's directory (probes/) is not put first on the child's import path
        flags = ["-P"] if sys.version_info >= (3, 11) else []
        try:
            with child:
                self.proc = subprocess.Popen(
                    [sys.executable, *flags, str(CHILD), str(child.fileno())],
                    stdin=subprocess.PIPE,
                    pass_fds=(child.fileno(),),
                    close_fds=True,
                    start_new_session=True,
                )
        except BaseException:
            self.sock.close()
            raise
        with _lock:
            _live.add(self)

    def load(self, request: dict[str, Any]) -> Any:
        """Send the request, take the answer and end the process, whatever happens. Raises LoaderError."""
        fds: list[int] = []
        try:
            assert self.proc.stdin is not None
            try:
                with self.proc.stdin:  # at most a probe's text (40 kB): the child reads it at once
                    self.proc.stdin.write(json.dumps(request).encode())
            except BrokenPipeError:  # it died first: the socket says so below
                pass
            self.sock.settimeout(TIMEOUT_S)
            try:
                msg, fds, flags, _ = socket.recv_fds(self.sock, REPLY_BYTES, 256)
            except TimeoutError:
                raise LoaderError(f"the BCC loader gave no answer in {TIMEOUT_S:.0f} s") from None
            for fd in fds:  # recv_fds cannot ask for MSG_CMSG_CLOEXEC: no program we run may inherit them
                os.set_inheritable(fd, False)
            if not msg:
                raise ChildDied(f"the BCC loader exited with {self.end()} before answering")
            if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
                raise LoaderError("the BCC loader's answer was cut short")
            reply = json.loads(msg)
            if "error" in reply:
                raise LoaderError(reply["error"])
            bpf = rebuild(reply, fds)
            fds = []  # the BPF object owns them now
            self.kallsyms_not_hidden = reply.get("kallsyms_not_hidden")
            self.kallsyms_restored = bool(reply.get("kallsyms_restored"))
            if self.kallsyms_not_hidden:
                _once(
                    "kallsyms",
                    "BCC's compile could not be shown only the two lines of /proc/kallsyms it needs "
                    "(%s): each compile takes about 0.2 s longer",
                    self.kallsyms_not_hidden,
                )
            return bpf
        finally:
            self.end()
            for fd in fds:
                os.close(fd)

    def end(self, grace_s: float = 10.0) -> int:
        """Reap the process (killed if it has not exited within ``grace_s``); its exit status."""
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            self.proc.stdin.close()  # a spare reads an empty request and exits
        try:
            rc = self.proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
        self.sock.close()
        with _lock:
            _live.discard(self)
        return rc


def prespawn(n: int) -> None:
    """Start up to ``n`` loader processes now (no more than ``MAX_PARALLEL``), for the next
    ``load_in_child`` calls; one that cannot be started is left to be started on demand."""
    for _ in range(min(n, MAX_PARALLEL)):
        child = Child()
        with _lock:
            _spares.append(child)


def discard_spares() -> None:
    """End the prespawned loaders no load used (every probe has been tried)."""
    with _lock:
        spares = list(_spares)
        _spares.clear()
    for child in spares:
        child.end()


def abort_all() -> None:
    """End every loader process at once (the agent is stopping while probes load): their loads
    fail, and no new one starts until ``allow()``."""
    global _aborted
    with _lock:
        _aborted = True
        live = list(_live)
    for child in live:
        if child.proc.poll() is None:
            child.proc.kill()


def allow() -> None:
    """Loads may start again (after ``abort_all``, once the loads it ended are over)."""
    global _aborted
    with _lock:
        _aborted = False


def load_in_child(
    text: str, cflags: list[str], functions: Sequence[tuple[str, int]] = (), kernel_source: str | None = None
) -> Any:
    """A ``bcc.BPF`` for ``text``, compiled, loaded and attached by a child process (its
    auto-attached functions, plus ``functions``: (name, BCC program type) loaded but not attached):
    a prespawned one if one is left alive, at most ``MAX_PARALLEL`` at a time. ``kernel_source``:
    BCC's ``BCC_KERNEL_SOURCE`` in the child (None: BCC's own search). Raises ``LoaderError``."""
    request = {"text": text, "cflags": cflags, "functions": [list(f) for f in functions]}
    request["env"] = {"BCC_KERNEL_SOURCE": kernel_source}
    with _slots:
        with _lock:
            if _aborted:
                raise LoaderError("the agent is stopping")
            child = _spares.pop() if _spares else None
        if child is not None:
            try:
                return child.load(request)
            except ChildDied:  # a spare that died waiting (killed while the headers were merged)
                log.warning("a probe loader started ahead had died; starting another")
        return Child().load(request)


def close(bpf: Any) -> None:
    """Detach and close everything a rebuilt ``bcc.BPF`` holds: BCC's ``cleanup()`` (attachments,
    programs), then the map fds, which BCC leaves to the module this object does not have."""
    try:
        bpf.cleanup()
    finally:
        for t in bpf.tables.values():
            os.close(t.map_fd)


def _bytes(d: dict[str, Any]) -> dict[bytes, Any]:
    return {k.encode("latin-1"): v for k, v in d.items()}


def rebuild(reply: dict[str, Any], fds: list[int]) -> Any:
    """A module-less ``bcc.BPF`` around the received fds: what ``BPF.__init__`` sets, then the
    maps as BCC's table classes, the programs and the attachments."""
    from bcc import BPF, table

    bpf = BPF.__new__(BPF)  # no __init__: nothing to compile, and no atexit clean-up (the probe closes it)
    bpf.uprobe_fds, bpf.perf_buffers, bpf.open_perf_events = {}, {}, {}
    bpf._ringbuf_manager, bpf.tracefile, bpf.debug, bpf.module = None, None, 0, None
    bpf.kprobe_fds = {}
    for ev_name, fns in _bytes(reply["kprobe_fds"]).items():
        for fn_name, i in _bytes(fns).items():
            bpf._add_kprobe_fd(ev_name, fn_name, fds[i])  # also BCC's count of open probes
    for attr in ("tracepoint_fds", "raw_tracepoint_fds", "kfunc_entry_fds", "kfunc_exit_fds", "lsm_fds"):
        setattr(bpf, attr, {name: fds[i] for name, i in _bytes(reply[attr]).items()})
    bpf.funcs = {name: BPF.Function(bpf, name, fds[i]) for name, i in _bytes(reply["funcs"]).items()}
    bpf.tables = {}
    for desc in reply["tables"]:
        bpf.tables[desc["name"].encode("latin-1")] = _table(bpf, desc, fds[desc["fd"]], table)
    return bpf


def _table(bpf: Any, desc: dict[str, Any], fd: int, table: Any) -> Any:
    """BCC's table object for one map, as ``bcc.table.Table`` would make it. Its constructor asks
    the (absent) module for type, flags and size, which libbcc answers with -1, -1, 0 for a null
    module: the child's values are set afterwards."""
    from bcc import BPF

    kinds = {
        table.BPF_MAP_TYPE_HASH: table.HashTable,
        table.BPF_MAP_TYPE_ARRAY: table.Array,
        table.BPF_MAP_TYPE_PERCPU_HASH: table.PerCpuHash,
        table.BPF_MAP_TYPE_PERCPU_ARRAY: table.PerCpuArray,
        table.BPF_MAP_TYPE_LRU_HASH: table.LruHash,
        table.BPF_MAP_TYPE_LRU_PERCPU_HASH: table.LruPerCpuHash,
        table.BPF_MAP_TYPE_STACK_TRACE: table.StackTrace,
    }
    leaf = BPF._decode_table_type(json.loads(desc["leaf"]))
    if desc["type"] in (table.BPF_MAP_TYPE_QUEUE, table.BPF_MAP_TYPE_STACK):
        t = table.QueueStack(bpf, desc["id"], fd, leaf)
    elif desc["type"] in kinds:
        key = BPF._decode_table_type(json.loads(desc["key"]))
        t = kinds[desc["type"]](bpf, desc["id"], fd, key, leaf)
    else:  # the fd is closed by load_in_child with the others
        raise LoaderError(f"map {desc['name']}: type {desc['type']} cannot be rebuilt")
    t.ttype, t.flags, t.max_entries = desc["type"], desc["flags"], desc["max_entries"]
    if hasattr(t, "_name"):
        t._name = desc["name"].encode("latin-1")
    return t

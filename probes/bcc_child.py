"""The child side of probes/bcc_loader.py: compile, load and attach one BPF program with BCC, hand
every file descriptor to the agent over a Unix socket (``SCM_RIGHTS``), and exit.

Run as a script (``python -P bcc_child.py FD``), never imported by the agent: it imports the
standard library and BCC only, so it starts in about 0.15 s, and clang and LLVM run here, never in
the agent. Its ``oom_score_adj`` is 1000: out of memory while compiling, it goes first. It
reads one JSON request on stdin (``text``, ``cflags``, ``env``: BCC's variables as the agent has
them, ``functions``: extra ``[name, program type]`` to load besides BCC's auto-attached ones; an
empty stdin: not needed, exit), builds ``bcc.BPF`` (compile, maps, then
``_trace_autoload``: the verifier and the attach), and answers with one ``SOCK_SEQPACKET``
message: a JSON description of every map (name, BCC's id, type, flags, size, key and leaf type
descriptions), program and attachment, each fd given as an index into the message's fds; or
``{"error": ...}`` with BCC's own message. Then it leaves with ``os._exit`` so that neither BCC's
``atexit`` clean-up nor anything else detaches what the agent now holds: an attachment lives as
long as any process holds its fd (perf event, raw tracepoint or link fd), and the agent has them.

BCC's front end reads all of ``/proc/kallsyms`` into a symbol table on every compile, only to ask
whether ``bpf_probe_read_kernel`` and ``bpf_probe_read_user`` exist (bcc
src/cc/frontends/clang/b_frontend_action.cc, ``check_bpf_probe_read_kernel``): 0.2 s of the
0.35 s an almost empty program takes to compile here (122,000 symbols; more on a node with many
modules). So the child copies those two symbols' lines from the real file before its request comes (the
slow part), and once it has come (so that it sees the mounts the agent has made meanwhile) enters a
mount namespace of its own, private (nothing it mounts reaches the host), and puts a file of those
lines over ``/proc/kallsyms`` (``hide_kallsyms``): BCC's answer is the same. The file is written
on a tmpfs mounted over ``/dev/shm`` in that namespace, detached again once the file is bound.
The real file is back before BCC's auto-attach and anything after it, or the load fails. Where any
step fails (no ``CAP_SYS_ADMIN``, an LSM that denies mounts, no ``/dev/shm``), BCC reads the real
file as before, and the reply says why (``kallsyms_not_hidden``).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import socket
import sys
from collections.abc import Callable
from typing import Any

MAX_FDS = 253  # SCM_MAX_FD (include/net/scm.h): fds one message can carry
KALLSYMS = "/proc/kallsyms"
PROBE_READ_SYMBOLS = (b"bpf_probe_read_kernel", b"bpf_probe_read_user")  # all BCC's compile asks for
SCRATCH = "/dev/shm"  # a tmpfs of the child's own is mounted over it, in the child's namespace only

# include/uapi/linux/sched.h, include/uapi/linux/mount.h
CLONE_NEWNS = 0x00020000
MS_BIND, MS_REC, MS_PRIVATE = 4096, 16384, 1 << 18
MNT_DETACH = 2


def _names(d: dict[bytes, Any]) -> dict[str, Any]:
    return {k.decode("latin-1"): v for k, v in d.items()}


def describe(bpf: Any, fds: list[int]) -> dict[str, Any]:
    """Everything the agent needs to rebuild ``bpf`` without its module; fds appended to ``fds``."""
    from bcc import lib

    # BCC's Python layer declares no types for these two (libbcc's bcc_common.h)
    lib.bpf_num_tables.restype, lib.bpf_num_tables.argtypes = ctypes.c_size_t, [ctypes.c_void_p]
    lib.bpf_table_name.restype = ctypes.c_char_p
    lib.bpf_table_name.argtypes = [ctypes.c_void_p, ctypes.c_size_t]

    def ref(fd: int) -> int:
        fds.append(fd)
        return len(fds) - 1

    tables = []
    for i in range(lib.bpf_num_tables(bpf.module)):
        name = lib.bpf_table_name(bpf.module, i)
        map_id = lib.bpf_table_id(bpf.module, name)
        tables.append(
            {
                "name": name.decode("latin-1"),
                "id": map_id,
                "fd": ref(lib.bpf_table_fd(bpf.module, name)),
                "type": lib.bpf_table_type_id(bpf.module, map_id),
                "flags": lib.bpf_table_flags_id(bpf.module, map_id),
                "max_entries": int(lib.bpf_table_max_entries_id(bpf.module, map_id)),
                "key": lib.bpf_table_key_desc(bpf.module, name).decode(),
                "leaf": lib.bpf_table_leaf_desc(bpf.module, name).decode(),
            }
        )
    if bpf.uprobe_fds or bpf.open_perf_events or bpf.perf_buffers:
        raise RuntimeError("uprobes, perf events and perf buffers cannot be handed over")
    return {
        "tables": tables,
        "funcs": {name: ref(fn.fd) for name, fn in _names(bpf.funcs).items()},
        "kprobe_fds": {ev: {fn: ref(fd) for fn, fd in _names(f).items()} for ev, f in _names(bpf.kprobe_fds).items()},
        **{
            attr: {name: ref(fd) for name, fd in _names(getattr(bpf, attr)).items()}
            for attr in ("tracepoint_fds", "raw_tracepoint_fds", "kfunc_entry_fds", "kfunc_exit_fds", "lsm_fds")
        },
    }


def kallsyms_lines(data: bytes, names: tuple[bytes, ...] = PROBE_READ_SYMBOLS) -> bytes:
    """The lines of a ``/proc/kallsyms`` text (``address type name[\tmodule]``) whose name is one
    of ``names``, verbatim and in order of ``names``: nothing else is looked at. (The agent's
    probes/kallsyms.find_addresses searches the same way for addresses of core symbols; this
    script imports the standard library only, and BCC must see every such line as it is.)"""
    out = []
    for name in names:
        needle = b" " + name
        at = data.find(needle)
        while at >= 0:
            end = at + len(needle)
            if end == len(data) or data[end] in b"\n\t":
                start = data.rfind(b"\n", 0, at) + 1
                stop = data.find(b"\n", end)
                line = data[start : stop if stop >= 0 else len(data)]
                fields = line.split(b"\t", 1)[0].split(b" ")
                if len(fields) == 3 and fields[2] == name:
                    out.append(line + b"\n")
            at = data.find(needle, end)
    return b"".join(out)


RESTORED: list[bool] = []  # appended to when restore() has put the real file back: said in the reply


def read_kallsyms_lines(source: str = KALLSYMS) -> bytes | None:
    """The lines of ``source`` BCC's compile asks for (``kallsyms_lines``), or None if unreadable.
    The slow part of hiding (reading the file: 0.05 s here), done before the request comes."""
    try:
        with open(source, "rb") as f:
            return kallsyms_lines(f.read())
    except OSError:
        return None


def hide_kallsyms(lines: bytes) -> tuple[Callable[[], None] | None, str | None]:
    """Enter a mount namespace of this process's own, private, and mount a file of ``lines`` over
    ``/proc/kallsyms`` (see the module's docstring). Done once the request has come, so that the
    namespace copies the mounts the agent has made meanwhile (debugfs for a tracepoint strategy).
    Returns what puts the real file back, and None; or None (nothing hidden) and why not."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
    libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]

    def failed(what: str) -> tuple[None, str]:
        return None, f"{what}: {os.strerror(ctypes.get_errno())}"

    try:
        if not os.path.isdir(SCRATCH):
            return None, f"no {SCRATCH}"
        real = os.stat(KALLSYMS)  # what is there now (procfs's, or a runtime's mask): put back after
        if libc.unshare(CLONE_NEWNS) != 0:
            return failed("unshare(CLONE_NEWNS)")
        # The new namespace's mounts are copies that still share propagation with the host's:
        # made private first, or the mounts below would appear on the host (mount_namespaces(7)).
        if libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None) != 0:
            return failed("making the mounts private")
        if libc.mount(b"nodetune", SCRATCH.encode(), b"tmpfs", 0, b"size=64k,mode=0700") != 0:
            return failed(f"a tmpfs on {SCRATCH}")
        bound = False
        try:
            path = os.path.join(SCRATCH, "kallsyms")
            with open(path, "wb") as f:
                f.write(lines)
            if libc.mount(path.encode(), KALLSYMS.encode(), None, MS_BIND, None) != 0:
                return failed(f"a bind mount on {KALLSYMS}")
            bound = True
        finally:  # the bound file outlives its tmpfs, and the real /dev/shm is back for BCC
            if libc.umount2(SCRATCH.encode(), MNT_DETACH) != 0 and bound:
                why = failed(f"detaching the tmpfs on {SCRATCH}")
                libc.umount2(KALLSYMS.encode(), MNT_DETACH)
                return why  # noqa: B012 - the real file is back: compile with it
    except Exception as e:  # whatever it is, BCC still compiles, with the real file
        return None, f"{type(e).__name__}: {e}"

    def restore() -> None:
        """The file that was there again, or OSError: BCC's attach must not see two lines."""
        if libc.umount2(KALLSYMS.encode(), MNT_DETACH) != 0:
            raise OSError(ctypes.get_errno(), f"{KALLSYMS} could not be put back")
        now = os.stat(KALLSYMS)
        if (now.st_dev, now.st_ino) != (real.st_dev, real.st_ino):
            raise OSError(f"{KALLSYMS} is not the file it was after it was put back")
        RESTORED.append(True)

    return restore, None


def main() -> int:
    sock = socket.socket(fileno=int(sys.argv[1]))
    try:  # if memory runs out while compiling, the kernel ends this process, not the agent
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write("1000")
    except OSError:
        pass
    try:
        from bcc import BPF  # before the request: a prespawned child is ready when it comes

        lines = read_kallsyms_lines()
        raw = sys.stdin.buffer.read()
        if not raw:  # a spare nobody needed
            os._exit(0)
        request = json.loads(raw)
        for name, value in request["env"].items():  # what the agent has now, not at our start
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value

        restore, not_hidden = hide_kallsyms(lines) if lines is not None else (None, f"{KALLSYMS} unreadable")

        class Loader(BPF):  # type: ignore[misc]
            def _trace_autoload(self) -> None:
                """Compiled: the real /proc/kallsyms for the attach and everything after."""
                if restore is not None:
                    restore()
                super()._trace_autoload()

        bpf = Loader(text=request["text"].encode(), cflags=request["cflags"])
        for name, prog_type in request["functions"]:
            bpf.load_func(name.encode(), prog_type)
        fds: list[int] = []
        reply = describe(bpf, fds)
        reply["kallsyms_not_hidden"] = not_hidden
        reply["kallsyms_restored"] = bool(RESTORED)
        if len(fds) > MAX_FDS:
            raise RuntimeError(f"{len(fds)} descriptors: more than one message carries ({MAX_FDS})")
    except Exception as e:  # BCC raises bare Exception: its message is the reason the agent records
        reply, fds = {"error": f"{type(e).__name__}: {e}".strip()}, []
    try:
        socket.send_fds(sock, [json.dumps(reply).encode()], fds)
    except OSError as e:  # EMSGSIZE: more than the socket's buffer (about 208 kB); EPIPE: agent gone
        with contextlib.suppress(OSError):
            socket.send_fds(sock, [json.dumps({"error": f"the answer could not be sent: {e}"}).encode()], [])
    sys.stderr.flush()
    os._exit(0)  # no atexit: BCC's clean-up would detach what the agent now holds


if __name__ == "__main__":
    sys.exit(main())

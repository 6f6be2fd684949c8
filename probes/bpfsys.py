"""The few bpf(2) commands BCC 0.26's Python layer does not offer in the form we need.

* ``lookup_batch``: ``BPF_MAP_LOOKUP_BATCH`` on an array map (kernel >= 5.6), one syscall for a
  whole range of rows, per-CPU values included (each value is ``round_up(value_size, 8)`` bytes
  per *possible* CPU: kernel/bpf/syscall.c ``bpf_map_value_size``). BCC's ``items_lookup_batch``
  only handles hash maps and yields ctypes objects one by one.
* ``link_create``: ``BPF_LINK_CREATE`` (kernel >= 5.7) attaches a cgroup program as a link: it
  is detached when the last fd is closed (an agent that dies leaves nothing behind), and a cgroup
  link always coexists with other programs on the same hook (kernel/bpf/cgroup.c
  cgroup_bpf_link_attach passes BPF_F_ALLOW_MULTI), so Cilium's or Calico's stay in place.
* ``prog_test_run``: ``BPF_PROG_TEST_RUN`` of a raw-tracepoint program with given arguments
  (kernel >= 5.10, net/bpf/test_run.c ``bpf_prog_test_run_raw_tp``), so tests run the real C.
* ``tracing_refused``: ``BPF_PROG_LOAD`` of a two-instruction fentry/fexit program on a kernel
  function (kernel >= 5.5): whether the kernel takes tracing programs there at all, known in
  microseconds instead of after a compile (kernels built without what fentry needs, or locked
  down, refuse every such program with EPERM whatever its body).
* ``enable_run_time_stats``: ``BPF_ENABLE_STATS`` (kernel >= 5.8): the kernel times every BPF
  program run for as long as the returned fd is open; the last close turns it off again. Unlike
  the ``kernel.bpf_stats_enabled`` sysctl it cannot be left on by a process that dies.
* ``prog_stats``: a program's run time, run count and recursion misses, from its
  ``/proc/<pid>/fdinfo`` entry (kernel/bpf/syscall.c ``bpf_prog_show_fdinfo``).

Plain ``syscall(__NR_bpf, ...)`` through libc: no subprocess, no extra library.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import platform
import struct
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np

from host import libc

_NR_BPF = {"x86_64": 321, "aarch64": 280, "ppc64le": 361, "s390x": 351, "riscv64": 280}
BPF_MAP_LOOKUP_BATCH = 24
BPF_PROG_TEST_RUN = 10
BPF_LINK_CREATE = 28
BPF_PROG_QUERY = 16
BPF_CGROUP_SOCK_OPS = 3  # enum bpf_attach_type
BPF_ENABLE_STATS = 32
BPF_PROG_LOAD = 5
BPF_PROG_TYPE_TRACING = 26
BPF_TRACE_FENTRY, BPF_TRACE_FEXIT = 24, 25  # enum bpf_attach_type
BPF_STATS_RUN_TIME = 0  # enum bpf_stats_type


class BPFSyscallError(OSError):
    """A bpf(2) command failed; errno and the command are in the message."""


def _bpf(cmd: int, attr: ctypes.Array) -> int:
    nr = _NR_BPF.get(platform.machine())
    if nr is None:
        raise BPFSyscallError(errno.ENOSYS, f"bpf(2) number unknown for {platform.machine()}")
    try:
        return libc.syscall(nr, ctypes.c_int(cmd), attr, ctypes.c_uint(len(attr)))
    except OSError as e:
        raise BPFSyscallError(e.errno, f"bpf cmd {cmd}: {e.strerror}") from None


@cache
def possible_cpus(sys_root: str = "/sys") -> int:
    """Number of possible CPUs (the per-CPU value count), from ``devices/system/cpu/possible``: the
    CPUs in the list, not the highest number + 1. A per-CPU map's value holds one slot per possible
    CPU, packed (kernel/bpf/arraymap.c bpf_percpu_array_copy: for_each_possible_cpu, and
    num_possible_cpus() in bpf_map_value_size), so a list with gaps ("0-3,8-11") has 8, not 12."""
    text = (Path(sys_root) / "devices/system/cpu/possible").read_text().strip()
    count = 0
    for part in text.split(","):
        first, _, last = part.partition("-")
        count += int(last or first) - int(first) + 1
    return count


def lookup_batch(map_fd: int, start: int, count: int, value_size: int, percpu: bool) -> np.ndarray:
    """Values of array entries ``start .. start+count-1``: a u64 array shaped
    (entries, CPUs, words) (CPUs = 1 for maps that are not per-CPU; words =
    ``round_up(value_size, 8) / 8``), a view of the buffer the kernel filled (no copy). The range
    must lie within the map: anything else raises ERANGE."""
    if start < 0 or count < 0 or start + count > 2**32:
        raise BPFSyscallError(errno.ERANGE, f"batch read of {count} entries from index {start}")
    words = (value_size + 7) // 8
    cpus = possible_cpus() if percpu else 1
    values = (ctypes.c_uint64 * (words * cpus * max(count, 1)))()
    keys = (ctypes.c_uint32 * max(count, 1))()
    # in_batch is the key *before* the first one read (kernel/bpf/syscall.c generic_map_lookup_batch:
    # it is prev_key of map_get_next_key), and no in_batch at all starts at the map's first key.
    in_batch = ctypes.c_uint32(start - 1 if start else 0)
    out_batch = ctypes.c_uint32(0)
    # union bpf_attr.batch: in_batch, out_batch, keys, values (u64 pointers), count, map_fd (u32), elem_flags, flags
    attr = ctypes.create_string_buffer(
        struct.pack(
            "<QQQQIIQQ",
            ctypes.addressof(in_batch) if start else 0,
            ctypes.addressof(out_batch),
            ctypes.addressof(keys),
            ctypes.addressof(values),
            count,
            map_fd,
            0,
            0,
        )
    )
    if count:
        try:
            _bpf(BPF_MAP_LOOKUP_BATCH, attr)
        except BPFSyscallError as e:
            if e.errno != errno.ENOENT:  # ENOENT: the range ended at the map's end (count updated)
                raise
        got = struct.unpack_from("<I", attr.raw, 32)[0]
        # An array's get_next_key answers 0 for any prev_key at or past the end but the last
        # (kernel/bpf/arraymap.c array_map_get_next_key), so a start two or more past the end reads
        # from 0 again: the keys the kernel filled in say which entries came back.
        if got != count or keys[0] != start or keys[count - 1] != start + count - 1:
            raise BPFSyscallError(errno.ERANGE, f"batch read {got} of {count} entries from index {start}")
    return np.frombuffer(values, dtype=np.uint64, count=words * cpus * count).reshape(count, cpus, words)


def prog_test_run_raw_tp(prog_fd: int, args: tuple[int, ...]) -> int:
    """Run a raw-tracepoint program once with ``args`` as its u64 arguments; its return value."""
    ctx = (ctypes.c_uint64 * len(args))(*args)
    # union bpf_attr.test: prog_fd, retval, data_size_in, data_size_out, data_in, data_out, repeat,
    # duration, ctx_size_in, ctx_size_out, ctx_in, ctx_out, flags, cpu, batch_size
    attr = ctypes.create_string_buffer(
        struct.pack(
            "<IIIIQQIIIIQQIII4x", prog_fd, 0, 0, 0, 0, 0, 0, 0, ctypes.sizeof(ctx), 0, ctypes.addressof(ctx), 0, 0, 0, 0
        )
    )
    _bpf(BPF_PROG_TEST_RUN, attr)
    return struct.unpack_from("<I", attr.raw, 4)[0]


def link_create(prog_fd: int, target_fd: int, attach_type: int) -> int:
    """Attach ``prog_fd`` to ``target_fd`` (a cgroup directory fd) as a BPF link; its fd."""
    # union bpf_attr.link_create: prog_fd, target_fd, attach_type, flags (then per-type fields)
    attr = ctypes.create_string_buffer(struct.pack("<IIII", prog_fd, target_fd, attach_type, 0) + bytes(48))
    return _bpf(BPF_LINK_CREATE, attr)


def link_cgroup(prog_fd: int, cgroup_dir: str, attach_type: int) -> int:
    """``link_create`` on the cgroup directory ``cgroup_dir`` (opened for the call only); the link's
    fd, whose last close detaches the program."""
    cgroup_fd = os.open(cgroup_dir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        return link_create(prog_fd, cgroup_fd, attach_type)
    finally:
        os.close(cgroup_fd)


def tracing_refused(attach_btf_id: int, attach_type: int) -> str | None:
    """Why the kernel refuses a minimal tracing program (``r0 = 0; exit``, GPL) of ``attach_type``
    (BPF_TRACE_FENTRY/FEXIT) on the vmlinux BTF function ``attach_btf_id``; None if it loads (the
    program is closed at once, never attached)."""
    insns = ctypes.create_string_buffer(struct.pack("<BBhiBBhi", 0xB7, 0, 0, 0, 0x95, 0, 0, 0))  # mov r0, 0; exit
    license = ctypes.create_string_buffer(b"GPL")
    # union bpf_attr.prog_load: prog_type, insn_cnt, insns, license, log_level, log_size, log_buf,
    # kern_version, prog_flags, prog_name[16], prog_ifindex, expected_attach_type, prog_btf_fd,
    # func_info_rec_size, func_info, func_info_cnt, line_info_rec_size, line_info, line_info_cnt,
    # attach_btf_id (offset 108)
    fields = struct.pack(
        "<IIQQIIQII16sIIIIQIIQII",
        BPF_PROG_TYPE_TRACING,
        2,
        ctypes.addressof(insns),
        ctypes.addressof(license),
        *(0, 0, 0, 0, 0),
        b"nodetune_trial",
        0,
        attach_type,
        *(0, 0, 0, 0, 0, 0, 0),
        attach_btf_id,
    )
    try:
        os.close(_bpf(BPF_PROG_LOAD, ctypes.create_string_buffer(fields + bytes(144 - len(fields)))))
    except BPFSyscallError as e:
        return f"BPF_PROG_LOAD of a minimal tracing program: {os.strerror(e.errno)}"
    return None


def enable_run_time_stats() -> int:
    """``BPF_ENABLE_STATS``: every BPF program's run time and count are kept while the returned
    fd is open (a static key the kernel counts per holder). It costs two clock reads per program
    run, on every BPF program of the node."""
    # union bpf_attr.enable_stats: type
    return _bpf(BPF_ENABLE_STATS, ctypes.create_string_buffer(struct.pack("<I", BPF_STATS_RUN_TIME) + bytes(4)))


@dataclass(frozen=True)
class ProgStats:
    """What the kernel counts for one program. ``run_time_ns`` and ``run_cnt`` move only while
    run-time stats are on (the sysctl or a held ``enable_run_time_stats`` fd);
    ``recursion_misses`` (kernel >= 5.12) always: runs skipped because the program was already
    running on that CPU."""

    run_time_ns: int
    run_cnt: int
    recursion_misses: int


def prog_stats(fd: int, proc: str = "/proc/self") -> ProgStats | None:
    """What the kernel counts for the program behind ``fd`` of ``proc``; None if ``fd`` is no BPF
    program (closed meanwhile). Fields a kernel does not show read 0."""
    try:
        text = Path(f"{proc}/fdinfo/{fd}").read_text()
    except OSError:
        return None
    info = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    if "prog_id" not in info:
        return None
    return ProgStats(
        int(info.get("run_time_ns", "0")), int(info.get("run_cnt", "0")), int(info.get("recursion_misses", "0"))
    )

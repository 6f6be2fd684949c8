"""What the kernel says is attached where, for tests: program ids on a cgroup hook (BPF_PROG_QUERY)
and the program behind a program or link fd (fdinfo). The agent itself never asks."""

from __future__ import annotations

import ctypes
import errno
import struct
from pathlib import Path

from probes import bpfsys


def attached_ids(target_fd: int, attach_type: int) -> list[int]:
    """Ids of the programs attached to a cgroup hook (``BPF_PROG_QUERY``, effective or not): a
    program is told apart from other users of the hook by its id, never by a count."""
    # union bpf_attr.query: target_fd, attach_type, query_flags, attach_flags, prog_ids (u64), prog_cnt
    room = 16
    while True:
        ids = (ctypes.c_uint32 * room)()
        attr = ctypes.create_string_buffer(
            struct.pack("<IIIIQI", target_fd, attach_type, 0, 0, ctypes.addressof(ids), room) + bytes(36)
        )
        try:
            bpfsys._bpf(bpfsys.BPF_PROG_QUERY, attr)
        except bpfsys.BPFSyscallError as e:
            if e.errno != errno.ENOSPC:  # more programs than room: prog_cnt says how many
                raise
            room = max(2 * room, struct.unpack_from("<I", attr.raw, 24)[0])
            continue
        return list(ids[: struct.unpack_from("<I", attr.raw, 24)[0]])


def prog_id(fd: int, pid: int | str = "self") -> int:
    """The id of the program behind a program or link fd (its ``prog_id`` in fdinfo)."""
    for line in Path(f"/proc/{pid}/fdinfo/{fd}").read_text().splitlines():
        if line.startswith("prog_id:"):
            return int(line.split()[1])
    raise ValueError(f"fd {fd} of {pid} is no BPF program or link")

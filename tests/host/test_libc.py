"""host.libc: each wrapper returns the call's result, or raises OSError with the kernel's errno."""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import platform
import struct
from pathlib import Path

import pytest

from host import libc


def test_inotify_watch_reports_a_created_directory_and_errors_carry_errno(tmp_path: Path) -> None:
    fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        wd = libc.inotify_add_watch(fd, str(tmp_path), 0x100)  # IN_CREATE
        (tmp_path / "child").mkdir()
        wd_seen, mask, _cookie, _length = struct.unpack_from("iIII", os.read(fd, 4096))
        assert (wd_seen, mask & 0x100) == (wd, 0x100)
        libc.inotify_rm_watch(fd, wd)
        with pytest.raises(OSError) as e:
            libc.inotify_rm_watch(fd, wd)  # already removed
        assert e.value.errno == errno.EINVAL
        with pytest.raises(OSError) as e:
            libc.inotify_add_watch(fd, str(tmp_path / "absent"), 0x100)
        assert e.value.errno == errno.ENOENT and "absent" in str(e.value)
    finally:
        os.close(fd)


def test_setns_on_a_file_that_is_no_namespace_is_einval(tmp_path: Path) -> None:
    path = tmp_path / "plain"
    path.write_text("")
    fd = os.open(path, os.O_RDONLY)
    try:
        with pytest.raises(OSError) as e:
            libc.setns(fd, 0x40000000)  # CLONE_NEWNET
        assert e.value.errno == errno.EINVAL
    finally:
        os.close(fd)


# (getpid, kill) numbers: arch/x86/entry/syscalls/syscall_64.tbl, include/uapi/asm-generic/unistd.h
SYSCALLS = {"x86_64": (39, 62), "aarch64": (172, 129), "riscv64": (172, 129)}


@pytest.mark.skipif(platform.machine() not in SYSCALLS, reason="syscall numbers of this architecture not listed")
def test_syscall_returns_its_result_and_raises_on_failure() -> None:
    getpid, kill = SYSCALLS[platform.machine()]
    assert libc.syscall(getpid) == os.getpid()
    with pytest.raises(OSError) as e:
        libc.syscall(kill, 0x7FFFFFFF, 0)  # a pid above any pid_max
    assert e.value.errno == errno.ESRCH


def test_madvise_takes_a_pointer_sized_length_and_rejects_an_unaligned_start() -> None:
    """On a private anonymous mapping of 4 GiB + 8 KiB (address space only: one page is touched), a
    length of 4 GiB + 4 KiB zeroes the page at 4 GiB; cut to a C int it would cover 4 KiB only."""
    size = (1 << 32) + 8192
    m = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_NORESERVE", 0))
    view = ctypes.c_char.from_buffer(m)
    try:
        start = ctypes.addressof(view)
        m[1 << 32] = ord("x")
        libc.madvise(start, (1 << 32) + 4096, mmap.MADV_DONTNEED)
        assert m[1 << 32] == 0  # private anonymous pages read back as zero after MADV_DONTNEED
        with pytest.raises(OSError) as e:
            libc.madvise(start + 1, 4096, mmap.MADV_DONTNEED)
        assert e.value.errno == errno.EINVAL
    finally:
        del view  # the mapping cannot close while exported
        m.close()


def test_malloc_trim_reports_that_glibc_has_it() -> None:
    assert libc.malloc_trim() is True  # glibc here

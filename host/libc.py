"""The C library calls Python's ``os`` module does not offer, through one ``ctypes`` handle.

Every caller in the agent and the probes goes through these wrappers: each sets its argument and
result types (a ``long``-returning ``syscall(2)`` or a pointer-sized ``madvise(2)`` length would be
truncated to a C ``int`` otherwise) and turns ``-1`` + ``errno`` into ``OSError``. Used by the cgroup
tree (inotify(7)), network namespaces (setns(2)), cgroup ids (open_by_handle_at(2)), tracefs
(mount(2)/umount2(2)), bpf(2) (syscall(2)) and memory release (madvise(2), mallopt(3),
malloc_trim(3)).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)

_libc.syscall.restype = ctypes.c_long
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_libc.madvise.restype = ctypes.c_int
_libc.open_by_handle_at.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
_libc.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_void_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]


def _checked(ret: int, what: str) -> int:
    """``ret``, or OSError(errno, strerror, what): callers add their own context to the message."""
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), what)
    return ret


def inotify_init1(flags: int) -> int:
    """A new inotify instance's fd (inotify_init1(2))."""
    return _checked(_libc.inotify_init1(flags), "inotify_init1")


def inotify_add_watch(fd: int, path: str, mask: int) -> int:
    """The watch descriptor of ``path`` (inotify_add_watch(2))."""
    return _checked(_libc.inotify_add_watch(fd, os.fsencode(path), mask), f"inotify_add_watch {path}")


def inotify_rm_watch(fd: int, wd: int) -> None:
    _checked(_libc.inotify_rm_watch(fd, wd), "inotify_rm_watch")


def setns(fd: int, nstype: int) -> None:
    """Move the calling thread into the namespace ``fd`` refers to (setns(2))."""
    _checked(_libc.setns(fd, nstype), "setns")


def open_by_handle_at(mount_fd: int, handle: bytes, flags: int) -> int:
    """An fd for the file a ``struct file_handle`` names (open_by_handle_at(2))."""
    return _checked(_libc.open_by_handle_at(mount_fd, handle, flags), "open_by_handle_at")


def mount(source: str, target: str, fstype: str, flags: int = 0) -> None:
    _checked(_libc.mount(source.encode(), os.fsencode(target), fstype.encode(), flags, None), f"mount {target}")


def umount2(target: str, flags: int = 0) -> None:
    _checked(_libc.umount2(os.fsencode(target), flags), f"umount {target}")


def syscall(number: int, *args: object) -> int:
    """A raw system call by number (syscall(2)), for calls libc has no wrapper for (bpf(2))."""
    return _checked(_libc.syscall(ctypes.c_long(number), *args), f"syscall {number}")


def madvise(start: int, length: int, advice: int) -> None:
    _checked(_libc.madvise(start, length, advice), f"madvise {start:#x}+{length:#x}")


def mallopt(param: int, value: int) -> bool:
    """glibc's mallopt(3); False when it refused, or when libc has none (musl)."""
    fn = getattr(_libc, "mallopt", None)
    return bool(fn is not None and fn(param, value))


def malloc_trim() -> bool:
    """``malloc_trim(0)``: give glibc's free heap pages back to the kernel. False when libc has none
    (musl)."""
    fn = getattr(_libc, "malloc_trim", None)
    if fn is None:
        return False
    fn(ctypes.c_size_t(0))
    return True

"""Workloads that make the kernel contend on known locks, for the lock and connect probe tests.

``pipe_writers``: several processes write small chunks into one pipe that one process drains.
pipe_write() and pipe_read() take the pipe's ``pipe->mutex`` (fs/pipe.c) for every call, and
wake each other through the pipe's wait queues (``wq_head->lock``, a spinlock, taken in
__wake_up_common_lock and prepare_to_wait_event): with more writers than CPUs this gives mutex
contentions (optimistic spin, and sleeps when the owner is preempted) and spinlock contentions
in the wakeup paths, every second, on any kernel. Run as ``python -m tests.contention SECONDS N``.

``stalled_pipe``: N tasks asleep at once on one pipe's mutex, for as long as the caller wants. A
writer takes ``pipe->mutex`` in pipe_write() and then faults on its source buffer, a page
registered with userfaultfd (``UFFDIO_REGISTER_MODE_MISSING``): the fault waits for us, the
mutex held (copy_page_from_iter() runs under it). N threads then write to the same pipe and
sleep in mutex_lock(), in state D. ``UFFDIO_ZEROPAGE`` resolves the fault and everything drains;
a SIGKILL does too (the fault waits interruptibly, state S: FAULT_FLAG_INTERRUPTIBLE is in every
fault's flags, mm/userfaultfd.c). Run as ``python -m tests.contention stall N``: prints
"stalled N" once N threads sleep in state D (a smaller number after 30 s), releases on a line from
stdin, prints "released BYTES".
"""

from __future__ import annotations

import ctypes
import fcntl
import mmap
import os
import struct
import sys
import threading
import time
from pathlib import Path


def pipe_writers(seconds: float, writers: int) -> int:
    """Run the workload for ``seconds``; returns the bytes moved."""
    r, w = os.pipe()
    children = []
    chunk = b"x" * 512
    deadline = time.monotonic() + seconds
    for _ in range(writers):
        pid = os.fork()
        if pid == 0:
            os.close(r)
            try:
                while time.monotonic() < deadline:
                    for _ in range(200):
                        os.write(w, chunk)
            finally:
                os._exit(0)
        children.append(pid)
    os.close(w)
    moved = 0
    while True:
        data = os.read(r, 4096)
        if not data:
            break
        moved += len(data)
    os.close(r)
    for pid in children:
        os.waitpid(pid, 0)
    return moved


SYS_USERFAULTFD = 323  # x86_64
SYS_WRITE = 1  # x86_64
UFFD_API = 0xAA
UFFDIO_API = 0xC018AA3F  # _IOWR(0xAA, 0x3F, struct uffdio_api): api, features, ioctls
UFFDIO_REGISTER = 0xC020AA00  # _IOWR(0xAA, 0x00, struct uffdio_register): start, len, mode, ioctls
UFFDIO_ZEROPAGE = 0xC020AA04  # _IOWR(0xAA, 0x04, struct uffdio_zeropage): start, len, mode, zeropage
PAGE = 4096


def sleeping_threads(holder: int | None = None) -> int:
    """Threads of this process in uninterruptible sleep (D), but ``holder``: mutex_lock() sleeps so
    (and so does a fault that waits uninterruptibly, on kernels without FAULT_FLAG_INTERRUPTIBLE)."""
    n = 0
    for tid in os.listdir("/proc/self/task"):
        if tid == str(holder):
            continue
        try:
            state = Path(f"/proc/self/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        n += state == "D"
    return n


def asleep_in_write(tid: int | None) -> bool:
    """Thread ``tid`` of this process sleeps (state S) in write(2): ``/proc/<tid>/syscall`` gives
    the number of the call a blocked task is in (a thread waiting for the GIL is in futex(2)). The
    only write that sleeps here is the holder's, in its fault."""
    task = Path(f"/proc/self/task/{tid}")
    try:
        state = (task / "stat").read_text().rsplit(")", 1)[1].split()[0]
        return state == "S" and (task / "syscall").read_text().split()[0] == str(SYS_WRITE)
    except (OSError, IndexError):
        return False


def stalled_pipe(
    waiters: int, release: threading.Event, stalled: threading.Event, holder_tid: list[int] | None = None
) -> int:
    """Hold ``waiters`` threads asleep on one pipe's mutex until ``release`` is set (``stalled``
    is set once they all sleep; the holder's thread id is appended to ``holder_tid``); returns the
    bytes that went through the pipe."""
    libc = ctypes.CDLL(None, use_errno=True)
    uffd = libc.syscall(SYS_USERFAULTFD, os.O_CLOEXEC)
    if uffd < 0:
        raise OSError(ctypes.get_errno(), "userfaultfd")
    r, w = os.pipe()
    threads: list[threading.Thread] = []
    buf = mmap.mmap(-1, PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)  # never touched by us
    addr = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    try:
        fcntl.ioctl(uffd, UFFDIO_API, bytearray(struct.pack("QQQ", UFFD_API, 0, 0)), True)
        fcntl.ioctl(uffd, UFFDIO_REGISTER, bytearray(struct.pack("QQQQ", addr, PAGE, 1, 0)), True)
        holder = threading.Thread(target=os.write, args=(w, memoryview(buf)), daemon=True)
        holder.start()
        threads.append(holder)
        if holder_tid is not None:
            holder_tid.append(holder.native_id)
        deadline = time.monotonic() + 30
        while not asleep_in_write(holder.native_id) and time.monotonic() < deadline:
            time.sleep(0.01)  # until the holder sleeps in its fault, the mutex held
        for _ in range(waiters):
            t = threading.Thread(target=os.write, args=(w, b"x"), daemon=True)
            t.start()
            threads.append(t)
        while sleeping_threads(holder.native_id) < waiters and time.monotonic() < deadline:
            time.sleep(0.05)
        stalled.set()
        release.wait()
    finally:
        stalled.set()  # also when something above failed: the caller stops waiting
        fcntl.ioctl(uffd, UFFDIO_ZEROPAGE, bytearray(struct.pack("QQQq", addr, PAGE, 0, 0)), True)
        for t in threads:
            t.join(10)
        os.close(uffd)
    moved = len(os.read(r, 1 << 20))
    os.close(r)
    os.close(w)
    return moved


def stall_main(waiters: int) -> None:
    release, stalled = threading.Event(), threading.Event()
    result: list[int] = []
    holder: list[int] = []
    runner = threading.Thread(target=lambda: result.append(stalled_pipe(waiters, release, stalled, holder)))
    runner.start()
    stalled.wait()
    print(f"stalled {sleeping_threads(holder[0] if holder else None)}", flush=True)
    sys.stdin.readline()
    release.set()
    runner.join()
    print(f"released {result[0] if result else 'nothing'}", flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "stall":
        stall_main(int(sys.argv[2]))
    else:
        print(pipe_writers(float(sys.argv[1]), int(sys.argv[2])))

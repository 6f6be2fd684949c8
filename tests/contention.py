"""Workloads that make the kernel contend on known locks, for the lock and connect probe tests.

``pipe_writers``: several processes write small chunks into one pipe that one process drains.
pipe_write() and pipe_read() take the pipe's ``pipe->mutex`` (fs/pipe.c) for every call, and
wake each other through the pipe's wait queues (``wq_head->lock``, a spinlock, taken in
__wake_up_common_lock and prepare_to_wait_event): with more writers than CPUs this gives mutex
contentions (optimistic spin, and sleeps when the owner is preempted) and spinlock contentions
in the wakeup paths, every second, on any kernel. Run as ``python -m tests.contention SECONDS N``.
"""

from __future__ import annotations

import os
import sys
import time


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


if __name__ == "__main__":
    print(pipe_writers(float(sys.argv[1]), int(sys.argv[2])))

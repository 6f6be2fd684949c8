"""One writer per host: an advisory ``flock(2)`` on the journal's directory, held for every
read-modify-write of the journal and of the host (apply, revert, finishing an interrupted run).

The lock is on the directory itself (opened read-only), so no lock file is left behind and the lock
dies with its holder (SIGKILL, OOM kill): the kernel drops a flock when the last descriptor of its
open file description is closed. Everyone on the host that tunes - ``nodetune tune`` and every
agent pod (two during a rolling update with surge) - sees the same directory. Waiting is bounded:
after ``timeout_s`` :class:`LockTimeout` says who to look for, and the caller exits 3 or counts
``nodetune_tuning_errors_total{item="lock"}``. Reads (``plan``, observe mode) never lock.
"""

from __future__ import annotations

import errno
import fcntl
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from agent.tuning.base import TuningError

DEFAULT_TIMEOUT_S = 30.0
POLL_S = 0.05


class LockTimeout(TuningError):
    """Another process held the host's tuning lock for longer than the wait allowed."""


@contextmanager
def host_lock(
    directory: Path, timeout_s: float = DEFAULT_TIMEOUT_S, on_wait: Callable[[], None] | None = None
) -> Iterator[None]:
    """Hold the lock on ``directory`` (created if missing) for the block. ``on_wait`` is called
    once if the lock is busy (to say so), before waiting."""
    directory.mkdir(parents=True, exist_ok=True)
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        deadline = time.monotonic() + timeout_s
        told = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as e:
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise
            if not told and on_wait is not None:
                on_wait()
                told = True
            if time.monotonic() >= deadline:
                raise LockTimeout(
                    f"lock: another nodetune (an agent pod or `nodetune tune`) has held the tuning lock on "
                    f"{directory} for more than {timeout_s:g}s; nothing was changed"
                )
            time.sleep(POLL_S)
        yield
    finally:
        os.close(fd)  # releases the lock

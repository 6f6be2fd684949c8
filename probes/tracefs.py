"""Make tracepoint formats visible where BCC 0.26 reads them: ``/sys/kernel/debug/tracing``.

BCC hard-codes the debugfs path (src/python/bcc/__init__.py, ``TRACEFS``) for tracepoint formats
and ids. A fresh machine has neither debugfs nor tracefs mounted; mounting debugfs at
``/sys/kernel/debug`` makes the kernel automount tracefs at ``tracing/`` beneath it. Only probes
attached as classic tracepoints need this; raw tracepoints do not.

The mount is done with mount(2) through libc (no subprocess). If this process mounted it, it
unmounts it on release, so a host is left as it was found; a busy mount is left in place.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import threading
from pathlib import Path

from host import libc

log = logging.getLogger(__name__)

DEBUGFS = Path("/sys/kernel/debug")
EVENTS = DEBUGFS / "tracing" / "events"

_lock = threading.Lock()
_mounted_by_us = 0  # reference count of users while we own the mount


class TracefsUnavailable(Exception):
    """Tracepoint formats are not readable and could not be made so."""


def acquire(debugfs: Path = DEBUGFS) -> None:
    """Ensure ``<debugfs>/tracing/events`` exists, mounting debugfs if needed and allowed."""
    global _mounted_by_us
    with _lock:
        events = debugfs / "tracing" / "events"
        if _mounted_by_us:
            _mounted_by_us += 1
            return
        if events.is_dir():
            return
        try:
            libc.mount("debugfs", str(debugfs), "debugfs")
        except OSError as e:
            raise TracefsUnavailable(
                f"{events} absent and mounting debugfs at {debugfs} failed: {e.strerror}"
            ) from None
        if not events.is_dir():
            with contextlib.suppress(OSError):
                libc.umount2(str(debugfs))
            raise TracefsUnavailable(f"debugfs mounted at {debugfs} but {events} did not appear")
        log.info("mounted debugfs at %s for tracepoint formats", debugfs)
        _mounted_by_us = 1


def release(debugfs: Path = DEBUGFS) -> None:
    """Drop one use; the last user unmounts what ``acquire`` mounted (tracefs first)."""
    global _mounted_by_us
    with _lock:
        if _mounted_by_us == 0:
            return
        _mounted_by_us -= 1
        if _mounted_by_us:
            return
        for target in (debugfs / "tracing", debugfs):
            try:
                libc.umount2(str(target))
            except OSError as e:
                if e.errno not in (errno.EINVAL, errno.ENOENT):  # EINVAL: not a mount point
                    log.warning("leaving %s mounted: %s", target, e.strerror)
                    return
        log.info("unmounted debugfs from %s", debugfs)

"""The set of cgroup directories of one hierarchy, kept current with inotify instead of walks.

Kernel interface: cgroupfs (v1 controllers and v2) reports ``mkdir``/``rmdir`` of cgroups as
inotify ``IN_CREATE``/``IN_DELETE`` on the parent directory (kernfs goes through the VFS, which
calls fsnotify). The tree is walked once; after that each change costs one event, and a scrape
that finds nothing changed reads nothing but the (empty) inotify queue. Where inotify cannot be
used (no inotify, or ``fs.inotify.max_user_watches`` reached) the tree falls back to walking again
at most every ``rescan_s`` seconds, and says so in the log.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import os
import struct
import threading
import time
from pathlib import Path

log = logging.getLogger(__name__)

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
IN_CREATE, IN_DELETE, IN_DELETE_SELF, IN_ONLYDIR, IN_ISDIR, IN_Q_OVERFLOW, IN_IGNORED = (
    0x100,
    0x200,
    0x400,
    0x01000000,
    0x40000000,
    0x4000,
    0x8000,
)
_EVENT = struct.Struct("iIII")


class CgroupTree:
    """Relative paths (``/a/b``; ``/`` is the root) of every cgroup below ``root``."""

    def __init__(self, root: Path, rescan_s: float = 30.0) -> None:
        self.root = Path(root)
        self.rescan_s = rescan_s
        self.paths: set[str] = set()
        self._wd: dict[int, str] = {}
        self._lock = threading.Lock()
        self._fd = _libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if self._fd < 0:
            log.warning(
                "inotify unavailable (%s): walking %s every %ss", os.strerror(ctypes.get_errno()), root, rescan_s
            )
        self._scanned_at = 0.0
        self._rescan()

    @property
    def watching(self) -> bool:
        return self._fd >= 0

    def _watch(self, rel: str) -> None:
        if self._fd < 0:
            return
        path = str(self.root) + (rel if rel != "/" else "")
        wd = _libc.inotify_add_watch(self._fd, path.encode(), IN_CREATE | IN_DELETE | IN_DELETE_SELF | IN_ONLYDIR)
        if wd < 0:
            err = ctypes.get_errno()
            if err in (errno.ENOSPC, errno.ENOMEM):
                log.warning("inotify watch limit reached at %s: walking %s every %ss", path, self.root, self.rescan_s)
                os.close(self._fd)
                self._fd, self._wd = -1, {}
            return  # ENOENT: removed meanwhile
        self._wd[wd] = rel

    def _add_subtree(self, rel: str) -> None:
        stack = [rel]
        while stack:
            current = stack.pop()
            self.paths.add(current)
            self._watch(current)  # watch before listing: a child made now is seen either way
            directory = str(self.root) + (current if current != "/" else "")
            try:
                with os.scandir(directory) as it:
                    for entry in it:
                        if entry.is_dir(follow_symlinks=False):
                            stack.append(f"{current.rstrip('/')}/{entry.name}")
            except OSError:
                continue

    def _rescan(self) -> None:
        if self._fd >= 0:
            for wd in list(self._wd):
                _libc.inotify_rm_watch(self._fd, wd)
        self.paths, self._wd = set(), {}
        self._add_subtree("/")
        self._scanned_at = time.monotonic()

    def refresh(self) -> tuple[set[str], set[str]]:
        """Apply pending changes; (paths added, paths removed) since the last call."""
        with self._lock:
            before = set(self.paths) if self._fd < 0 else None
            if self._fd < 0:
                if time.monotonic() - self._scanned_at >= self.rescan_s:
                    self._rescan()
                return self.paths - before, before - self.paths  # type: ignore[operator]
            added: set[str] = set()
            removed: set[str] = set()
            while True:
                try:
                    data = os.read(self._fd, 65536)
                except BlockingIOError:
                    break
                for wd, mask, name in self._events(data):
                    if mask & IN_Q_OVERFLOW:  # events were dropped: start over
                        old = set(self.paths)
                        self._rescan()
                        return added | (self.paths - old), removed | (old - self.paths)
                    parent = self._wd.get(wd)
                    if parent is None:
                        continue
                    if mask & IN_IGNORED:
                        del self._wd[wd]
                        continue
                    if not mask & IN_ISDIR or not name:
                        continue
                    child = f"{parent.rstrip('/')}/{name}"
                    if mask & IN_CREATE and child not in self.paths:
                        before_add = set(self.paths)
                        self._add_subtree(child)
                        added |= self.paths - before_add
                    elif mask & IN_DELETE:
                        gone = {p for p in self.paths if p == child or p.startswith(child + "/")}
                        self.paths -= gone
                        removed |= gone
            return added - removed, removed

    @staticmethod
    def _events(data: bytes):
        offset = 0
        while offset + _EVENT.size <= len(data):
            wd, mask, _cookie, length = _EVENT.unpack_from(data, offset)
            name = data[offset + _EVENT.size : offset + _EVENT.size + length].split(b"\0", 1)[0].decode()
            yield wd, mask, name
            offset += _EVENT.size + length

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

"""The cgroup directories of one hierarchy and their ids, kept current with inotify instead of walks.

Kernel interface: cgroupfs (v1 controllers and v2) reports ``mkdir``/``rmdir`` of cgroups as
inotify ``IN_CREATE``/``IN_DELETE`` on the parent directory (kernfs goes through the VFS, which
calls fsnotify). The tree is walked once; after that each change costs one event, and an update
that finds nothing changed reads nothing but the (empty) inotify queue. A cgroup's id is its
directory's inode number (kernfs node id; on 64-bit kernels ino == id, fs/kernfs/dir.c): the walk
takes it from ``readdir``'s ``d_ino``, a created cgroup from one ``stat``. cgroup v1 also lets a
cgroup be renamed within its parent (``cgroup1_rename``; v2 refuses): ``IN_MOVED_FROM``/``IN_MOVED_TO``,
after which the tree is walked again (rare; the moved subtree's paths and watches all change). Where inotify cannot be
used (no inotify, or ``fs.inotify.max_user_watches`` reached) the tree falls back to walking again
at most every ``rescan_s`` seconds, and says so in the log.

Several users share one tree (``agent/identity/cgroup_hierarchy.py``): each ``subscribe()``s and
gets its own changes since its last ``take()``, whoever read the queue. A user that does not take
for long gets a bounded log: past ``CgroupChanges.LIMIT`` entries it is dropped and the next
``take()`` says ``overflowed``: the user resyncs from the tree's ``paths``.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

from host import libc

log = logging.getLogger(__name__)

IN_MOVED_FROM, IN_MOVED_TO = 0x40, 0x80
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


class Taken(NamedTuple):
    """Changes since a user's last ``take()``. ``overflowed``: more than its log holds happened
    (``added`` and ``removed`` are empty): compare what the user kept with the tree's ``paths``."""

    added: set[str]
    removed: set[str]
    overflowed: bool = False


class CgroupChanges:
    """One user's view of a tree's changes: what was added and removed since its last ``take()``."""

    LIMIT = 65536  # paths logged per user between takes; past it the log overflows

    def __init__(self, tree: CgroupTree, limit: int = LIMIT) -> None:
        self.tree = tree
        self.limit = limit
        self._added: set[str] = set()
        self._removed: set[str] = set()
        self._overflowed = False

    def _note(self, added: set[str], removed: set[str]) -> None:  # under the tree's lock
        if self._overflowed:
            return
        self._added |= added
        self._removed |= removed
        if len(self._added) + len(self._removed) > self.limit:  # nobody takes: do not grow for ever
            self._added, self._removed, self._overflowed = set(), set(), True

    def take(self) -> Taken:
        """Bring the tree up to date; (paths added, paths removed, overflowed) since the last call.
        A path removed and made again is in ``removed`` (and in the tree's ``paths``)."""
        self.tree.update()
        with self.tree._lock:
            taken = Taken(self._added - self._removed, self._removed, self._overflowed)
            self._added, self._removed, self._overflowed = set(), set(), False
        return taken

    def close(self) -> None:
        self.tree._unsubscribe(self)


class CgroupTree:
    """Relative paths (``/a/b``; ``/`` is the root) of every cgroup below ``root``, and their ids.

    ``paths`` is replaced, never changed in place: a reader on another thread takes it once and
    iterates a consistent set. ``on_gone(ids, certain)`` is told the ids (with their last paths)
    the tree saw removed: an rmdir it was told of (``certain``), or a walk that no longer found the
    id (not certain: it may have been renamed meanwhile; a user that can ask the kernel should).

    A walk that cannot list a directory for any reason but its removal (ENOENT/ENOTDIR), e.g.
    EMFILE or ENOMEM, is incomplete: it removes nothing it did not see, and the tree is walked
    again ``retry_s`` later.
    """

    def __init__(
        self,
        root: Path,
        rescan_s: float = 30.0,
        on_gone: Callable[[dict[int, str], bool], None] | None = None,
        retry_s: float = 1.0,
    ) -> None:
        self.root = Path(root)
        self.rescan_s = rescan_s
        self.retry_s = retry_s
        self.on_gone = on_gone
        self.incomplete_since: float | None = None  # when a walk could not list everything
        self.paths: frozenset[str] = frozenset()
        self.ids: dict[int, str] = {}  # cgroup id -> path
        self._id_of: dict[str, int] = {}
        self._wd: dict[int, str] = {}
        self._subscribers: list[CgroupChanges] = []
        self.synced_from = float("-inf")  # when the last update that made the view current began
        self.walked_at = float("-inf")
        self._lock = threading.RLock()
        try:
            self._fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as e:
            self._fd = -1
            log.warning("inotify unavailable (%s): walking %s every %ss", e.strerror, root, rescan_s)
        with self._lock:
            self._rescan()

    @property
    def watching(self) -> bool:
        return self._fd >= 0

    def subscribe(self) -> CgroupChanges:
        changes = CgroupChanges(self)
        with self._lock:
            self._subscribers.append(changes)
        return changes

    def _unsubscribe(self, changes: CgroupChanges) -> None:
        with self._lock, contextlib.suppress(ValueError):
            self._subscribers.remove(changes)

    # --- building the view (under the lock) ---------------------------------------------
    def _stop_watching(self, why: str) -> None:
        log.warning("%s: walking %s every %ss", why, self.root, self.rescan_s)
        os.close(self._fd)
        self._fd, self._wd = -1, {}

    def _watch(self, rel: str) -> None:
        if self._fd < 0:
            return
        path = str(self.root) + (rel if rel != "/" else "")
        try:
            mask = IN_CREATE | IN_DELETE | IN_MOVED_FROM | IN_MOVED_TO | IN_DELETE_SELF | IN_ONLYDIR
            wd = libc.inotify_add_watch(self._fd, path, mask)
        except OSError as e:
            if e.errno not in (errno.ENOENT, errno.ENOTDIR):  # not removed meanwhile: changes would be missed
                self._stop_watching(f"inotify watch on {path} failed ({e.strerror})")
            return
        self._wd[wd] = rel

    def _add_subtree(self, rel: str, cgroup_id: int, paths: set[str]) -> None:
        stack = [(rel, cgroup_id)]
        while stack:
            current, current_id = stack.pop()
            paths.add(current)
            self.ids[current_id] = current
            self._id_of[current] = current_id
            self._watch(current)  # watch before listing: a child made now is seen either way
            directory = str(self.root) + (current if current != "/" else "")
            try:
                with os.scandir(directory) as it:
                    for entry in it:
                        if entry.is_dir(follow_symlinks=False):  # d_ino is the kernfs id: no stat
                            stack.append((f"{current.rstrip('/')}/{entry.name}", entry.inode()))
            except OSError as e:
                if e.errno not in (errno.ENOENT, errno.ENOTDIR):  # not removed: not listed
                    self._incomplete(f"listing {directory} failed ({e.strerror})")
                continue

    def _incomplete(self, why: str) -> None:
        if self.incomplete_since is None:
            log.warning("%s: the tree of %s is incomplete, walked again in %ss", why, self.root, self.retry_s)
        self.incomplete_since = time.monotonic()

    def _remove(self, path: str) -> None:
        cgroup_id = self._id_of.pop(path, None)
        if cgroup_id is not None and self.ids.get(cgroup_id) == path:
            del self.ids[cgroup_id]

    def _rescan(self) -> None:
        started = time.monotonic()
        if self._fd >= 0:
            for wd in list(self._wd):
                with contextlib.suppress(OSError):  # EINVAL: the kernel dropped it with its directory
                    libc.inotify_rm_watch(self._fd, wd)
        old_paths, old_ids, old_id_of = self.paths, self.ids, self._id_of
        was_incomplete = self.incomplete_since is not None
        self.incomplete_since = None
        paths: set[str] = set()
        self.ids, self._id_of, self._wd = {}, {}, {}
        try:
            root_id = os.stat(self.root).st_ino
        except OSError as e:
            root_id = None
            self._incomplete(f"stat of {self.root} failed ({e.strerror})")
        if root_id is not None:
            self._add_subtree("/", root_id, paths)
        self.walked_at = time.monotonic()
        if self.incomplete_since is not None:  # what the walk did not see is kept, not removed
            for path in old_paths - paths:
                paths.add(path)
                cgroup_id = old_id_of.get(path)
                if cgroup_id is not None and cgroup_id not in self.ids:
                    self.ids[cgroup_id] = path
                    self._id_of[path] = cgroup_id
        else:
            self.synced_from = started  # only a complete walk says an id it did not find is not there
            if was_incomplete:
                log.info("the tree of %s is complete again", self.root)
        self._publish(paths - old_paths, set(old_paths - paths), old_ids, paths, certain=False)

    def _publish(
        self, added: set[str], removed: set[str], before: dict[int, str], paths: set[str], certain: bool = True
    ) -> None:
        self.paths = frozenset(paths)
        for changes in self._subscribers:
            changes._note(added, removed)
        if self.on_gone is not None:
            gone = {i: p for i, p in before.items() if i not in self.ids}
            if gone:
                self.on_gone(gone, certain)

    # --- keeping it current --------------------------------------------------------------
    def update(self, walk_older_than: float | None = None) -> None:
        """Apply pending changes (watching), or walk again when the last walk is older than
        ``walk_older_than`` (default ``rescan_s``) where inotify cannot be used."""
        with self._lock:
            retry = self.incomplete_since is not None and time.monotonic() - self.incomplete_since >= self.retry_s
            if self._fd < 0:
                limit = self.rescan_s if walk_older_than is None else walk_older_than
                if retry or time.monotonic() - self.walked_at >= limit:
                    self._rescan()
                return
            if retry:  # a walk, or a subtree added by an event, could not be listed
                self._rescan()
                return
            started = time.monotonic()
            try:
                data = os.read(self._fd, 65536)
            except BlockingIOError:  # nothing changed: one read, nothing copied
                self.synced_from = started
                return
            paths = set(self.paths)
            before: dict[int, str] = {}
            added: set[str] = set()
            removed: set[str] = set()
            try:
                walk = self._apply(data, paths, before, added, removed)
            except Exception:  # a bad event must not wedge the index every user shares
                log.exception("applying cgroup events of %s failed: walking it again", self.root)
                walk = True
            if walk:  # events were lost or not applied: publish what was, then walk
                self._publish(added - removed, removed, before, paths)
                self._rescan()
                return
            if self.incomplete_since is None:  # else a new id may be in what could not be listed
                self.synced_from = started
            if added or removed:
                self._publish(added - removed, removed, before, paths)

    def _apply(self, data: bytes, paths: set[str], before: dict[int, str], added: set[str], removed: set[str]) -> bool:
        """Apply the events in ``data`` and all queued after them to ``paths``, ``ids`` (``added``,
        ``removed``; ``before``: the ids removed, with their paths). True when the tree must be
        walked instead: the queue overflowed, a watch failed (events may be lost), or a cgroup was
        renamed (its subtree's paths and watches change)."""
        while data:
            for wd, mask, name in self._events(data):
                if mask & IN_Q_OVERFLOW:  # events were dropped: start over
                    return True
                parent = self._wd.get(wd)
                if parent is None:
                    continue
                if mask & IN_IGNORED:
                    del self._wd[wd]
                    continue
                if not mask & IN_ISDIR or not name:
                    continue
                if mask & (IN_MOVED_FROM | IN_MOVED_TO):
                    return True
                child = f"{parent.rstrip('/')}/{name}"
                if mask & IN_CREATE and child not in paths:
                    try:
                        child_id = os.stat(str(self.root) + child, follow_symlinks=False).st_ino
                    except OSError:  # removed meanwhile: its IN_DELETE follows
                        continue
                    new: set[str] = set()
                    try:
                        self._add_subtree(child, child_id, new)
                    finally:  # ids of a part-added subtree are in ``paths`` too
                        paths |= new
                        added |= new
                elif mask & IN_DELETE:
                    gone = {p for p in paths if p == child or p.startswith(child + "/")}
                    for p in gone:
                        cgroup_id = self._id_of.get(p)
                        if cgroup_id is not None:
                            before.setdefault(cgroup_id, p)
                        self._remove(p)
                        paths.discard(p)
                        removed.add(p)
            if self._fd < 0:
                return True
            try:
                data = os.read(self._fd, 65536)
            except BlockingIOError:
                return False
        return False

    @staticmethod
    def _events(data: bytes):
        offset = 0
        while offset + _EVENT.size <= len(data):
            wd, mask, _cookie, length = _EVENT.unpack_from(data, offset)
            name = data[offset + _EVENT.size : offset + _EVENT.size + length].split(b"\0", 1)[0]
            yield wd, mask, os.fsdecode(name)  # as scandir decodes: a walk and the events agree
            offset += _EVENT.size + length

    def close(self) -> None:
        """Stop watching (later updates walk); closes the inotify instance."""
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd, self._wd = -1, {}

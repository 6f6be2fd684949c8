"""One watched index per cgroup hierarchy, shared by every user: its cgroups and id -> path lookups.

A ``CgroupHierarchy`` is the one enumerator of a hierarchy (cgroup v2, or a v1 controller such as
``cpu``): the identity service asks it for the path of a cgroup id (BPF), the network namespace
index and the throttling collector follow its cgroups (each with its own ``subscribe()``). It owns
one ``CgroupTree`` (``agent/identity/cgroup_tree.py``: paths and ids, kept current by one inotify
instance, walked where inotify cannot be used). ``CgroupHierarchies`` hands out one per root.

Kernel interfaces for ids: a cgroup's id is its directory's inode (kernfs node id). An id the tree
knows is answered from it after reading the inotify queue (one ``read``). Otherwise cgroupfs is
exportable (kernfs ``kernfs_export_ops``), so ``open_by_handle_at(2)`` with the 8-byte id as a
``FILEID_KERNFS`` handle opens the cgroup's directory, or fails with ESTALE once it is removed:
"gone" is the kernel's word (an id a walk of the tree no longer found is asked again: only an
rmdir event or ESTALE is certain). It needs CAP_DAC_READ_SEARCH; it is checked once on the root and,
where it does not work (no capability, not a cgroupfs, e.g. a fixture tree), the tree decides: an
id is gone when the tree saw it removed, or when an update of the tree that began after the id
was first asked for does not hold it (without inotify a miss walks again, at most every
``min_rescan_s``). Paths of gone ids are remembered (bounded) so their last labels stay known.
"""

from __future__ import annotations

import errno
import logging
import os
import struct
import threading
import time
from pathlib import Path

from agent.identity.cgroup_tree import CgroupChanges, CgroupTree
from host import libc

log = logging.getLogger(__name__)

FILEID_KERNFS = 0xFE  # include/linux/exportfs.h: a kernfs handle is the node's u64 id


class CgroupHierarchy:
    """The cgroups of the hierarchy at ``root`` (``paths``, ``subscribe()``) and ``lookup(id)``."""

    MEMORY = 8192  # gone ids remembered, and ids found by handle before the tree had them

    def __init__(self, root: Path, min_rescan_s: float = 0.5, max_age_s: float = 30.0) -> None:
        self.root = Path(root)
        self.min_rescan_s = min_rescan_s
        self._prefix = os.path.realpath(root)
        self._gone: dict[int, str | None] = {}  # insertion-ordered: oldest evicted first
        self._found: dict[int, str] = {}  # found by handle, not (yet) in the tree
        self._asked: dict[int, float] = {}  # when an id the tree did not hold was first asked for
        self._mount_fd: int | None = None
        self.by_handle = False
        self.tree = CgroupTree(self.root, rescan_s=max_age_s, on_gone=self._tree_saw_gone)
        self._lock: threading.RLock = self.tree._lock  # one lock: the tree calls back under it
        self.by_handle = self._probe_by_handle()

    @property
    def paths(self) -> frozenset[str]:
        """Every cgroup path (relative, ``/`` the root) as of the last update; never changed in place."""
        return self.tree.paths

    @property
    def watching(self) -> bool:
        return self.tree.watching

    def subscribe(self) -> CgroupChanges:
        """A user's own view of the changes (``take()`` brings the tree up to date first)."""
        return self.tree.subscribe()

    # --- open_by_handle_at ----------------------------------------------------------------
    def _probe_by_handle(self) -> bool:
        try:
            self._mount_fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            root_id = os.fstat(self._mount_fd).st_ino
        except OSError:
            return False
        ok = self._open_by_id(root_id) == "/"
        if not ok:
            os.close(self._mount_fd)
            self._mount_fd = None
        return ok

    def _open_by_id(self, cgroup_id: int) -> str | OSError | None:
        """Path of a live id; None if gone (ESTALE/ENOENT); the OSError for anything else."""
        handle = struct.pack("<IiQ", 8, FILEID_KERNFS, cgroup_id)
        try:
            fd = libc.open_by_handle_at(self._mount_fd, handle, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as e:
            return None if e.errno in (errno.ESTALE, errno.ENOENT) else e
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError as e:
            return e
        finally:
            os.close(fd)
        if target.endswith(" (deleted)"):
            return None
        if target == self._prefix:
            return "/"
        if not target.startswith(self._prefix + "/"):
            return OSError(errno.EXDEV, f"{target} is outside {self._prefix}")
        return target[len(self._prefix) :]

    # --- gone ids -------------------------------------------------------------------------
    def _remember_gone(self, cgroup_id: int, path: str | None) -> None:
        self._gone[cgroup_id] = path
        self._asked.pop(cgroup_id, None)
        self._found.pop(cgroup_id, None)
        while len(self._gone) > self.MEMORY:
            self._gone.pop(next(iter(self._gone)))

    def _keep_found(self, cgroup_id: int, path: str) -> None:
        self._found[cgroup_id] = path
        while len(self._found) > self.MEMORY:
            self._found.pop(next(iter(self._found)))

    def _tree_saw_gone(self, gone: dict[int, str], certain: bool) -> None:
        """The tree no longer holds these ids. Its rmdir events are certain; a walk that did not
        find an id is not (a rename meanwhile): with handles, the kernel is asked (ESTALE: gone),
        and an id it cannot answer for stays live, its last path kept for its labels."""
        for cgroup_id, path in gone.items():
            if certain or not self.by_handle:
                self._remember_gone(cgroup_id, path)
                continue
            found = self._open_by_id(cgroup_id)
            if found is None:
                self._remember_gone(cgroup_id, path)
            else:
                self._keep_found(cgroup_id, path if isinstance(found, OSError) else found)

    # --- the lookup -----------------------------------------------------------------------
    def lookup(self, cgroup_id: int, check_gone: bool = True) -> tuple[str | None, bool]:
        """(path or last known path or None, gone for certain). With ``check_gone=False`` a path
        already known is returned without bringing the tree up to date (scrapes need labels only)."""
        if not check_gone and cgroup_id not in self._gone:
            path = self.tree.ids.get(cgroup_id) or self._found.get(cgroup_id)
            if path is not None:
                return path, False
        tree = self.tree
        with self._lock:
            if cgroup_id in self._gone:
                return self._gone[cgroup_id], True
            now = time.monotonic()
            known = cgroup_id in tree.ids
            if not known:
                self._asked.setdefault(cgroup_id, now)
            # without inotify and handles, a miss walks again (at most every min_rescan_s)
            tree.update(None if known or self.by_handle else self.min_rescan_s)
            if cgroup_id in self._gone:  # the update saw it removed
                return self._gone[cgroup_id], True
            path = tree.ids.get(cgroup_id)
            if path is not None and (tree.watching or not self.by_handle):
                self._asked.pop(cgroup_id, None)
                self._found.pop(cgroup_id, None)
                return path, False
            if self.by_handle:
                found = self._open_by_id(cgroup_id)
                if found is None:
                    self._remember_gone(cgroup_id, path or self._found.get(cgroup_id))
                    return self._gone[cgroup_id], True
                if not isinstance(found, OSError):
                    self._asked.pop(cgroup_id, None)
                    if found != path:
                        self._keep_found(cgroup_id, found)
                    return found, False
                log.warning("cgroup id lookups by handle failed (%s); the tree of %s decides", found, self.root)
                self.by_handle = False
            if path is not None:
                return path, False
            if self._asked.setdefault(cgroup_id, now) <= tree.synced_from:
                self._remember_gone(cgroup_id, None)  # an update that began after it was asked did not find it
                return None, True
            return None, False

    def close(self) -> None:
        self.tree.close()
        if self._mount_fd is not None:
            os.close(self._mount_fd)
            self._mount_fd = None


class CgroupHierarchies:
    """One ``CgroupHierarchy`` per hierarchy root (by real path), made on first use: every user of
    a hierarchy shares its one tree, inotify instance and id lookups."""

    def __init__(self) -> None:
        self._by_root: dict[str, CgroupHierarchy] = {}
        self._lock = threading.Lock()

    def get(self, root: Path) -> CgroupHierarchy:
        key = os.path.realpath(root)
        with self._lock:
            hierarchy = self._by_root.get(key)
            if hierarchy is None:
                hierarchy = self._by_root[key] = CgroupHierarchy(Path(root))
            return hierarchy

    def close(self) -> None:
        with self._lock:
            for hierarchy in self._by_root.values():
                hierarchy.close()
            self._by_root.clear()

"""CgroupTree: the cgroups of a hierarchy and their ids, followed by inotify (and by walks where it
cannot be), with each user's own changes."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from agent.identity.cgroup_tree import CgroupTree
from host.paths import HostPaths
from tests.agent.identity.fd_exhaustion import run_child

REPO = Path(__file__).resolve().parents[3]


def test_follows_mkdir_and_rmdir_without_walking(tmp_path: Path) -> None:
    (tmp_path / "a/b").mkdir(parents=True)
    tree = CgroupTree(tmp_path)
    changes = tree.subscribe()
    try:
        assert tree.watching and tree.paths == {"/", "/a", "/a/b"}
        (tmp_path / "a/c/d").mkdir(parents=True)
        added, removed, overflowed = changes.take()
        assert added == {"/a/c", "/a/c/d"} and removed == set() and not overflowed
        (tmp_path / "a/c/d").rmdir()
        (tmp_path / "a/c").rmdir()
        added, removed, overflowed = changes.take()
        assert added == set() and removed == {"/a/c", "/a/c/d"}
        assert changes.take() == (set(), set(), False)  # nothing changed: nothing read but the queue
    finally:
        tree.close()


def test_ids_follow_the_paths_and_removed_ids_are_reported(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    gone: dict[int, tuple[str, bool]] = {}
    tree = CgroupTree(tmp_path, on_gone=lambda ids, certain: gone.update({i: (p, certain) for i, p in ids.items()}))
    try:
        a = os.stat(tmp_path / "a").st_ino
        assert tree.ids == {os.stat(tmp_path).st_ino: "/", a: "/a"}  # from readdir's d_ino
        (tmp_path / "a/b").mkdir()
        tree.update()
        b = os.stat(tmp_path / "a/b").st_ino
        assert tree.ids[b] == "/a/b"
        assert gone == {}
        (tmp_path / "a/b").rmdir()
        tree.update()
        assert b not in tree.ids and gone == {b: ("/a/b", True)}  # its last path, for its labels; an rmdir is certain
    finally:
        tree.close()


def test_every_user_gets_every_change_whoever_read_the_queue(tmp_path: Path) -> None:
    tree = CgroupTree(tmp_path)
    first, second = tree.subscribe(), tree.subscribe()
    try:
        (tmp_path / "x").mkdir()
        assert first.take() == ({"/x"}, set(), False)
        (tmp_path / "y").mkdir()
        (tmp_path / "x").rmdir()
        tree.update()  # a third party (an id lookup) reads the queue
        assert second.take() == ({"/y"}, {"/x"}, False)  # "/x" came and went since its last take
        assert first.take() == ({"/y"}, {"/x"}, False)
        second.close()
        (tmp_path / "z").mkdir()
        assert first.take() == ({"/z"}, set(), False)
        assert second.take() == (set(), set(), False)  # unsubscribed: nothing kept for it
    finally:
        tree.close()


def test_without_inotify_it_walks_again_on_its_cadence(tmp_path: Path) -> None:
    tree = CgroupTree(tmp_path, rescan_s=3600)
    changes = tree.subscribe()
    tree.close()  # as if inotify were unavailable
    (tmp_path / "x").mkdir()
    assert changes.take() == (set(), set(), False)  # walked moments ago
    tree.rescan_s = 0
    assert changes.take() == ({"/x"}, set(), False)
    assert tree.ids[os.stat(tmp_path / "x").st_ino] == "/x"


@pytest.mark.root
def test_watch_limit_reached_falls_back_to_walking(tmp_path: Path) -> None:
    """fs.inotify.max_user_watches reached: the tree says so and walks. The limit is lowered in
    a user namespace of a child (its own ``user.max_inotify_watches``), not on the host."""
    for d in ("a/b/c", "d/e"):
        (tmp_path / d).mkdir(parents=True)
    code = f"""
import sys
sys.path.insert(0, {str(REPO)!r})
from agent.identity.cgroup_tree import CgroupTree
from host.paths import HostPaths
with open("/proc/sys/user/max_inotify_watches", "w") as f:
    f.write("3")
tree = CgroupTree({str(tmp_path)!r}, rescan_s=0)
changes = tree.subscribe()
print(tree.watching, len(tree.paths))
import contextlib
import os
os.mkdir({str(tmp_path / "d/f")!r})
print(sorted(changes.take()[0]))
"""
    out = subprocess.run(
        ["unshare", "-Ur", sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.splitlines() == ["False 6", "['/d/f']"]
    assert "inotify watch on" in out.stderr and "walking" in out.stderr


@pytest.mark.root
def test_real_cgroupfs_reports_cgroup_creation(make_cgroup) -> None:
    cg = make_cgroup("tree")
    tree = CgroupTree(cg.path)
    changes = tree.subscribe()
    try:
        child = cg.child("leaf")
        assert changes.take() == ({"/leaf"}, set(), False)
        leaf_id = child.id
        assert tree.ids[leaf_id] == "/leaf"  # a cgroup's id is its directory's inode
        child.remove()
        cg.children.clear()
        assert changes.take() == (set(), {"/leaf"}, False)
        assert leaf_id not in tree.ids
    finally:
        tree.close()


@pytest.mark.root
def test_a_cgroup_name_that_is_not_utf8_is_followed_like_any_other(make_cgroup) -> None:
    """Whoever may make cgroups (a delegated v2 subtree) may name one with any bytes: the events
    decode names as the walk does (os.fsdecode), and the rest of the batch is applied."""
    cg = make_cgroup("badname")
    gone: dict[int, str] = {}
    tree = CgroupTree(cg.path, on_gone=lambda ids, _certain: gone.update(ids))
    changes = tree.subscribe()
    bad = os.fsdecode(b"bad\xff")  # "bad\udcff", as os.scandir names it
    try:
        os.mkdir(os.fsencode(cg.path) + b"/bad\xff")
        good = cg.child("good")  # same batch, after the bad name
        assert changes.take() == ({"/" + bad, "/good"}, set(), False)
        bad_id = os.stat(os.fsencode(cg.path) + b"/bad\xff").st_ino
        assert tree.ids[bad_id] == "/" + bad and tree.ids[good.id] == "/good"
        os.rmdir(os.fsencode(cg.path) + b"/bad\xff")
        assert changes.take() == (set(), {"/" + bad}, False)
        assert gone == {bad_id: "/" + bad} and bad_id not in tree.ids  # reported gone: BPF rows reclaimed
        fresh = CgroupTree(cg.path)  # a walk names cgroups as the events did
        assert fresh.paths == tree.paths
        fresh.close()
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.rmdir(os.fsencode(cg.path) + b"/bad\xff")
        tree.close()


def test_a_walk_that_cannot_list_a_directory_removes_nothing(tmp_path: Path) -> None:
    """EMFILE (or ENOMEM...) listing a directory is not its removal: only ENOENT/ENOTDIR are. The
    walk keeps what it could not see, reports nothing gone, and is tried again."""
    (tmp_path / "a/b").mkdir(parents=True)
    code = f"""
from agent.identity.cgroup_tree import CgroupTree
from host.paths import HostPaths
gone = {{}}
tree = CgroupTree({str(tmp_path)!r}, rescan_s=3600, on_gone=lambda ids, certain: gone.update(ids))
changes = tree.subscribe()
tree.close()  # walks serve, as without inotify
exhaust()
tree.update(walk_older_than=0)
free()
print(sorted(tree.paths), gone, tuple(changes.take()))
tree.retry_s = 0
import os
os.rmdir({str(tmp_path / "a/b")!r})
tree.update()  # the incomplete walk is retried without waiting for rescan_s
print(sorted(tree.paths), sorted(gone.values()), tuple(changes.take()))
"""
    assert run_child(code) == [
        "['/', '/a', '/a/b'] {} (set(), set(), False)",
        "['/', '/a'] ['/a/b'] (set(), {'/a/b'}, False)",
    ]


def test_a_new_subtree_that_cannot_be_listed_is_walked_again(tmp_path: Path) -> None:
    """With inotify: a cgroup made with children meanwhile whose listing fails (EMFILE) is added,
    and its children are found by a walk once descriptors are back (were: left out for good)."""
    code = f"""
import os
from agent.identity.cgroup_tree import CgroupTree
from host.paths import HostPaths
tree = CgroupTree({str(tmp_path)!r}, rescan_s=3600)
changes = tree.subscribe()
os.makedirs({str(tmp_path / "new/child")!r})
exhaust()
tree.update()
free()
print(tree.watching, sorted(tree.paths))
tree.retry_s = 0
print(sorted(changes.take()[0]))
"""
    assert run_child(code) == ["True ['/', '/new']", "['/new', '/new/child']"]


def test_a_user_that_does_not_take_keeps_a_bounded_log(tmp_path: Path) -> None:
    """Past its limit a user's log is dropped and its next take says so (it resyncs from
    ``paths``); other users' logs are their own."""
    tree = CgroupTree(tmp_path)
    idle, busy = tree.subscribe(), tree.subscribe()
    idle.limit = 3
    try:
        for name in ("a", "b"):
            (tmp_path / name).mkdir()
        assert idle.take() == ({"/a", "/b"}, set(), False)  # within the limit: listed
        for name in ("c", "d", "e", "f"):
            (tmp_path / name).mkdir()
        (tmp_path / "a").rmdir()
        assert idle.take() == (set(), set(), True)  # overflowed: nothing listed, resync from paths
        assert tree.paths == {"/", "/b", "/c", "/d", "/e", "/f"}
        assert busy.take() == ({"/b", "/c", "/d", "/e", "/f"}, {"/a"}, False)
        (tmp_path / "g").mkdir()
        assert idle.take() == ({"/g"}, set(), False)  # listed again after the overflow was taken
    finally:
        tree.close()


@pytest.mark.root
def test_a_renamed_v1_cgroup_is_followed(make_cgroup) -> None:
    """cgroup v1 allows renaming a cgroup within its parent (v2 refuses, EPERM): inotify says
    IN_MOVED_FROM/IN_MOVED_TO; the tree lists the new paths, the ids keep their cgroups, nothing
    is gone, and the moved directories' watches follow."""
    cpu = HostPaths().cgroup_v1("cpu")
    if cpu is None:
        pytest.skip("no v1 cpu hierarchy")
    cg = make_cgroup("rename", root=cpu)
    old = cg.child("old")
    old.child("leaf")
    gone: dict[int, str] = {}
    tree = CgroupTree(cg.path, on_gone=lambda ids, _certain: gone.update(ids))
    changes = tree.subscribe()
    new = cg.path / "new"
    try:
        leaf_id = os.stat(old.path / "leaf").st_ino
        os.rename(old.path, new)
        assert changes.take() == ({"/new", "/new/leaf"}, {"/old", "/old/leaf"}, False)
        assert tree.ids[leaf_id] == "/new/leaf" and gone == {}
        (new / "later").mkdir()
        assert changes.take() == ({"/new/later"}, set(), False)  # watched at its new path
    finally:
        tree.close()
        for d in (new / "later", new / "leaf", new):
            with contextlib.suppress(FileNotFoundError):
                d.rmdir()
        cg.children.clear()

"""CgroupHierarchy: one watched index per hierarchy; cgroup id -> path with "gone" certain, by the
tree (inotify, or walks), or by open_by_handle_at on cgroupfs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from agent.identity.cgroup_hierarchy import CgroupHierarchies, CgroupHierarchy
from host.paths import HostPaths
from tests.agent.identity.fd_exhaustion import run_child


def test_walking_index_rescans_on_miss_but_not_more_often_than_allowed(tmp_path: Path) -> None:
    hierarchy = CgroupHierarchy(tmp_path, min_rescan_s=3600)
    hierarchy.tree.close()  # as if inotify were unavailable: the walk serves
    assert not hierarchy.by_handle  # not a cgroupfs
    assert hierarchy.lookup(os.stat(tmp_path).st_ino) == ("/", False)
    (tmp_path / "new").mkdir()
    new = os.stat(tmp_path / "new").st_ino
    assert hierarchy.lookup(new) == (None, False)  # walked moments ago: no walk, and not gone
    hierarchy.min_rescan_s = 0
    assert hierarchy.lookup(new) == ("/new", False)
    assert "/new" in hierarchy.paths  # the walk is the tree's: its users see the cgroup too
    hierarchy.close()


def test_walking_index_tells_gone_from_unknown(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    a = os.stat(tmp_path / "a").st_ino
    hierarchy = CgroupHierarchy(tmp_path, min_rescan_s=0)
    hierarchy.tree.close()
    assert hierarchy.lookup(a) == ("/a", False)
    (tmp_path / "a").rmdir()
    hierarchy.tree.rescan_s = 0  # the next lookup walks again
    assert hierarchy.lookup(a) == ("/a", True)  # gone, last path kept for its labels
    never = 987654321
    hierarchy.tree.rescan_s = 3600
    hierarchy.min_rescan_s = 3600
    assert hierarchy.lookup(never) == (None, False)  # asked after the last walk: unknown, not gone
    hierarchy.tree.update(walk_older_than=0)
    assert hierarchy.lookup(never) == (None, True)  # a whole walk since it was asked did not find it
    hierarchy.close()


def test_watched_index_answers_from_its_tree(tmp_path: Path) -> None:
    """With inotify and no handles (not a cgroupfs), new and removed ids are known from the events
    alone: no walk, whatever the walk cadence."""
    hierarchy = CgroupHierarchy(tmp_path, min_rescan_s=3600, max_age_s=3600)
    try:
        assert hierarchy.watching and not hierarchy.by_handle
        (tmp_path / "x/y").mkdir(parents=True)
        y = os.stat(tmp_path / "x/y").st_ino
        assert hierarchy.lookup(y) == ("/x/y", False)
        (tmp_path / "x/y").rmdir()
        assert hierarchy.lookup(y, check_gone=False) == ("/x/y", False)  # labels only: not asked again
        assert hierarchy.lookup(y) == ("/x/y", True)  # the rmdir's event: gone, its path kept
        assert hierarchy.lookup(987654321) == (None, True)  # the tree, current since it was asked, has no such id
    finally:
        hierarchy.close()


@pytest.mark.root
@pytest.mark.parametrize("controller", ["unified", "cpu"])
def test_open_by_handle_knows_gone_from_unknown_on_both_hierarchies(make_cgroup, controller: str) -> None:
    paths = HostPaths()
    root = paths.cgroup_v2() if controller == "unified" else paths.cgroup_v1("cpu")
    if root is None:
        pytest.skip(f"no {controller} hierarchy")
    cg = make_cgroup("handle", root=root)
    child = cg.child("leaf")
    hierarchy = CgroupHierarchy(root, min_rescan_s=3600, max_age_s=3600)
    try:
        assert hierarchy.by_handle and hierarchy.watching
        leaf_id = child.id
        assert hierarchy.lookup(leaf_id) == (child.rel, False)
        child.remove()
        cg.children.clear()
        assert hierarchy.lookup(leaf_id) == (child.rel, True)  # gone for certain, path remembered
        hierarchy.tree.close()  # the tree goes stale (next walk in an hour): the kernel answers
        later_dir = root / cg.rel.lstrip("/") / "later"
        later_dir.mkdir()
        try:
            later = os.stat(later_dir).st_ino
            assert later not in hierarchy.tree.ids
            assert hierarchy.lookup(later) == (cg.rel + "/later", False)  # found by handle, without a walk
        finally:
            later_dir.rmdir()
        assert hierarchy.lookup(later) == (cg.rel + "/later", True)  # ESTALE
    finally:
        hierarchy.close()


def test_one_index_per_hierarchy_root(tmp_path: Path) -> None:
    (tmp_path / "v2").mkdir()
    (tmp_path / "cpu").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "v2")
    hierarchies = CgroupHierarchies()
    try:
        v2 = hierarchies.get(tmp_path / "v2")
        assert hierarchies.get(tmp_path / "v2") is v2
        assert hierarchies.get(tmp_path / "link") is v2  # the same directory by another path
        assert hierarchies.get(tmp_path / "cpu") is not v2
    finally:
        hierarchies.close()
    assert not v2.watching  # closed with the registry


@pytest.mark.root
def test_a_walk_that_failed_never_makes_a_live_cgroup_gone(make_cgroup) -> None:
    """With handles, "gone" is the kernel's word: a walk under EMFILE that could not list the
    hierarchy leaves a live cgroup live (was: gone for certain, for good), and so does any walk
    that did not find an id the kernel still opens."""
    cg = make_cgroup("emfile")
    child = cg.child("a")
    code = f"""
from pathlib import Path
from agent.identity.cgroup_hierarchy import CgroupHierarchy
hierarchy = CgroupHierarchy(Path({str(cg.path)!r}), min_rescan_s=3600, max_age_s=3600)
assert hierarchy.by_handle
hierarchy.tree.close()  # walks serve, as without inotify
exhaust()
hierarchy.tree.update(walk_older_than=0)
free()
print(hierarchy.lookup({child.id}))
hierarchy.tree.on_gone({{{child.id}: "/a"}}, False)  # as a walk that missed it (renamed meanwhile) says
print(hierarchy.lookup({child.id}))  # the kernel was asked: live
"""
    assert run_child(code) == ["('/a', False)", "('/a', False)"]

"""CgroupTree: the cgroups of a hierarchy, followed by inotify (and by walks where it cannot be)."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.cgroup_tree import CgroupTree


def test_follows_mkdir_and_rmdir_without_walking(tmp_path: Path) -> None:
    (tmp_path / "a/b").mkdir(parents=True)
    tree = CgroupTree(tmp_path)
    try:
        assert tree.watching and tree.paths == {"/", "/a", "/a/b"}
        (tmp_path / "a/c/d").mkdir(parents=True)
        added, removed = tree.refresh()
        assert added == {"/a/c", "/a/c/d"} and removed == set()
        (tmp_path / "a/c/d").rmdir()
        (tmp_path / "a/c").rmdir()
        added, removed = tree.refresh()
        assert added == set() and removed == {"/a/c", "/a/c/d"}
        assert tree.refresh() == (set(), set())  # nothing changed: nothing read but the queue
    finally:
        tree.close()


def test_without_inotify_it_walks_again_on_its_cadence(tmp_path: Path) -> None:
    tree = CgroupTree(tmp_path, rescan_s=3600)
    tree.close()  # as if inotify were unavailable
    (tmp_path / "x").mkdir()
    assert tree.refresh() == (set(), set())  # walked moments ago
    tree.rescan_s = 0
    assert tree.refresh() == ({"/x"}, set())


@pytest.mark.root
def test_real_cgroupfs_reports_cgroup_creation(make_cgroup) -> None:
    cg = make_cgroup("tree")
    tree = CgroupTree(cg.path)
    try:
        child = cg.child("leaf")
        assert tree.refresh() == ({"/leaf"}, set())
        child.remove()
        cg.children.clear()
        assert tree.refresh() == (set(), {"/leaf"})
    finally:
        tree.close()

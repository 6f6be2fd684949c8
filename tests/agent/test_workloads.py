"""Workload identity over trimmed real cgroup trees (v1, v2; cgroupfs and systemd drivers)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from agent.paths import HostPaths
from agent.workloads import CgroupIdIndex, Workloads, host_cgroup_label, parse_cgroup_path
from probes.series import Lookup

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "cgroup"
TREES = sorted(p.name for p in FIXTURES.iterdir() if (p / "expected.json").is_file())


def load(tree: str) -> tuple[Path, dict]:
    spec = json.loads((FIXTURES / tree / "expected.json").read_text())
    return FIXTURES / tree / spec["hierarchy"], spec["cgroups"]


@pytest.mark.parametrize("tree", TREES)
def test_every_cgroup_of_the_tree_gets_the_expected_identity(tree: str) -> None:
    root, expected = load(tree)
    index = CgroupIdIndex(root)
    index.rescan()
    found = {index.path_of(os.stat(root / p.lstrip("/")).st_ino) for p in expected}
    assert found == set(expected)  # the id index finds every directory by its inode
    workloads = Workloads(root)
    for path, want in expected.items():
        ident = parse_cgroup_path(path)
        assert list(workloads.labels_for_path(path)) == want["labels"], path
        assert ident.pod_uid == want.get("pod_uid", ""), path
        assert ident.container_id == want.get("container_id", ""), path
        assert ident.runtime == want.get("runtime", ""), path
        assert ident.qos == want.get("qos", ""), path
        assert list(workloads.labels_for_cgroup_id(os.stat(root / path.lstrip("/")).st_ino)) == want["labels"]


def test_trees_cover_both_versions_and_drivers() -> None:
    assert any(t.startswith("v1-") for t in TREES) and any(t.startswith("v2-") for t in TREES)
    assert any("cgroupfs" in t for t in TREES) and any("systemd" in t for t in TREES)


class Names:
    version = 1

    def names(self, pod_uid: str, container_id: str) -> tuple[str, str, str] | None:
        if pod_uid == "a1b2c3d4-e5f6-4711-8899-aabbccddeeff":
            return ("cache", "redis-0", "redis" if container_id else "")
        return None


def test_known_pod_gets_names_and_empty_cgroup() -> None:
    path = (
        "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-poda1b2c3d4_e5f6_4711_8899_aabbccddeeff.slice/cri-containerd-"
        + "b" * 64
        + ".scope"
    )
    workloads = Workloads(None, pod_names=Names())
    assert workloads.labels_for_path(path) == ("cache", "redis-0", "redis", "")
    other = path.replace("a1b2c3d4", "ffffffff")
    assert workloads.labels_for_path(other) == ("", "", "", other)  # pod not known yet: full path
    assert workloads.labels_for_cgroup_id(1) is None  # no hierarchy: no id lookups
    assert workloads.resolve(1) == Lookup(None, False)


@pytest.mark.parametrize(
    ("path", "label"),
    [
        ("/", "/"),
        ("", "/"),
        ("/system.slice", "/system.slice"),
        ("/system.slice/redis.service/worker", "/system.slice/redis.service"),
        ("/user.slice/user-0.slice/session-1.scope", "/user.slice/user-0.slice"),
    ],
)
def test_host_cgroups_cut_to_two_levels(path: str, label: str) -> None:
    assert host_cgroup_label(path) == label


@pytest.mark.parametrize(
    "path",
    [
        "/system.slice/pod1234.service",  # "pod" without a kubepods ancestor
        "/kubepods/burstable/podnot-a-uid",
        "/docker/" + "a" * 64,  # plain docker container, not Kubernetes
    ],
)
def test_lookalikes_are_not_pods(path: str) -> None:
    assert not parse_cgroup_path(path).is_pod


def test_index_rescans_on_miss_but_not_more_often_than_allowed(tmp_path: Path) -> None:
    index = CgroupIdIndex(tmp_path, min_rescan_s=3600)
    assert not index.by_handle  # not a cgroupfs: the walk serves
    assert index.path_of(os.stat(tmp_path).st_ino) == "/"
    (tmp_path / "new").mkdir()
    assert index.path_of(os.stat(tmp_path / "new").st_ino) is None  # scanned moments ago: no rescan
    index.min_rescan_s = 0
    assert index.path_of(os.stat(tmp_path / "new").st_ino) == "/new"


def test_walking_index_tells_gone_from_unknown(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    a = os.stat(tmp_path / "a").st_ino
    index = CgroupIdIndex(tmp_path, min_rescan_s=0)
    assert index.lookup(a) == ("/a", False)
    (tmp_path / "a").rmdir()
    index.max_age_s = 0  # the next lookup walks again
    assert index.lookup(a) == ("/a", True)  # gone, last path kept for its labels
    never = 987654321
    index.max_age_s = 3600
    index.min_rescan_s = 3600
    assert index.lookup(never) == (None, False)  # asked after the last walk: unknown, not gone
    index.rescan()
    assert index.lookup(never) == (None, True)  # a whole walk since it was asked did not find it


@pytest.mark.root
def test_real_hierarchy_path_and_id_resolve_to_each_other(make_cgroup) -> None:
    """A task's cgroup as the kernel reports it (/proc/<pid>/cgroup) is the path the index gives
    for the directory's inode (the BPF-side identity is checked in tests/probes/test_runqlat.py)."""
    cg = make_cgroup("ident")
    proc = cg.spawn(["/bin/sleep", "30"])
    line = next(ln for ln in Path(f"/proc/{proc.pid}/cgroup").read_text().splitlines() if ln.startswith("0::"))
    assert line == f"0::{cg.rel}"
    workloads = Workloads(HostPaths().cgroup_v2())
    assert workloads.index.by_handle  # root: open_by_handle_at works on cgroupfs
    assert workloads.labels_for_cgroup_id(cg.id) == ("", "", "", cg.rel)


@pytest.mark.root
@pytest.mark.parametrize("controller", ["unified", "cpu"])
def test_open_by_handle_knows_gone_from_unknown_on_both_hierarchies(make_cgroup, controller: str) -> None:
    paths = HostPaths()
    root = paths.cgroup_v2() if controller == "unified" else paths.cgroup_v1("cpu")
    if root is None:
        pytest.skip(f"no {controller} hierarchy")
    cg = make_cgroup("handle", root=root)
    child = cg.child("leaf")
    index = CgroupIdIndex(root, min_rescan_s=3600, max_age_s=3600)
    assert index.by_handle
    leaf_id = child.id
    assert index.lookup(leaf_id) == (child.rel, False)
    child.remove()
    assert index.lookup(leaf_id) == (child.rel, True)  # ESTALE: gone for certain, path remembered
    (root / cg.rel.lstrip("/") / "later").mkdir()
    later = os.stat(root / cg.rel.lstrip("/") / "later").st_ino
    assert index.lookup(later) == (cg.rel + "/later", False)  # new cgroup found without a walk
    os.rmdir(root / cg.rel.lstrip("/") / "later")


def test_workload_hierarchy_choice(tmp_path: Path) -> None:
    cg = tmp_path / "sys/fs/cgroup"
    (cg / "unified").mkdir(parents=True)
    (cg / "unified/cgroup.controllers").write_text("")
    (cg / "cpu,cpuacct/kubepods/burstable").mkdir(parents=True)
    paths = HostPaths(tmp_path)
    assert paths.workload_hierarchy("auto") == ("cpu", cg / "cpu,cpuacct")  # pods only in v1
    assert paths.workload_hierarchy("unified") == ("unified", cg / "unified")
    (cg / "unified/kubepods.slice").mkdir()
    assert paths.workload_hierarchy("auto") == ("unified", cg / "unified")  # v2 holds pods too

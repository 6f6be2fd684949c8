"""Workload identity over trimmed real cgroup trees (v1, v2; cgroupfs and systemd drivers)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from agent.identity.cgroup_hierarchy import CgroupHierarchy
from agent.identity.workloads import Workloads, host_cgroup_label, parse_cgroup_path
from host.paths import HostPaths
from metrics.workload_series import Lookup

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "cgroup"
TREES = sorted(p.name for p in FIXTURES.iterdir() if (p / "expected.json").is_file())


def load(tree: str) -> tuple[Path, dict]:
    spec = json.loads((FIXTURES / tree / "expected.json").read_text())
    return FIXTURES / tree / spec["hierarchy"], spec["cgroups"]


@pytest.mark.parametrize("tree", TREES)
def test_every_cgroup_of_the_tree_gets_the_expected_identity(tree: str) -> None:
    root, expected = load(tree)
    hierarchy = CgroupHierarchy(root)
    try:
        found = {hierarchy.lookup(os.stat(root / p.lstrip("/")).st_ino) for p in expected}
        assert found == {(p, False) for p in expected}  # the index finds every directory by its inode
        workloads = Workloads(hierarchy)
        for path, want in expected.items():
            ident = parse_cgroup_path(path)
            assert list(workloads.labels_for_path(path)) == want["labels"], path
            assert ident.pod_uid == want.get("pod_uid", ""), path
            assert ident.container_id == want.get("container_id", ""), path
            assert ident.runtime == want.get("runtime", ""), path
            assert ident.qos == want.get("qos", ""), path
            found = workloads.resolve(os.stat(root / path.lstrip("/")).st_ino)
            assert found == Lookup(tuple(want["labels"]), False), path
    finally:
        hierarchy.close()


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
    assert workloads.resolve(1) == Lookup(None, False)  # no hierarchy: no id lookups


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


@pytest.mark.root
def test_real_hierarchy_path_and_id_resolve_to_each_other(make_cgroup) -> None:
    """A task's cgroup as the kernel reports it (/proc/<pid>/cgroup) is the path the index gives
    for the directory's inode (the BPF-side identity is checked in tests/probes/test_runqlat.py)."""
    cg = make_cgroup("ident")
    proc = cg.spawn(["/bin/sleep", "30"])
    line = next(ln for ln in Path(f"/proc/{proc.pid}/cgroup").read_text().splitlines() if ln.startswith("0::"))
    assert line == f"0::{cg.rel}"
    hierarchy = CgroupHierarchy(HostPaths().cgroup_v2())
    try:
        assert hierarchy.by_handle  # root: open_by_handle_at works on cgroupfs
        assert Workloads(hierarchy).resolve(cg.id) == Lookup(("", "", "", cg.rel), False)
    finally:
        hierarchy.close()


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


def test_a_cgroup_name_that_is_not_utf8_gets_a_label_the_exposition_can_encode(make_cgroup) -> None:
    """cgroupfs takes any bytes in a name; the label writes what is not UTF-8 as \\xNN (before, the
    surrogate escapes of os.fsdecode() reached the exposition and every scrape failed to encode)."""
    cg = make_cgroup("utf8")
    child = os.path.join(os.fsencode(cg.path), b"bad\xff")
    os.mkdir(child)
    hierarchy = CgroupHierarchy(HostPaths().cgroup_v2())
    try:
        labels = Workloads(hierarchy).resolve(os.stat(child).st_ino).labels
        assert labels == ("", "", "", host_cgroup_label(cg.rel + "/bad\\xff")), labels
        assert labels[3].encode()  # the exposition encodes it
        assert Workloads(hierarchy).labels_for_path(cg.rel)[3] == host_cgroup_label(cg.rel)  # valid: as it is
    finally:
        hierarchy.close()
        os.rmdir(child)

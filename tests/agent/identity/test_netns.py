"""Network namespaces get the contract's labels: pod names, host, a name, or net:[inode]."""

from __future__ import annotations

import os
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from agent.identity.cgroup_hierarchy import CgroupHierarchy
from agent.identity.kube import PodIndex
from agent.identity.netns import NetnsIndex, netns_inode
from agent.identity.workloads import Workloads
from host.paths import HostPaths
from tests.agent.identity.fd_exhaustion import run_child
from tests.fake_apiserver import pod

UID = "0a1b2c3d-0000-4000-8000-0000000000ee"


def test_netns_inode() -> None:
    assert netns_inode("net:[4026531840]") == 4026531840
    assert netns_inode("mnt:[1]") is None


@pytest.mark.root
def test_pod_host_named_and_anonymous_namespaces(make_cgroup) -> None:
    from kubernetes.client import ApiClient

    paths = HostPaths()
    root = paths.cgroup_v2()
    name = f"nodetune-test-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    anon = None
    hierarchy = None
    top = make_cgroup("netns")
    try:
        pod_cg = top.child("kubepods").child("burstable").child(f"pod{UID}")
        pod_cg.child("0" * 64)  # a container cgroup with no process left, first in name order
        container = pod_cg.child("f" * 64)
        # a process of the pod lives in the named namespace (as a CNI would set up the pod's)
        container.spawn(["ip", "netns", "exec", name, "sleep", "30"])
        anon = subprocess.Popen(["unshare", "-n", "sleep", "30"])  # no name, no pod
        index_pods = PodIndex("n1")
        hierarchy = CgroupHierarchy(root)
        workloads = Workloads(hierarchy, pod_names=index_pods)
        own = os.readlink("/proc/self/ns/net")
        for _ in range(100):  # both have entered their namespaces (ip netns exec, unshare -n)
            pids = container.pids()
            if (
                pids
                and os.readlink(f"/proc/{pids[0]}/ns/net") != own
                and os.readlink(f"/proc/{anon.pid}/ns/net") != own
            ):
                break
            time.sleep(0.05)
        index = NetnsIndex(paths, workloads)
        assert index.hierarchy is hierarchy  # the identity service's index: no tree of its own
        pod_ns = netns_inode(os.readlink(f"/proc/{container.pids()[0]}/ns/net"))
        host_ns = index.host
        anon_ns = netns_inode(os.readlink(f"/proc/{anon.pid}/ns/net"))
        assert host_ns is not None and index.labels(host_ns) == ("", "", "host")
        assert index.labels(anon_ns) == ("", "", f"net:[{anon_ns}]")
        assert index.labels(pod_ns) == ("", "", name)  # pod not known to the API yet: its name
        obj = ApiClient()._ApiClient__deserialize(pod(UID, "web-0", "n1", {"nginx": "f" * 64}, "shop"), "V1Pod")
        index_pods.apply("ADDED", obj)
        assert index.labels(pod_ns) == ("shop", "web-0", "")  # names known: the pod's netns
        index.close()
    finally:
        if anon is not None:
            anon.kill()
            anon.wait()
        if hierarchy is not None:
            hierarchy.close()
        top.remove()
        subprocess.run(["ip", "netns", "delete", name], check=True)
    assert not Path(f"/run/netns/{name}").exists()


def test_an_index_that_failed_to_start_leaves_no_log_on_the_shared_hierarchy(tmp_path: Path) -> None:
    """NetnsIndex subscribes to the identity service's hierarchy: when its first refresh fails
    (here EMFILE listing a pod's cgroup), the subscription is closed, not left to grow."""
    (tmp_path / "kubepods/burstable" / f"pod{uuid.uuid4()}").mkdir(parents=True)
    code = f"""
from pathlib import Path
from agent.identity.cgroup_hierarchy import CgroupHierarchy
from agent.identity.netns import NetnsIndex
from agent.identity.workloads import Workloads
from host.paths import HostPaths
hierarchy = CgroupHierarchy(Path({str(tmp_path)!r}))
exhaust()
try:
    NetnsIndex(HostPaths(), Workloads(hierarchy))
except OSError as e:
    print(e.strerror)
free()
print(len(hierarchy.tree._subscribers))
"""
    assert run_child(code) == ["Too many open files", "0"]

"""Network namespaces under churn: a scrape's handles outlive a refresh that retires them, a
namespace is opened only if it is the one looked up (pids get recycled), and a recreated pod
sandbox moves the pod's labels to its new namespace and releases the old one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from agent.identity.cgroup_hierarchy import CgroupHierarchy
from agent.identity.kube import PodIndex
from agent.identity.netns import NetnsIndex, netns_inode, open_handles
from agent.identity.workloads import Workloads
from host.paths import HostPaths
from tests.conftest import wait_until
from tests.fake_apiserver import pod

UID = "0a1b2c3d-0000-4000-8000-0000000000ef"


@pytest.mark.root
def test_a_scrape_keeps_its_handles_until_done_even_if_a_refresh_retires_them() -> None:
    name = f"nodetune-test-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    index = NetnsIndex(HostPaths(), Workloads(None))
    try:
        ns = next(i for i in index.handles if index.labels(i)[2] == name)
        with index.borrow() as held:
            h = held[ns]
            subprocess.run(["ip", "netns", "delete", name], check=True)
            index.refresh()  # the namespace is gone: retired...
            assert ns not in index.handles
            assert not h.closed  # ...but not closed under the scrape that holds it
            assert "TcpExt:" in h.read(h.netstat_fd)
            assert h.diag.listeners() == []
        assert h.closed and h.diag.sock.fileno() == -1  # closed once the scrape is done
        with index.borrow() as held:
            assert ns not in held
    finally:
        index.close()
        subprocess.run(["ip", "netns", "delete", name], check=False)


@pytest.mark.root
def test_a_namespace_is_opened_only_if_it_is_the_one_looked_up() -> None:
    own = netns_inode(os.readlink("/proc/self/ns/net"))
    h = open_handles("/proc/self/ns/net", own)
    h.close()
    with pytest.raises(ProcessLookupError):
        open_handles("/proc/self/ns/net", own + 1)  # as if the pid had been recycled meanwhile


@pytest.mark.root
def test_a_recreated_sandbox_moves_the_pod_to_its_new_namespace_and_frees_the_old(make_cgroup) -> None:
    from kubernetes.client import ApiClient

    paths = HostPaths()
    root = paths.cgroup_v2()
    top = make_cgroup("netns")
    pod_cg = top.child("kubepods").child("besteffort").child(f"pod{UID}")
    sandbox = pod_cg.child("a" * 64)
    own = os.readlink("/proc/self/ns/net")

    def start_sandbox() -> int:
        proc = sandbox.spawn(["unshare", "-n", "sleep", "60"])  # a pause container: its own netns
        wait_until(lambda: os.readlink(f"/proc/{proc.pid}/ns/net") != own)
        return netns_inode(os.readlink(f"/proc/{proc.pid}/ns/net"))

    old_ns = start_sandbox()
    pods = PodIndex("n1")
    hierarchy = CgroupHierarchy(root)
    index = NetnsIndex(paths, Workloads(hierarchy, pod_names=pods))
    try:
        obj = ApiClient()._ApiClient__deserialize(pod(UID, "cache-0", "n1", {"redis": "b" * 64}, "shop"), "V1Pod")
        pods.apply("ADDED", obj)
        assert index.labels(old_ns) == ("shop", "cache-0", "")
        old_handles = index.handles[old_ns]
        sandbox.stop()  # the sandbox is recreated: same pod, same cgroup, a new namespace
        new_ns = start_sandbox()
        assert new_ns != old_ns
        index.refresh()
        assert index.labels(new_ns) == ("shop", "cache-0", "")
        assert new_ns in index.handles
        assert old_ns not in index.handles and old_handles.closed  # the old namespace is released
        assert index.labels(old_ns) == ("", "", f"net:[{old_ns}]")
    finally:
        index.close()
        hierarchy.close()


@pytest.mark.root
def test_a_namespace_the_agent_may_not_enter_is_said_not_skipped_silently(tmp_path) -> None:
    """Without the capability to enter a namespace (setns EPERM), the namespace is listed as
    unreadable, exported as nodetune_netns_unreadable and logged, not silently left out."""
    name = f"nodetune-test-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    # An unprivileged user namespace cannot setns into a namespace owned by the initial user ns:
    # the index runs in a child that dropped to such a user namespace (unshare -U) and reports.
    code = f"""
import json, sys
sys.path.insert(0, {str(Path(__file__).resolve().parents[3])!r})
from agent.collectors.ports import PortsCollector
from agent.identity.netns import NetnsIndex
from host.paths import HostPaths
from agent.identity.workloads import Workloads
index = NetnsIndex(HostPaths(), Workloads(None))
families = {{f.name: f.samples for f in PortsCollector(index).collect()}}
rows = [s.labels["netns"] for s in families["nodetune_netns_unreadable"] if s.value == 1]
print(json.dumps(rows))
"""
    try:
        res = subprocess.run(["unshare", "-U", sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=False)
    assert res.returncode == 0, res.stderr
    assert name in json.loads(res.stdout.strip().splitlines()[-1]), res.stdout + res.stderr
    assert "cannot be entered" in res.stderr

"""The tuning engine on the real kernel, restoring what it changes: per-namespace sysctls in a
network namespace made by the test (the host's own values are never touched), and THP on the
machine (put back by the test whatever happens)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.root

THP = Path("/sys/kernel/mm/transparent_hugepage")


def nodetune_in(ns: str | None, *args: str) -> subprocess.CompletedProcess[str]:
    prefix = ["ip", "netns", "exec", ns] if ns else []
    return subprocess.run(
        [*prefix, sys.executable, "-m", "agent.cli", "tune", *args], cwd=REPO, capture_output=True, text=True
    )


def sysctl_in(ns: str, key: str) -> str:
    out = subprocess.run(["ip", "netns", "exec", ns, "sysctl", "-n", key], capture_output=True, text=True, check=True)
    return " ".join(out.stdout.split())


def host_sysctl(key: str) -> str:
    return " ".join(Path("/proc/sys", *key.split(".")).read_text().split())


def test_namespace_sysctls_apply_verify_revert(netns, tmp_path: Path) -> None:
    ns = netns("32768 60999").name
    before = {k: sysctl_in(ns, k) for k in ("net.core.somaxconn", "net.ipv4.ip_local_port_range")}
    host_before = {k: host_sysctl(k) for k in before}
    profile = tmp_path / "p.yaml"
    profile.write_text(
        "name: ns\nsysctl:\n  net.core.somaxconn: '>=20480'\n  net.ipv4.ip_local_port_range: '10240 65000'\n"
    )
    state = ["--profile", str(profile), "--state-dir", str(tmp_path / "state")]
    assert nodetune_in(ns, "plan", *state).returncode == 1
    applied = nodetune_in(ns, "apply", *state)
    assert applied.returncode == 0, applied.stderr
    assert "per network namespace" in applied.stderr
    assert sysctl_in(ns, "net.core.somaxconn") == "20480"
    assert sysctl_in(ns, "net.ipv4.ip_local_port_range") == "10240 65000"
    assert {k: host_sysctl(k) for k in before} == host_before  # only the namespace changed
    assert nodetune_in(ns, "verify", *state).returncode == 0
    reverted = nodetune_in(ns, "revert", "--state-dir", str(tmp_path / "state"))
    assert reverted.returncode == 0, reverted.stderr
    assert {k: sysctl_in(ns, k) for k in before} == before


def test_kernel_refusing_a_write_rolls_back_the_run_and_exits_3(netns, tmp_path: Path) -> None:
    """ip_default_ttl's handler takes 1..255 (net/ipv4/sysctl_net_ipv4.c, ip_ttl_min/max), a bound
    validation does not know (somaxconn's -5, the old example, is now refused at validation): 256
    is EINVAL at write time, after the port range was already written - which must be put back."""
    ns = netns("32768 60999").name
    profile = tmp_path / "p.yaml"
    profile.write_text(
        "name: bad\nsysctl:\n  net.ipv4.ip_local_port_range: '20000 30000'\n  net.ipv4.ip_default_ttl: '256'\n"
    )
    before = {k: sysctl_in(ns, k) for k in ("net.ipv4.ip_default_ttl", "net.ipv4.ip_local_port_range")}
    res = nodetune_in(ns, "apply", "--profile", str(profile), "--state-dir", str(tmp_path / "state"))
    assert res.returncode == 3, res.stderr
    assert "rolled back (net.ipv4.ip_local_port_range put back)" in res.stderr
    assert {k: sysctl_in(ns, k) for k in before} == before
    assert not (tmp_path / "state/tuning-journal.json").exists()


def test_thp_on_this_machine_applied_and_restored(tmp_path: Path) -> None:
    if not (THP / "enabled").exists():
        pytest.skip("no transparent hugepages on this kernel")
    original = (THP / "enabled").read_text()
    mode = original.split("[")[1].split("]")[0]
    target = "never" if mode != "never" else "madvise"
    profile = tmp_path / "p.yaml"
    profile.write_text(f"name: thp\nthp: {{enabled: {target}}}\n")
    state = ["--profile", str(profile), "--state-dir", str(tmp_path / "state")]
    try:
        res = nodetune_in(None, "apply", *state)
        assert res.returncode == 0, res.stderr
        assert f"[{target}]" in (THP / "enabled").read_text()
        assert nodetune_in(None, "verify", *state).returncode == 0
        res = nodetune_in(None, "revert", "--state-dir", str(tmp_path / "state"))
        assert res.returncode == 0, res.stderr
        assert (THP / "enabled").read_text() == original
    finally:
        (THP / "enabled").write_text(mode)

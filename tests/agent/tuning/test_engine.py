"""The tuning engine on fixture host trees: round trips, invalid profiles that touch nothing,
rollback, SIGKILL in the middle of an apply, a corrupt journal, a reboot."""

from __future__ import annotations

import argparse
import io
import json
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from agent.tuning import command
from agent.tuning.engine import ApplyFailed, Engine
from agent.tuning.profile import parse
from agent.tuning.validate import build
from host.paths import HostPaths
from tests.agent.tuning.hosttree import make_host, snapshot, value

PROFILE = """
name: redis-latency
sysctl:
  net.core.somaxconn: ">=20480"
  fs.file-max: ">=655350"
  vm.max_map_count: "262144"
  net.ipv4.ip_local_port_range: "10240 65000"
thp: {enabled: never, defrag: never}
"""
ORIGINAL = {
    "proc/sys/net/core/somaxconn": "4096",
    "proc/sys/fs/file-max": "9223372036854775807",
    "proc/sys/vm/max_map_count": "65530",
    "proc/sys/net/ipv4/ip_local_port_range": "32768 60999",
    "sys/kernel/mm/transparent_hugepage/enabled": "always [madvise] never",
    "sys/kernel/mm/transparent_hugepage/defrag": "always defer defer+madvise [madvise] never",
}
DESIRED = {
    "proc/sys/net/core/somaxconn": "20480",
    "proc/sys/fs/file-max": "9223372036854775807",  # ">=" never lowers
    "proc/sys/vm/max_map_count": "262144",
    "proc/sys/net/ipv4/ip_local_port_range": "10240 65000",
    "sys/kernel/mm/transparent_hugepage/enabled": "never",
    "sys/kernel/mm/transparent_hugepage/defrag": "never",
}


def tune(action: str, root: Path, profile: str | None = PROFILE, tmp: Path | None = None) -> tuple[int, str, str]:
    path = None
    if profile is not None:
        path = (tmp or root.parent) / "profile.yaml"
        path.write_text(profile)
    args = argparse.Namespace(
        action=action, profile=str(path) if path else None, host_root=str(root), state_dir=None, node_labels=None
    )
    out, err = io.StringIO(), io.StringIO()
    code = command.run(args, out, err)
    return code, out.getvalue(), err.getvalue()


def values(root: Path) -> dict[str, str]:
    return {rel: value(root, rel) for rel in ORIGINAL}


def thp_mode(text: str) -> str:
    return text.split("[")[1].split("]")[0] if "[" in text else text


def semantic(vals: dict[str, str]) -> dict[str, str]:
    """THP files as their mode (a fixture file is not rewritten with brackets as the kernel's are)."""
    return {k: thp_mode(v) if "transparent_hugepage" in k else v for k, v in vals.items()}


@pytest.fixture
def host(tmp_path: Path) -> Path:
    return make_host(tmp_path / "host")


def test_plan_apply_verify_revert_round_trip(host: Path) -> None:
    code, out, err = tune("plan", host)
    assert code == 1
    assert "change: sysctl net.core.somaxconn: '4096' -> '20480'" in out
    assert "fs.file-max" not in out  # already above the floor
    assert "per network namespace" in err and "securityContext.sysctls" in err  # somaxconn, port range
    assert values(host) == ORIGINAL  # plan wrote nothing
    assert not (host / "var/lib/nodetune").exists()
    code, out, _ = tune("apply", host)
    assert code == 0 and out.count("applied:") == 5
    assert semantic(values(host)) == semantic(DESIRED)
    journal = json.loads((host / "var/lib/nodetune/tuning-journal.json").read_text())
    assert journal["entries"]["sysctl/net.core.somaxconn"]["original"] == "4096"
    assert journal["applying"] is None and journal["boot_id"].startswith("11111111")
    assert tune("verify", host)[0] == 0
    assert tune("apply", host)[1].startswith("profile redis-latency: in sync")
    (host / "proc/sys/vm/max_map_count").write_text("100\n")  # drift
    code, out, _ = tune("verify", host)
    assert code == 1 and "drift: sysctl vm.max_map_count: '100' -> '262144'" in out
    code, out, _ = tune("revert", host, profile=None)
    assert code == 0 and "reverted 5 key(s)" in out
    assert semantic(values(host)) == semantic(ORIGINAL)
    assert not (host / "var/lib/nodetune/tuning-journal.json").exists()


@pytest.mark.parametrize(
    ("profile", "message"),
    [
        ("name: x\nsysctl: {net.core.no_such_key: 1}", "no such kernel parameter"),
        ("name: x\nsysctl: {net.ipv4.ip_local_port_range: '40000'}", "expected 2 whole number"),
        ("name: x\nsysctl: {net.ipv4.ip_local_port_range: '60000 1024'}", "LOW <= HIGH"),
        ("name: x\nsysctl: {net.ipv4.ip_local_port_range: '>=1024'}", "single-number"),
        ("name: x\nsysctl: {net.core.somaxconn: lots}", "whole number"),
        ("name: x\nsysctl: {kernel.random.boot_id: abc}", "read-only"),
        ("name: x\nthp: {enabled: sometimes}", "thp.enabled"),
        ("name: x\nirq_balance: {enabled: false}", "irq_balance"),
        ("name: x\nirq_affinity: {interfaces: [nope0], cpus: '0'}", "no interface 'nope0'"),
        ("name: x\nirq_affinity: {interfaces: [eth0], cpus: '0-3'}", "2-3 not online"),
        ("name: x\nirq_affinity: {interfaces: [eth0], cpus: ''}", "empty CPU list"),
        ("name: x\nirq_affinity: {interfaces: ['../../x'], cpus: '0'}", "not an interface name"),
        ("name: x\nkmod: {load: [ip_vs, '/tmp/evil.ko']}", "not in the allowlist"),
        ("name: x\nsysctl: {net.core.somaxconn: 1, net.core.nope: 2, vm.nope: 3}", "net.core.nope.*vm.nope"),
        ("name: [", "not YAML"),
    ],
)
def test_invalid_profile_exits_2_and_leaves_the_host_byte_identical(host: Path, profile: str, message: str) -> None:
    before = snapshot(host)
    for action in ("plan", "apply", "verify"):
        code, out, err = tune(action, host, profile)
        assert code == 2, (action, out, err)
        assert re.search(message, err), err
    assert snapshot(host) == before


def test_thp_mode_the_kernel_does_not_offer_is_invalid(tmp_path: Path) -> None:
    host = make_host(tmp_path / "host", sys__kernel__mm__transparent_hugepage__enabled="[always] madvise\n")
    code, _, err = tune("apply", host, "name: x\nthp: {enabled: never}")
    assert code == 2 and "not offered by this kernel (always, madvise)" in err


def test_a_failed_write_puts_back_this_runs_keys_and_exits_3(host: Path) -> None:
    (profile,) = parse(PROFILE)
    items, _ = build(profile, HostPaths(host))
    steps: list[str] = []

    def fail_third_journal(step: str) -> None:
        steps.append(step)
        if sum(s.startswith("journal") for s in steps) == 3:
            raise OSError(5, "Input/output error")  # as the kernel refuses a write

    with pytest.raises(ApplyFailed) as e:
        Engine(HostPaths(host), items, profile.name, on_step=fail_third_journal).apply()
    assert [c.key for c in e.value.restored] == ["net.core.somaxconn", "vm.max_map_count"]
    assert values(host) == ORIGINAL
    assert not (host / "var/lib/nodetune/tuning-journal.json").exists()


STEPS = ["journal sysctl/net.core.somaxconn", "write sysctl/net.core.somaxconn", "journal sysctl/vm.max_map_count",
         "write sysctl/vm.max_map_count", "journal sysctl/net.ipv4.ip_local_port_range",
         "write sysctl/net.ipv4.ip_local_port_range", "journal thp/enabled", "write thp/enabled",
         "journal thp/defrag", "write thp/defrag", "done"]  # fmt: skip

KILLER = """
import os, signal, sys
from pathlib import Path
from host.paths import HostPaths
from agent.tuning.engine import Engine
from agent.tuning.profile import parse
from agent.tuning.validate import build
root, text, kill_at = Path(sys.argv[1]), Path(sys.argv[2]).read_text(), sys.argv[3]
(profile,) = parse(text)
items, _ = build(profile, HostPaths(root))
def step(name):
    if name == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
Engine(HostPaths(root), items, profile.name, on_step=step).apply()
"""


@pytest.mark.parametrize("kill_at", STEPS)
def test_sigkill_after_any_step_leaves_all_original_or_all_desired(tmp_path: Path, kill_at: str) -> None:
    host = make_host(tmp_path / "host")
    (tmp_path / "profile.yaml").write_text(PROFILE)
    proc = subprocess.run(
        [sys.executable, "-c", KILLER, str(host), str(tmp_path / "profile.yaml"), kill_at],
        cwd=Path(__file__).resolve().parents[3],
    )
    assert proc.returncode == -signal.SIGKILL
    code, _, err = tune("verify", host)  # the next start: loads the journal, finishes the run
    after = semantic(values(host))
    if kill_at == "done":
        assert after == semantic(DESIRED) and code == 0
    else:
        assert after == semantic(ORIGINAL), kill_at
        assert "was interrupted" in err and code == 1
        assert not (host / "var/lib/nodetune/tuning-journal.json").exists()


def test_corrupt_journal_stops_everything(host: Path) -> None:
    journal = host / "var/lib/nodetune/tuning-journal.json"
    journal.parent.mkdir(parents=True)
    journal.write_text('{"version": 1, "entries": ')
    before = snapshot(host)
    for action in ("apply", "revert", "verify"):
        code, _, err = tune(action, host, None if action == "revert" else PROFILE)
        assert code == 2 and "corrupt journal" in err
    assert snapshot(host) == before


def test_after_a_reboot_originals_are_re_read_not_restored(host: Path) -> None:
    assert tune("apply", host)[0] == 0
    boot_id = host / "proc/sys/kernel/random/boot_id"
    boot_id.chmod(0o644)
    boot_id.write_text("99999999-2222-3333-4444-555555555555\n")
    (host / "proc/sys/net/core/somaxconn").write_text("128\n")  # the kernel's boot value
    code, _, err = tune("revert", host, profile=None)
    assert code == 0 and "rebooted since the journal was written" in err
    assert value(host, "proc/sys/net/core/somaxconn") == "128"  # not the pre-reboot 4096
    assert tune("apply", host)[0] == 0
    journal = json.loads((host / "var/lib/nodetune/tuning-journal.json").read_text())
    assert journal["entries"]["sysctl/net.core.somaxconn"]["original"] == "128"


def test_sysctl_d_conflicts_and_thp_boot_parameter_are_reported(tmp_path: Path) -> None:
    host = make_host(tmp_path / "host", proc__cmdline="quiet transparent_hugepage=always\n")
    (host / "etc/sysctl.d").mkdir(parents=True)
    (host / "etc/sysctl.d/99-db.conf").write_text("# db\nnet.core.somaxconn = 1024\nvm.swappiness=1\n")
    code, out, err = tune("plan", host)
    assert code == 1
    assert "/etc/sysctl.d/99-db.conf sets '1024'" in err
    assert "left to the kernel command line (transparent_hugepage=always)" in err
    assert "thp enabled" not in out and "thp defrag" in out  # enabled deferred, defrag still managed

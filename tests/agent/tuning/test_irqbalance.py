"""The irqbalance item with real irqbalance processes: only the host's own daemon (its binary, run
by root, in the host's pid namespace) is ever stopped, and it is started again the way the host
starts it, never from a command line found in /proc.

The "host" is injected (tests/agent/tuning/hostns.py): a pid + mount namespace made by the test,
or a directory of links to chosen processes. No test reads or signals the machine's own PID 1 or
an irqbalance it did not start, and every irqbalance the tests start has a read-only /proc/irq.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from agent.tuning.base import Change, TuningError
from agent.tuning.engine import Engine
from agent.tuning.irqbalance import IrqbalanceItem, host_irqbalance, scan
from agent.tuning.journal import Entry, Journal
from host.paths import HostPaths
from tests.agent.tuning.hostns import (
    IRQBALANCE,
    SandboxHost,
    linked_host,
    remove_world_dir,
    wait_for,
    wait_gone,
    world_dir,
)
from tests.conftest import REPO

pytestmark = pytest.mark.root

NOBODY = 65534
# For an irqbalance run by root outside a SandboxHost: a private /run, and /proc/irq read-only
# (it moves no IRQ of the machine's).
ISOLATE = "mount -t tmpfs tmpfs /run && mount --bind /proc/irq /proc/irq && mount -o remount,bind,ro /proc/irq"


@pytest.fixture(autouse=True)
def _needs_irqbalance() -> None:
    if not Path(IRQBALANCE).is_file() or shutil.which("nsenter") is None:
        pytest.fail(f"{IRQBALANCE} or nsenter missing: scripts/bootstrap.sh test installs irqbalance")


@pytest.fixture
def sandbox(tmp_path: Path, request: pytest.FixtureRequest):
    box = SandboxHost(tmp_path, **getattr(request, "param", {}))
    try:
        yield box
    finally:
        box.close()


def tune(action: str, host: Path, state: Path, profile: Path | None = None) -> subprocess.CompletedProcess[str]:
    args = [sys.executable, "-m", "agent.cli", "tune", action, "--host-root", str(host), "--state-dir", str(state)]
    if profile is not None:
        args += ["--profile", str(profile)]
    return subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=120)


def children(pid: int) -> list[int]:
    return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def test_an_impostor_named_irqbalance_is_never_signalled_nor_its_command_line_run(tmp_path: Path) -> None:
    """The reproduction: a process of `nobody`'s named irqbalance, a script that records `id` when
    root runs it. `tune apply` then `tune revert` used to SIGTERM it and run its command line as
    root (the file read uid=0(root))."""
    world = world_dir("nodetune-impostor-")
    script, proof = world / "irqbalance", world / "ran-as"
    script.write_text(f'#!/bin/sh\nif [ "$(id -u)" = 0 ]; then id >{proof}; exit 0; fi\nread _\n')
    script.chmod(0o755)
    impostor = subprocess.Popen([str(script)], stdin=subprocess.PIPE, user=NOBODY, group=NOBODY, extra_groups=[])
    try:
        wait_for(lambda: comm(impostor.pid) == "irqbalance", "the impostor")
        host = linked_host(tmp_path / "host", os.getpid(), [impostor.pid])  # same pid namespace as the host
        profile = tmp_path / "p.yaml"
        profile.write_text("name: p\nirqbalance: {enabled: false}\n")
        applied = tune("apply", host, tmp_path / "state", profile)
        reverted = tune("revert", host, tmp_path / "state")
        assert not proof.exists(), f"ran as root: {proof.read_text()}"
        assert impostor.poll() is None, "the impostor was signalled"
        assert applied.returncode == 0 and reverted.returncode == 0, applied.stderr + reverted.stderr
        assert "in sync" in applied.stdout
        assert f"pid {impostor.pid} is named irqbalance but left alone: its executable is not" in applied.stderr
    finally:
        impostor.stdin.close()
        impostor.kill()
        impostor.wait(timeout=10)
        remove_world_dir(world)


def test_the_real_binary_run_by_a_user_is_not_the_hosts(tmp_path: Path) -> None:
    # nobody cannot write /proc/irq: this irqbalance moves nothing.
    user = subprocess.Popen([IRQBALANCE, "--foreground"], user=NOBODY, group=NOBODY, extra_groups=[],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        wait_for(lambda: comm(user.pid) == "irqbalance", "irqbalance as nobody")
        host = HostPaths(linked_host(tmp_path / "host", os.getpid(), [user.pid]), tmp_path / "state")
        item = IrqbalanceItem(host, False)
        assert item.plan() == []
        assert Engine(host, [item], "p").apply() == []
        assert user.poll() is None
        assert item.notes() == [
            f"irqbalance: pid {user.pid} is named irqbalance but left alone: "
            f"it does not run as root (uids {NOBODY} {NOBODY} {NOBODY} {NOBODY})"
        ]
    finally:
        user.kill()
        user.wait(timeout=10)


def test_a_real_irqbalance_in_a_pid_namespace_of_its_own_is_not_the_hosts(tmp_path: Path) -> None:
    """As a container's irqbalance: the host's binary, run by root, but in another pid namespace."""
    unshare = subprocess.Popen(
        ["unshare", "--pid", "--fork", "--mount-proc", "--kill-child", "sh", "-c",
         f"{ISOLATE} && exec {IRQBALANCE} --foreground"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    inner: list[int] = []
    try:
        wait_for(lambda: any(comm(p) == "irqbalance" for p in children(unshare.pid)), "irqbalance in its namespace")
        inner[:] = children(unshare.pid)
        (pid,) = inner
        host = HostPaths(linked_host(tmp_path / "host", os.getpid(), [pid]), tmp_path / "state")
        item = IrqbalanceItem(host, False)
        assert [(f.pid, f.refused) for f in scan(host)] == [(pid, "it runs in another pid namespace (a container's)")]
        assert item.plan() == []
        assert Engine(host, [item], "p").apply() == []
        assert comm(pid) == "irqbalance"  # still running
        # With its own namespace as the host's (its own PID 1), the same process counts.
        inside = HostPaths(linked_host(tmp_path / "inside", pid, [pid]))
        assert pid in host_irqbalance(inside)
    finally:
        unshare.kill()  # --kill-child: its namespace's init (irqbalance) dies with it
        unshare.wait(timeout=10)
        for child in inner:
            wait_gone(child)


def test_the_hosts_irqbalance_is_stopped_and_revert_starts_it_with_the_init_script(
    sandbox: SandboxHost, tmp_path: Path
) -> None:
    """A host without systemd: stopped by signal (an impostor next to it is not touched), started
    again by /etc/init.d/irqbalance - even when the journal holds a command line."""
    assert sandbox.run(IRQBALANCE).returncode == 0  # daemonizes, as a host's would
    wait_for(lambda: sandbox.pids("irqbalance"), "the host's irqbalance")
    world = world_dir("nodetune-impostor-")
    script, proof = world / "irqbalance", world / "ran-as"
    script.write_text(f'#!/bin/sh\nif [ "$(id -u)" = 0 ]; then id >{proof}; exit 0; fi\nread _\n')
    script.chmod(0o755)
    impostor = subprocess.Popen(
        ["nsenter", "-t", str(sandbox.init), "--pid", "--mount", "--",
         "setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", str(script)],
        stdin=subprocess.PIPE,
    )  # fmt: skip
    try:
        wait_for(lambda: len(sandbox.pids("irqbalance")) == 2, "the impostor in the host")
        (daemon,) = [p for p in sandbox.pids("irqbalance") if sandbox.cmdline(p)[0] == IRQBALANCE]
        host = HostPaths(sandbox.root, tmp_path / "state")
        e = Engine(host, [IrqbalanceItem(host, False)], "p")
        assert e.plan() == [Change("irqbalance", "service", "running", "stopped")]
        assert [c.new for c in e.apply()] == ["stopped"]
        assert daemon not in sandbox.pids("irqbalance")  # stopped
        assert len(sandbox.pids("irqbalance")) == 1 and impostor.poll() is None  # the impostor is not
        assert e.verify() == {("irqbalance", "service"): True}
        j = Journal.load(tmp_path / "state", host.boot_id())
        assert j.entries["irqbalance/service"].original == "running"  # no command line is kept
        # A journal written by an older nodetune (or by hand) holds a command line: never run.
        j.entries["irqbalance/service"] = Entry(f"running {script}", j.entries["irqbalance/service"].run)
        j.save()
        assert [c.new for c in Engine(host, [], "").revert()] == [f"running {script}"]
        assert not proof.exists(), f"ran as root: {proof.read_text()}"
        wait_for(lambda: len(sandbox.pids("irqbalance")) == 2, "irqbalance started again")
        started = [sandbox.cmdline(p) for p in host_irqbalance(host)]
        assert started == [[IRQBALANCE, "--pid=/run/irqbalance.pid"]]  # what the init script runs
    finally:
        impostor.stdin.close()
        impostor.kill()
        impostor.wait(timeout=10)
        remove_world_dir(world)


@pytest.mark.parametrize(
    "sandbox", [{"no_init_script": True, "env_file": 'IRQBALANCE_ARGS="--interval=7 --foreground"\n'}], indirect=True
)
def test_without_an_init_script_the_binary_starts_with_the_hosts_default_arguments(
    sandbox: SandboxHost, tmp_path: Path
) -> None:
    assert sandbox.run(IRQBALANCE).returncode == 0
    wait_for(lambda: sandbox.pids("irqbalance"), "the host's irqbalance")
    host = HostPaths(sandbox.root, tmp_path / "state")
    e = Engine(host, [IrqbalanceItem(host, False)], "p")
    e.apply()
    assert host_irqbalance(host) == []
    e.revert()
    # /etc/default/irqbalance's IRQBALANCE_ARGS, without --foreground (it must detach).
    assert [sandbox.cmdline(p) for p in host_irqbalance(host)] == [[IRQBALANCE, "--interval=7"]]


@pytest.mark.parametrize("sandbox", [{"systemd": True}], indirect=True)
def test_under_systemd_the_unit_is_disabled_then_enabled_in_the_hosts_namespaces(
    sandbox: SandboxHost, tmp_path: Path
) -> None:
    assert sandbox.run(IRQBALANCE).returncode == 0
    wait_for(lambda: sandbox.pids("irqbalance"), "the host's irqbalance")
    host = HostPaths(sandbox.root, tmp_path / "state")
    e = Engine(host, [IrqbalanceItem(host, False)], "p")
    assert [c.new for c in e.apply()] == ["stopped"]
    log = sandbox.root / "run/systemctl.log"  # the sandbox's systemctl: it ran in the host's namespaces
    assert log.read_text() == "disable --now irqbalance.service\n"
    assert host_irqbalance(host) == []
    e.revert()
    assert log.read_text() == "disable --now irqbalance.service\nenable --now irqbalance.service\n"
    assert len(host_irqbalance(host)) == 1


def test_an_environment_file_others_can_write_is_not_used_to_start_it(tmp_path: Path) -> None:
    host_root = tmp_path / "host"
    (host_root / "usr/sbin").mkdir(parents=True)
    (host_root / "usr/sbin/irqbalance").write_text("")
    (host_root / "etc/default").mkdir(parents=True)
    env = host_root / "etc/default/irqbalance"
    env.write_text("IRQBALANCE_ARGS='--interval=7'  # comment\nIRQBALANCE_BANNED_CPULIST=0-1\nOTHER=x\n")
    env.chmod(0o644)
    item = IrqbalanceItem(HostPaths(host_root), True)
    assert item.start_command() == (
        ["/usr/sbin/irqbalance", "--interval=7"],
        {"IRQBALANCE_ARGS": "--interval=7", "IRQBALANCE_BANNED_CPULIST": "0-1"},
    )
    env.chmod(0o666)  # anyone could make root run anything
    with pytest.raises(TuningError, match="not a root-only regular file"):
        item.start_command()


def test_without_the_hosts_pid_namespace_nothing_is_the_hosts(tmp_path: Path) -> None:
    """A host root whose PID 1 cannot be read (no /proc/1/ns/pid): no process counts as the
    host's, whatever it is."""
    host = linked_host(tmp_path / "host", os.getpid(), [])
    (host / "proc/1").unlink()
    (host / "proc/1").mkdir()
    root_run = subprocess.Popen(
        ["unshare", "--mount", "sh", "-c", f"{ISOLATE} && exec {IRQBALANCE} --foreground"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_for(lambda: comm(root_run.pid) == "irqbalance", "irqbalance")
        (host / "proc" / str(root_run.pid)).symlink_to(f"/proc/{root_run.pid}")
        assert [f.refused for f in scan(HostPaths(host))] == [
            f"the host's pid namespace is unknown ({host}/proc/1/ns/pid: No such file or directory)"
        ]
        assert IrqbalanceItem(HostPaths(host), False).plan() == []
    finally:
        root_run.kill()
        root_run.wait(timeout=10)


def _rebooted(state: Path) -> None:
    """The journal as if written during an earlier boot (the kernel's boot id cannot be changed)."""
    path = state / "tuning-journal.json"
    data = json.loads(path.read_text())
    data["boot_id"] = "00000000-0000-0000-0000-000000000000"
    path.write_text(json.dumps(data))


def test_without_systemd_a_stopped_irqbalance_is_not_kept_across_a_reboot(sandbox: SandboxHost, tmp_path: Path) -> None:
    """Review #11: survives_reboot was True for irqbalance whatever the host; a SIGTERM'd daemon
    on a host without systemd is started by the next boot, so its entry must not outlive it."""
    assert sandbox.run(IRQBALANCE).returncode == 0
    wait_for(lambda: sandbox.pids("irqbalance"), "the host's irqbalance")
    host = HostPaths(sandbox.root, tmp_path / "state")
    Engine(host, [IrqbalanceItem(host, False)], "p").apply()
    j = Journal.load(tmp_path / "state", host.boot_id())
    assert j.entries["irqbalance/service"].survives is False  # recorded when written
    _rebooted(tmp_path / "state")
    e = Engine(host, [IrqbalanceItem(host, False)], "p")
    e.load()
    assert any("1 journaled original(s) are dropped" in m for m in e.messages), e.messages
    assert not (tmp_path / "state/tuning-journal.json").exists()


@pytest.mark.parametrize("sandbox", [{"systemd": True}], indirect=True)
def test_under_systemd_a_disabled_irqbalance_keeps_its_original_across_a_reboot(
    sandbox: SandboxHost, tmp_path: Path
) -> None:
    assert sandbox.run(IRQBALANCE).returncode == 0
    wait_for(lambda: sandbox.pids("irqbalance"), "the host's irqbalance")
    host = HostPaths(sandbox.root, tmp_path / "state")
    Engine(host, [IrqbalanceItem(host, False)], "p").apply()
    assert Journal.load(tmp_path / "state", host.boot_id()).entries["irqbalance/service"].survives is True
    _rebooted(tmp_path / "state")
    restored = Engine(host, [], "").revert()  # after the reboot: the unit is still disabled
    assert [(c.key, c.new) for c in restored] == [("service", "running")]
    wait_for(lambda: len(host_irqbalance(host)) == 1, "irqbalance enabled again")

"""Input that used to crash (a traceback, exit 1) or pass validation and fail at write time (exit
3) is refused at validation with exit 2 and a host left byte-identical: profile files that are not
UTF-8, malformed or non-ASCII numbers, numbers outside the key's kernel type, duplicate YAML keys,
and sysctls that hand out root unless named under ``unsafe:``."""

from __future__ import annotations

import logging
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent import cli
from tests.agent.tuning.hosttree import make_host, snapshot, value
from tests.agent.tuning.stepper import REPO
from tests.agent.tuning.test_engine import tune


@pytest.fixture(autouse=True)
def _root_logging() -> Iterator[None]:
    """``cli.main(["tune", ...])`` sets up the root logger for the process: put it back."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture
def host(tmp_path: Path) -> Path:
    return make_host(tmp_path / "host", proc__sys__kernel__core_pattern="core\n")


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ("name: x\nsysctl: {net.core.somaxconn: 'é'}\n".encode("latin-1"), "not UTF-8"),
        ("name: x\nsysctl: {net.core.somaxconn: 8192}\n".encode("utf-16"), "not UTF-8"),
    ],
    ids=["latin-1", "utf-16"],
)
def test_a_profile_file_that_is_not_utf8_is_exit_2(host: Path, tmp_path: Path, data: bytes, message: str) -> None:
    path = tmp_path / "p.yaml"
    path.write_bytes(data)
    before = snapshot(host)
    for action in ("plan", "apply"):
        assert cli.main(["tune", action, "--profile", str(path), "--host-root", str(host)]) == 2
    assert cli.main(["run", "--profile", str(path), "--host-root", str(host), "--probes", "none"]) == 2
    assert snapshot(host) == before


@pytest.mark.parametrize(
    ("profile", "message"),
    [
        ("name: x\nsysctl: {net.core.somaxconn: '>=abc'}", "'>=' takes one whole number"),
        ("name: x\nsysctl: {net.core.somaxconn: '>=1 2'}", "'>=' takes one whole number"),
        ("name: x\nsysctl: {net.core.somaxconn: '²'}", "whole number"),
        ("name: x\nsysctl: {net.core.somaxconn: '٥٠٠٠'}", "whole number"),  # Arabic-Indic digits
        ("name: x\nsysctl: {net.core.somaxconn: '>=٥٠٠٠'}", "'>=' takes one whole number"),
        ("name: x\nsysctl: {fs.file-max: '>=99999999999999999999999'}", "out of range"),
        ("name: x\nsysctl: {net.core.somaxconn: '>=3000000000'}", "out of range"),  # an int in the kernel
        ("name: x\nsysctl: {vm.max_map_count: '-2147483649'}", "out of range"),
        ("name: x\nsysctl: {net.ipv4.ip_local_port_range: '1024 ٦٠٠٠٠'}", "whole number"),
        ("name: x\nirq_affinity: {interfaces: [eth0], cpus: '²'}", "not a CPU number"),
        ("name: x\nirq_affinity: {interfaces: [eth0], cpus: '0-²'}", "not a CPU number"),
        ("name: a\nname: b\n", "appears twice"),
        ("name: x\nsysctl:\n  net.core.somaxconn: 1\n  net.core.somaxconn: 2\n", "appears twice"),
        ("profiles:\n- name: a\n  priority: 1\n  priority: 2\n", "appears twice"),
    ],
)
def test_values_the_kernel_would_refuse_are_exit_2_at_validation(
    host: Path, tmp_path: Path, profile: str, message: str
) -> None:
    before = snapshot(host)
    for action in ("plan", "apply", "verify"):
        code, out, err = tune(action, host, profile, tmp=tmp_path)
        assert code == 2, (action, out, err)
        assert message in err, err
    assert snapshot(host) == before


def test_run_with_a_bad_profile_exits_2_at_start(host: Path, tmp_path: Path) -> None:
    """``nodetune run --profile`` with '>=abc' used to start with tuning dead for its lifetime."""
    path = tmp_path / "p.yaml"
    path.write_text("name: x\nsysctl: {net.core.somaxconn: '>=abc'}")
    before = snapshot(host)
    proc = subprocess.Popen(
        [sys.executable, "-m", "agent.cli", "run", "--profile", str(path), "--mode", "enforce", "--host-root",
         str(host), "--probes", "none", "--collectors", "none", "--listen", "127.0.0.1:0", "--cache-dir",
         str(tmp_path / "cache")],
        cwd=REPO, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 2 and "nodetune: --profile" in err and ">=abc" in err, err
    assert snapshot(host) == before


@pytest.mark.parametrize(
    ("sysctl", "file"),
    [
        ("kernel.core_pattern: '|/tmp/x %p'", "proc/sys/kernel/core_pattern"),
        ("kernel.modprobe: /tmp/x", "proc/sys/kernel/modprobe"),
        ("kernel.hotplug: /tmp/x", "proc/sys/kernel/hotplug"),
        ("kernel.poweroff_cmd: /tmp/x", "proc/sys/kernel/poweroff_cmd"),
        ("kernel.usermodehelper.bset: '4294967295 4294967295'", "proc/sys/kernel/usermodehelper/bset"),
        ("fs.binfmt_misc.register: ':x:E::x::/tmp/x:C'", "proc/sys/fs/binfmt_misc/register"),
        ("kernel.unprivileged_bpf_disabled: 0", "proc/sys/kernel/unprivileged_bpf_disabled"),
        ("dev.tty.ldisc_autoload: 1", "proc/sys/dev/tty/ldisc_autoload"),
        ("kernel.modules_disabled: 1", "proc/sys/kernel/modules_disabled"),
        ("kernel.kexec_load_disabled: 1", "proc/sys/kernel/kexec_load_disabled"),
    ],
)
def test_sysctls_that_hand_out_root_are_refused_unless_named_unsafe(tmp_path: Path, sysctl: str, file: str) -> None:
    key = sysctl.split(":", 1)[0]
    current = {
        "core_pattern": "core",
        "modprobe": "/sbin/modprobe",
        "hotplug": "",
        "poweroff_cmd": "/sbin/poweroff",
        "bset": "4294967295 4294967295",
        "register": "",
        "ldisc_autoload": "0",
    }
    host = make_host(tmp_path / "host", **{file.replace("/", "__"): current.get(Path(file).name, "2") + "\n"})
    before = snapshot(host)
    code, _, err = tune("apply", host, f"name: x\nsysctl: {{{sysctl}}}", tmp=tmp_path)
    assert code == 2 and f"sysctl {key}: refused" in err and "unsafe:" in err, err
    assert snapshot(host) == before
    code, _, err = tune("plan", host, f"name: x\nsysctl: {{{sysctl}}}\nunsafe: [{key}]", tmp=tmp_path)
    assert code in (0, 1) and "refused" not in err, err  # named under unsafe: accepted


def test_a_core_pattern_to_a_file_is_accepted_and_unsafe_must_name_a_key_of_the_profile(
    host: Path, tmp_path: Path
) -> None:
    code, out, _ = tune("plan", host, "name: x\nsysctl: {kernel.core_pattern: /var/crash/core.%p}", tmp=tmp_path)
    assert code == 1 and "core_pattern" in out
    code, _, err = tune("plan", host, "name: x\nunsafe: [kernel.modprobe]", tmp=tmp_path)
    assert code == 2 and "not a sysctl of this profile" in err


@pytest.mark.parametrize(
    ("sysctl", "file", "current"),
    [
        # review #1: the kernel reads numbers, not strings: "00", "-0", "0x0" are 0, "01" is 1
        ("kernel.unprivileged_bpf_disabled: '00'", "proc/sys/kernel/unprivileged_bpf_disabled", "2"),
        ("kernel.unprivileged_bpf_disabled: '-0'", "proc/sys/kernel/unprivileged_bpf_disabled", "2"),
        ("kernel.unprivileged_bpf_disabled: ' 0x0'", "proc/sys/kernel/unprivileged_bpf_disabled", "2"),
        ("dev.tty.ldisc_autoload: '01'", "proc/sys/dev/tty/ldisc_autoload", "0"),
        # review #8: one-way switches and the keys missing from the list
        ("kernel.unprivileged_bpf_disabled: 1", "proc/sys/kernel/unprivileged_bpf_disabled", "2"),
        ("kernel.yama.ptrace_scope: 3", "proc/sys/kernel/yama/ptrace_scope", "1"),
        ("kernel.kexec_load_limit_panic: 1", "proc/sys/kernel/kexec_load_limit_panic", "-1"),
        ("kernel.kexec_load_limit_reboot: 0", "proc/sys/kernel/kexec_load_limit_reboot", "-1"),
        ("kernel.core_pattern: '@/run/coredump.socket'", "proc/sys/kernel/core_pattern", "core"),
        ("dev.tty.legacy_tiocsti: 1", "proc/sys/dev/tty/legacy_tiocsti", "0"),
        ("net.ipv4.tcp_congestion_control: bbr", "proc/sys/net/ipv4/tcp_congestion_control", "cubic"),
        ("net.core.default_qdisc: fq", "proc/sys/net/core/default_qdisc", "pfifo_fast"),
    ],
)
def test_refusals_read_values_as_the_kernel_does_and_cover_one_way_switches(
    tmp_path: Path, sysctl: str, file: str, current: str
) -> None:
    key = sysctl.split(":", 1)[0]
    host = make_host(tmp_path / "host", **{file.replace("/", "__"): current + "\n"})
    before = snapshot(host)
    for action in ("plan", "apply"):
        code, _, err = tune(action, host, f"name: x\nsysctl: {{{sysctl}}}", tmp=tmp_path)
        assert code == 2 and f"sysctl {key}: refused" in err, (action, err)
    assert snapshot(host) == before


def test_the_safe_values_of_value_dependent_refusals_are_accepted(tmp_path: Path) -> None:
    host = make_host(
        tmp_path / "host",
        proc__sys__kernel__unprivileged_bpf_disabled="0\n",
        proc__sys__dev__tty__ldisc_autoload="1\n",
        proc__sys__kernel__yama__ptrace_scope="0\n",
    )
    profile = (
        "name: x\nsysctl: {kernel.unprivileged_bpf_disabled: 2, dev.tty.ldisc_autoload: 0, kernel.yama.ptrace_scope: 1}"
    )
    code, _, err = tune("apply", host, profile, tmp=tmp_path)
    assert code == 0, err
    assert value(host, "proc/sys/kernel/unprivileged_bpf_disabled") == "2"


@pytest.mark.parametrize(
    ("sysctl", "message"),
    [
        # review #2: the kernel parses with base 0: "010" is octal 8, so the read-back would fail
        ("vm.max_map_count: '0262144'", "leading zero"),
        ("net.ipv4.ip_local_port_range: '010 65000'", "leading zero"),
        ("vm.max_map_count: '-0'", "leading zero"),
        ("vm.max_map_count: '0x40000'", "whole number"),
        ("net.core.somaxconn: '>=04096'", "leading zero"),
        # an unsigned kernel type silently skips a negative: refused unless the key is known signed
        ("fs.file-max: '-5'", "out of range"),
        ("net.ipv4.tcp_max_syn_backlog: '-1'", "negative"),  # an int, but never meant negative
        ("vm.dirty_bytes: '-1'", "out of range"),  # an unsigned long: the kernel skips a negative
        ("kernel.msgmax: '-1'", "negative"),  # a key of unknown type: negative refused
        ("vm.swappiness: '500'", "out of range"),  # proc_dointvec_minmax 0..200
        ("vm.overcommit_memory: '3'", "out of range"),
    ],
)
def test_numbers_the_kernel_would_read_differently_are_exit_2(tmp_path: Path, sysctl: str, message: str) -> None:
    host = make_host(
        tmp_path / "host",
        proc__sys__vm__dirty_bytes="0\n",
        proc__sys__kernel__msgmax="8192\n",
        proc__sys__vm__swappiness="60\n",
        proc__sys__vm__overcommit_memory="0\n",
    )
    before = snapshot(host)
    code, out, err = tune("apply", host, f"name: x\nsysctl: {{{sysctl}}}", tmp=tmp_path)
    assert code == 2 and message in err, (out, err)
    assert snapshot(host) == before


def test_a_negative_value_for_a_key_known_signed_is_accepted(tmp_path: Path) -> None:
    host = make_host(tmp_path / "host", proc__sys__kernel__perf_event_paranoid="2\n")
    code, _, err = tune("apply", host, "name: x\nsysctl: {kernel.perf_event_paranoid: '-1'}", tmp=tmp_path)
    assert code == 0, err
    assert value(host, "proc/sys/kernel/perf_event_paranoid") == "-1"


def test_internal_whitespace_of_a_string_sysctl_is_kept(tmp_path: Path) -> None:
    """Lesser point: the profile collapsed "a  b" to "a b" for string sysctls (core_pattern)."""
    host = make_host(tmp_path / "host", proc__sys__kernel__core_pattern="/cores/core  %e\n")
    code, _, err = tune("apply", host, "name: x\nsysctl: {kernel.core_pattern: '/var/crash/core  %p'}", tmp=tmp_path)
    assert code == 0, err
    assert (host / "proc/sys/kernel/core_pattern").read_text() == "/var/crash/core  %p\n"
    assert tune("revert", host, None, tmp=tmp_path)[0] == 0
    assert (host / "proc/sys/kernel/core_pattern").read_text() == "/cores/core  %e\n"  # the original, as it was

"""Command line and settings: bad input is rejected whole, with exit 2, before the host is touched."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from agent.cli import main
from agent.config import AgentConfig, ConfigError, parse_listen, parse_probes
from tests.conftest import REPO


@pytest.mark.parametrize(
    ("value", "want"),
    [("0.0.0.0:9662", ("0.0.0.0", 9662)), (":9100", ("0.0.0.0", 9100)), ("[::1]:80", ("::1", 80))],
)
def test_listen(value: str, want: tuple[str, int]) -> None:
    assert parse_listen(value) == want


@pytest.mark.parametrize("value", ["9662", "host:x", "1.2.3.4:70000", "not-an-ip:80"])
def test_bad_listen(value: str) -> None:
    with pytest.raises(ConfigError, match="--listen"):
        parse_listen(value)


def test_collectors() -> None:
    from agent.config import COLLECTORS, parse_collectors

    assert parse_collectors("all") == COLLECTORS and parse_collectors("none") == ()
    assert parse_collectors("ports,listen,ports") == ("ports", "listen")


def test_probes() -> None:
    assert parse_probes("all") == ("runqlat", "lockstat", "connect")
    assert parse_probes("connect,lockstat") == ("connect", "lockstat")
    assert parse_probes("none") == ()
    assert parse_probes("runqlat,runqlat") == ("runqlat",)
    with pytest.raises(ConfigError, match="unknown probe"):
        parse_probes("runqlat,kprobe_everything")


@pytest.mark.parametrize(
    "kwargs",
    [
        {"log_level": "loud"},
        {"max_concurrent_scrapes": 0},
        {"probe_settings": {"runqlat": {"max_cgroups": 0}}},
        {"probe_settings": {"runqlat": {"max_pid_slots": 3000}}},
        {"probe_settings": {"nosuchprobe": {}}},
        {"probe_strategies": {"connect": "kretprobe"}},  # kprobe is one; kretprobe is not
        {"probe_strategies": {"nosuchprobe": "tracepoint"}},
        {"cgroup_hierarchy": "v3"},
        {"workload_series_grace_s": -1},
        {"host_root": Path("/nonexistent")},
        {"mode": "yolo"},
        {"mode": "enforce"},  # enforce needs an explicit profile
        {"profile": Path("/nonexistent/profile.yaml")},
    ],
)
def test_bad_settings(kwargs: dict) -> None:
    with pytest.raises(ConfigError):
        AgentConfig(**kwargs)


@pytest.mark.parametrize(
    "argv",
    [
        ["run", "--listen", "nope"],
        ["run", "--probes", "bogus"],
        ["run", "--log-level", "loud"],
        ["run", "--runqlat-max-cgroups", "0"],
        ["run", "--runqlat-max-pid-slots", "1000"],
        ["run", "--cgroup-hierarchy", "v3"],
        ["run", "--collectors", "throttling,sockets"],
        ["probes", "--probes", "bogus"],
        ["run", "--mode", "enforce"],
        ["run", "--profile", "/nonexistent.yaml"],
        ["run", "--lockstat-top-callers", "0"],
        ["run", "--connect-search-slots", "1000"],
        ["run", "--connect-strategy", "fentry"],  # fexit is one; fentry is not
        ["probes", "--runqlat-strategy", "tracepoint+sock_ops"],
    ],
)
def test_bad_flags_exit_2_and_touch_nothing(argv: list[str], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cache = tmp_path / "cache"
    assert main([*argv, "--cache-dir", str(cache)]) == 2
    assert "nodetune:" in capsys.readouterr().err
    assert not cache.exists()


@pytest.mark.bpf
def test_probes_command_reports_strategy_and_headers(header_cache: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "agent.cli", "probes", "--json", "--cache-dir", str(header_cache)],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    report = json.loads(out.stdout)
    assert report["headers"].split()[0] in ("host", "kheaders", "distribution")
    attach = {p["probe"]: p["attach"] for p in report["probes"] if p["loadable"]}
    assert attach == {"runqlat": "raw_tracepoint", "lockstat": "raw_tracepoint", "connect": "tracepoint"}


@pytest.mark.bpf
def test_strategy_flag_picks_the_attach_strategy(header_cache: Path) -> None:
    flags = ["--connect-strategy", "tracepoint+sock_ops", "--runqlat-strategy", "tracepoint"]
    flags += ["--probes", "connect,runqlat", "--cache-dir", str(header_cache)]
    out = subprocess.run(
        [sys.executable, "-m", "agent.cli", "probes", "--json", *flags],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    attach = {p["probe"]: p["attach"] for p in json.loads(out.stdout)["probes"]}
    assert attach == {"connect": "tracepoint+sock_ops", "runqlat": "tracepoint"}


@pytest.mark.root  # reads /sys/kernel/btf/vmlinux for the offsets in the cflags
def test_hidden_print_c_shows_the_generated_program(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "agent.cli", "probes", "--print-c", "runqlat", "--runqlat-max-cgroups", "77"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("// cflags: -DNSLOTS=24 ") and "-DRUN_DELAY_OFF=" in out.stdout
    assert "RAW_TRACEPOINT_PROBE(sched_switch)" in out.stdout
    assert "BPF_PERCPU_ARRAY(runqueue_latency_seconds, struct runqueue_latency_seconds_row, 77)" in out.stdout


def test_every_probe_setting_has_a_flag() -> None:
    from agent.cli import build_parser
    from probes import PROBES

    help_text = build_parser()._subparsers._group_actions[0].choices["run"].format_help()
    for name, cls in PROBES.items():
        assert f"--{name}-strategy" in help_text
        for setting in cls.settings:
            assert setting.flag(name) in help_text


def test_run_rejects_a_profile_that_does_not_fit_the_host(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    profile = tmp_path / "p.yaml"
    profile.write_text("profiles:\n  - name: ok\n  - name: bad\n    sysctl: {net.core.no_such_key: 1}\n")
    assert main(["run", "--profile", str(profile), "--mode", "enforce", "--cache-dir", str(tmp_path / "c")]) == 2
    assert "sysctl.net.core.no_such_key: no such kernel parameter" in capsys.readouterr().err

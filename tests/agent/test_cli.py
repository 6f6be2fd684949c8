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


def test_probes() -> None:
    assert parse_probes("all") == ("runqlat",)
    assert parse_probes("none") == ()
    assert parse_probes("runqlat,runqlat") == ("runqlat",)
    with pytest.raises(ConfigError, match="unknown probe"):
        parse_probes("runqlat,kprobe_everything")


@pytest.mark.parametrize(
    "kwargs",
    [
        {"log_level": "loud"},
        {"max_concurrent_scrapes": 0},
        {"runqlat_max_cgroups": 0},
        {"runqlat_max_pid_slots": 3000},
        {"host_root": Path("/nonexistent")},
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
        ["probes", "--probes", "bogus"],
    ],
)
def test_bad_flags_exit_2_and_touch_nothing(argv: list[str], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cache = tmp_path / "cache"
    assert main([*argv, "--cache-dir", str(cache)]) == 2
    assert "nodetune:" in capsys.readouterr().err
    assert not cache.exists()


@pytest.mark.bpf
def test_probes_command_reports_strategy_and_headers(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "agent.cli", "probes", "--json"], cwd=REPO, capture_output=True, text=True, check=True
    )
    report = json.loads(out.stdout)
    assert report["headers"].split()[0] in ("host", "kheaders", "distribution")
    (runqlat,) = report["probes"]
    assert runqlat["loadable"] and runqlat["attach"] == "raw_tracepoint"


def test_hidden_print_c_shows_the_generated_program() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "agent.cli", "probes", "--print-c", "runqlat"], cwd=REPO, capture_output=True, text=True
    )
    if out.returncode != 0:
        pytest.skip(out.stderr)  # needs readable BTF
    assert out.stdout.startswith("// cflags: -DPID_SLOTS=") and "RAW_TRACEPOINT_PROBE(sched_switch)" in out.stdout

"""The doctor's tuning facts, on a fixture host tree: through the tuning unit (current and wanted
value of each key of the profile), through an agent's metrics (in/out only), THP's mode and
irqbalance read by the tuning items' own readers; never a write."""

from __future__ import annotations

from pathlib import Path

from agent.doctor.analyse import analyse
from agent.doctor.findings import OK, SKIP, WARN
from agent.doctor.reading import Reading
from agent.doctor.tuning import TuningFacts, from_metrics, from_unit, host_facts
from agent.tuning.unit import TuningUnit
from host.paths import HostPaths
from tests.agent.tuning.hosttree import make_host, snapshot


def test_live_facts_name_each_key_with_its_values_and_write_nothing(tmp_path: Path) -> None:
    root = make_host(tmp_path)
    before = snapshot(root)
    host = HostPaths(root, state_dir=tmp_path / "state")
    unit = TuningUnit(host, None, "observe")
    unit.maintain()
    facts = from_unit(unit)
    keys = {(k.item, k.key): k for k in facts.keys}
    assert facts.profile == "nodetune-default" and facts.mode == "observe"
    assert keys[("sysctl", "net.core.somaxconn")].in_sync  # 4096 >= 4096
    port_range = keys[("sysctl", "net.ipv4.ip_local_port_range")]
    assert not port_range.in_sync and (port_range.current, port_range.wanted) == ("32768 60999", "10240 65000")
    assert facts.thp_enabled == "madvise" and facts.irqbalance_running is False
    assert snapshot(root) == before


def test_facts_from_metrics_and_this_host(tmp_path: Path) -> None:
    root = make_host(tmp_path, sys__kernel__mm__transparent_hugepage__enabled="always madvise [never]\n")
    reading = Reading.from_text(
        'nodetune_tuning_profile_info{profile="p",mode="enforce"} 1\nnodetune_tuning_profile_valid 1\n'
        'nodetune_tuning_in_sync{item="irqbalance",key="service"} 0\n',
        0,
    )
    facts = from_metrics(reading, HostPaths(root))
    assert (facts.profile, facts.mode, facts.valid, facts.thp_enabled) == ("p", "enforce", True, "never")
    report = analyse(reading, reading, None, facts, {}, "n", "x")
    verdicts = {f.id: f.verdict for f in report.findings}
    assert verdicts["tuning.thp"] == OK and verdicts["tuning.irqbalance"] == WARN
    assert verdicts["tuning.profile"] == WARN and verdicts["cpu.utilisation"] == SKIP  # no CPU times given


def test_a_host_without_thp_is_a_skip_that_says_which_file(tmp_path: Path) -> None:
    facts = host_facts(HostPaths(tmp_path), TuningFacts())
    assert facts.thp_enabled is None and "transparent_hugepage/enabled" in facts.thp_reason
    report = analyse(Reading(0, {}), Reading(1, {}), None, facts, {}, "n", "x")
    thp = next(f for f in report.findings if f.id == "tuning.thp")
    assert thp.verdict == SKIP and "transparent_hugepage/enabled" in thp.summary

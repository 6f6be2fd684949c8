"""The alert rules: generated files in step with their generator, valid for the real ``promtool``, each
alert firing on a series that should fire it and silent on one that should not (``promtool test rules``
over tests/manifests/alerts/*.test.yml), names that the agent really exports, a runbook per alert."""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import yaml

from tests.conftest import REPO
from tests.manifests.exports import PROMETHEUS_SERIES, agent_exports
from tests.manifests.promql import reads

TESTS = Path(__file__).parent / "alerts"
# Debian's `prometheus`, installed by `make test-deps`: a missing promtool fails these tests, never skips them.
PROMTOOL = shutil.which("promtool") or "promtool"


def load_generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_alerts", REPO / "scripts/gen_alerts.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


GEN = load_generator()


def rules() -> list[dict]:
    return [r for g in yaml.safe_load(GEN.RULES_FILE.read_text())["groups"] for r in g["rules"]]


def alerts() -> list[dict]:
    return [r for r in rules() if "alert" in r]


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=120)


def run_unit_tests(rules_file: Path, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """``promtool test rules`` on every test file, pointed at ``rules_file``."""
    files = []
    for test in sorted(TESTS.glob("*.test.yml")):
        doc = yaml.safe_load(test.read_text())
        doc["rule_files"] = [str(rules_file)]
        copy = tmp_path / test.name
        copy.write_text(yaml.safe_dump(doc, sort_keys=False))
        files.append(str(copy))
    return promtool("test", "rules", *files)


# --- generated files ---------------------------------------------------------------------------
def test_both_files_are_what_the_generator_writes() -> None:
    for path, text in GEN.outputs().items():
        assert path.read_text() == text, f"{path} drifted: run python scripts/gen_alerts.py"
    check = subprocess.run([sys.executable, "scripts/gen_alerts.py", "--check"], cwd=REPO, capture_output=True)
    assert check.returncode == 0, check.stderr


def test_the_check_fails_when_a_file_drifts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("RULES_FILE", "PROMETHEUS_RULE_FILE"):
        copy = tmp_path / getattr(GEN, name).name
        copy.write_text(getattr(GEN, name).read_text())
        monkeypatch.setattr(GEN, name, copy)
    assert GEN.main(["--check"]) == 0
    # a hand edit of the PrometheusRule alone (the threshold no longer what the plain file says)
    edited = GEN.PROMETHEUS_RULE_FILE.read_text().replace("> 0.25", "> 0.3")
    assert edited != GEN.PROMETHEUS_RULE_FILE.read_text()
    GEN.PROMETHEUS_RULE_FILE.write_text(edited)
    assert GEN.main(["--check"]) == 1
    assert GEN.PROMETHEUS_RULE_FILE.read_text() == edited  # --check writes nothing
    assert GEN.main([]) == 0
    assert GEN.main(["--check"]) == 0


def test_the_prometheus_rule_holds_exactly_the_plain_files_groups() -> None:
    plain = yaml.safe_load(GEN.RULES_FILE.read_text())
    rule = yaml.safe_load(GEN.PROMETHEUS_RULE_FILE.read_text())
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert rule["kind"] == "PrometheusRule"
    assert rule["metadata"]["name"] == "nodetune"
    assert rule["spec"]["groups"] == plain["groups"]


def test_scaled_rules_divide_every_window_and_duration() -> None:
    fast = yaml.safe_load(GEN.plain_rules_text(scale=30))
    normal = yaml.safe_load(GEN.plain_rules_text())
    fast_rules = [r for g in fast["groups"] for r in g["rules"]]
    normal_rules = [r for g in normal["groups"] for r in g["rules"]]
    assert [r.get("alert") or r["record"] for r in fast_rules] == [r.get("alert") or r["record"] for r in normal_rules]
    assert {r["for"] for r in fast_rules if r.get("alert") == "NodetuneCPUThrottlingHigh"} == {"30s"}
    assert "[10s]" in next(r["expr"] for r in fast_rules if r.get("record") == GEN.THROTTLED)
    # the texts still name the production window
    assert all(r.get("annotations") == n.get("annotations") for r, n in zip(fast_rules, normal_rules, strict=True))
    with pytest.raises(ValueError):
        GEN.rules(scale=0)


# --- promtool ------------------------------------------------------------------------------------
def test_promtool_check_rules_passes_on_both_forms(tmp_path: Path) -> None:
    result = promtool("check", "rules", str(GEN.RULES_FILE))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules())} rules found" in result.stdout
    spec = tmp_path / "from-prometheusrule.yml"
    spec.write_text(yaml.safe_dump(yaml.safe_load(GEN.PROMETHEUS_RULE_FILE.read_text())["spec"]))
    result = promtool("check", "rules", str(spec))
    assert result.returncode == 0, result.stdout + result.stderr


def test_scaled_rules_pass_promtool_check(tmp_path: Path) -> None:
    fast = tmp_path / "fast.rules.yml"
    fast.write_text(
        subprocess.run(
            [sys.executable, "scripts/gen_alerts.py", "--scale", "30"],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )
    result = promtool("check", "rules", str(fast))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "[10s]" in fast.read_text() and "[5m]" not in fast.read_text()


def test_promtool_check_rules_rejects_a_broken_expression(tmp_path: Path) -> None:
    """The check above can fail: the same file with one expression broken does not pass."""
    broken = tmp_path / "broken.yml"
    broken.write_text(GEN.RULES_FILE.read_text().replace("nodetune_probe_up == 0", "nodetune_probe_up == (0"))
    result = promtool("check", "rules", str(broken))
    assert result.returncode != 0


def test_promtool_unit_tests_pass() -> None:
    files = sorted(str(p) for p in TESTS.glob("*.test.yml"))
    assert files
    result = promtool("test", "rules", *files)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("SUCCESS") == len(files), result.stdout


def test_every_alert_is_tested_firing_and_silent() -> None:
    """Each alert name has a unit test where it fires and one (an earlier time) where it does not."""
    fired: dict[str, set] = {}
    silent: dict[str, set] = {}
    severities: dict[str, set] = {}
    for test in TESTS.glob("*.test.yml"):
        for case in yaml.safe_load(test.read_text())["tests"]:
            for check in case.get("alert_rule_test", []):
                name = check["alertname"]
                if check.get("exp_alerts"):
                    fired.setdefault(name, set()).add(check["eval_time"])
                    for a in check["exp_alerts"]:
                        severities.setdefault(name, set()).add(a["exp_labels"]["severity"])
                else:
                    silent.setdefault(name, set()).add(check["eval_time"])
    for rule in alerts():
        name = rule["alert"]
        assert name in fired, f"{name}: no test where it fires"
        assert name in silent or name == "NodetuneAgentAbsent", f"{name}: no test where it stays silent"
        assert rule["labels"]["severity"] in severities[name], f"{name} {rule['labels']['severity']}: never fired"
    assert "NodetuneAgentAbsent" in silent


# Each mutation is a plausible mistake in the rules; the unit tests must catch every one.
MUTATIONS = {
    "low-usage alert ignores usage (fires on saturated throttling too)": {"LOW_USAGE_MAX_RATIO": 1.0},
    "throttling fires after 10 m instead of 15 m (would fire at 14 m)": {"THROTTLED_FOR_S": 600},
    "pod-level cgroups alerted too": {"CPU_SELECTORS": ('container=~".*"', 'pod="__never__"')},
    "run-queue threshold 30 ms": {"RUNQUEUE_P99_S": 0.030},
    "critical port saturation at 0.95": {"PORTS_CRITICAL_RATIO": 0.95},
    "tuning alert in observe mode too": {"TUNING_MODE_SELECTOR": 'mode=~".+"'},
    "agent-down alert on any job": {"AGENT_JOB_SELECTOR": 'job=~".+"'},
    "listen overflows alerted only after 10 m": {"LISTEN_OVERFLOWS_FOR_S": 10 * 60},
}


@pytest.mark.parametrize("mutation", MUTATIONS)
def test_unit_tests_catch_a_wrong_rule(mutation: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in MUTATIONS[mutation].items():
        assert hasattr(GEN, name)
        monkeypatch.setattr(GEN, name, value)
    mutated = tmp_path / "mutated.rules.yml"
    mutated.write_text(GEN.plain_rules_text())
    assert mutated.read_text() != GEN.RULES_FILE.read_text()
    assert promtool("check", "rules", str(mutated)).returncode == 0  # valid rules, wrong behaviour
    result = run_unit_tests(mutated, tmp_path)
    assert result.returncode != 0, f"the unit tests did not notice: {mutation}"


def test_unit_tests_pass_through_the_copying_harness(tmp_path: Path) -> None:
    """The harness of the mutation test passes on the real rules (so its failures are the mutations')."""
    result = run_unit_tests(GEN.RULES_FILE, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


# --- names -----------------------------------------------------------------------------------------
@pytest.mark.bpf
def test_rules_read_only_series_and_labels_the_agent_exports(header_cache: Path) -> None:
    exported = agent_exports(header_cache)
    recorded = {r["record"] for r in rules() if "record" in r}
    for rule in rules():
        found = reads(rule["expr"])
        assert found.metrics, rule
        for metric in found.metrics - recorded - PROMETHEUS_SERIES:
            assert metric in exported.series, f"{rule.get('alert') or rule['record']}: {metric} is not exported"
        for metric, labels in found.matchers.items():
            known = exported.labels.get(metric, exported.all_labels) | {"instance", "job", "node"}
            if metric not in recorded:
                assert labels <= known, f"{metric}: matchers on {labels - known}"
        assert found.grouping <= exported.all_labels, found.grouping - exported.all_labels
        for text in rule.get("annotations", {}).values():
            used = set(re.findall(r"\$labels\.(\w+)", text))
            assert used <= exported.all_labels, used - exported.all_labels


def test_name_check_would_catch_a_misspelt_metric() -> None:
    from tests.manifests.exports import parse

    exported = parse('# TYPE nodetune_probe_up gauge\nnodetune_probe_up{probe="x"} 1\n')
    assert reads("nodetune_probe_up == 0").metrics <= exported.series
    assert not reads("nodetune_probes_up == 0").metrics <= exported.series


# --- runbooks -----------------------------------------------------------------------------------
def github_anchor(heading: str) -> str:
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_every_alert_has_a_runbook_section_and_its_texts() -> None:
    readme = (REPO / "README.md").read_text()
    anchors = {github_anchor(h) for h in re.findall(r"^#{2,4} (.+)$", readme, flags=re.M)}
    for rule in alerts():
        ann = rule["annotations"]
        assert ann["summary"] and ann["description"], rule["alert"]
        if rule["alert"] != "NodetuneAgentAbsent":  # no series, so no labels: it names the job it misses
            assert "{{" in ann["description"], f"{rule['alert']}: the description names nothing"
        assert ann["runbook_url"].startswith(GEN.RUNBOOK_BASE + "#")
        anchor = ann["runbook_url"].split("#", 1)[1]
        assert anchor in anchors, f"{rule['alert']}: README has no section #{anchor}"

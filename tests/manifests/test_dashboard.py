"""The Grafana dashboard: valid JSON as its generator writes it, every panel query and variable query
parsed by the real ``promtool``, only series and labels the agent really exports, and the panels the
issue asks for (run-queue heatmaps per node and per pod over ``le``, throttling with usage against the
limit, port saturation by destination, failures, listen overflows, lock wait by caller and by pod,
tuning state)."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import yaml

from tests.conftest import REPO
from tests.manifests.exports import PROMETHEUS_SERIES, TARGET_LABELS, agent_exports
from tests.manifests.promql import reads

# Debian's `prometheus`, installed by `make test-deps`: a missing promtool fails these tests, never skips them.
PROMTOOL = shutil.which("promtool") or "promtool"


def load_generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_dashboard", REPO / "scripts/gen_dashboard.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


GEN = load_generator()


def board() -> dict:
    return json.loads(GEN.DASHBOARD_FILE.read_text())


def panels() -> list[dict]:
    return [p for p in board()["panels"] if p["type"] != "row"]


def targets() -> list[tuple[dict, dict]]:
    return [(p, t) for p in panels() for t in p["targets"]]


def variable_selectors() -> list[str]:
    """The series selector inside each ``label_values(<selector>, <label>)`` variable query."""
    out = []
    for v in board()["templating"]["list"]:
        if v["type"] == "query":
            m = re.fullmatch(r"label_values\((.+), *(\w+)\)", v["definition"])
            assert m, v["definition"]
            out.append(m.group(1))
    return out


def all_exprs() -> list[str]:
    return [GEN.substitute(t["expr"]) for _, t in targets()] + [GEN.substitute(s) for s in variable_selectors()]


def promtool_check(exprs: list[str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """``promtool check rules`` on a rules file with one recording rule per expression."""
    rules = [{"record": f"dashboard:query_{i}", "expr": e} for i, e in enumerate(exprs)]
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    return subprocess.run([PROMTOOL, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)


# --- the file -----------------------------------------------------------------------------------
def test_the_file_is_what_the_generator_writes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert GEN.DASHBOARD_FILE.read_text() == GEN.dashboard_text(), "run python scripts/gen_dashboard.py"
    assert GEN.main(["--check"]) == 0
    copy = tmp_path / "nodetune.json"
    copy.write_text(GEN.DASHBOARD_FILE.read_text().replace("now-1h", "now-6h"))
    monkeypatch.setattr(GEN, "DASHBOARD_FILE", copy)
    assert GEN.main(["--check"]) == 1


def test_valid_dashboard_json_with_its_variables() -> None:
    d = board()
    assert d["uid"] == "nodetune" and d["title"] and d["schemaVersion"] >= 36
    variables = {v["name"]: v for v in d["templating"]["list"]}
    assert set(variables) == {"datasource", "node", "namespace", "pod"}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    for name in ("node", "namespace", "pod"):
        assert variables[name]["includeAll"] and variables[name]["allValue"] == ".*"
    # the pod list follows the node and namespace chosen
    assert "$node" in variables["pod"]["definition"] and "$namespace" in variables["pod"]["definition"]


def test_every_panel_queries_the_chosen_datasource_and_fits_the_grid() -> None:
    ids = set()
    cells: set[tuple[int, int]] = set()
    for p in board()["panels"]:
        pos = p["gridPos"]
        assert pos["x"] >= 0 and pos["x"] + pos["w"] <= 24, p["title"]
        mine = {(x, y) for x in range(pos["x"], pos["x"] + pos["w"]) for y in range(pos["y"], pos["y"] + pos["h"])}
        assert not mine & cells, f"{p['title']} overlaps another panel"
        cells |= mine
        if p["type"] == "row":
            continue
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        assert p["targets"] and p["description"], p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert len(set(refs)) == len(refs)
        for t in p["targets"]:
            assert t["datasource"] == p["datasource"]
            assert t["expr"].strip()
        ids.add(p["title"])
    assert len(ids) == len(panels()), "panel titles repeat"


# --- queries --------------------------------------------------------------------------------------
def test_every_query_parses(tmp_path: Path) -> None:
    exprs = all_exprs()
    assert len(exprs) == len(targets()) + 3
    result = promtool_check(exprs, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(exprs)} rules found" in result.stdout


def test_the_parse_check_can_fail(tmp_path: Path) -> None:
    exprs = all_exprs()
    exprs[3] = exprs[3].replace("sum by", "sum bye")
    assert promtool_check(exprs, tmp_path).returncode != 0


def test_variables_are_substituted_like_grafana_all() -> None:
    q = GEN.substitute('rate(x{node=~"$node", pod=~"${pod}"}[$__rate_interval])', "30s")
    assert q == 'rate(x{node=~".*", pod=~".*"}[30s])'
    assert all("$" not in e for e in all_exprs())


def test_queries_option_prints_every_target() -> None:
    out = subprocess.run(
        [sys.executable, "scripts/gen_dashboard.py", "--queries", "--interval", "30s"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    printed = json.loads(out.stdout)
    assert len(printed) == len(targets())
    assert all("[30s]" in q["expr"] or "[" not in q["expr"] for q in printed)


def test_the_panels_the_issue_asks_for() -> None:
    heatmaps = [(p, t) for p, t in targets() if p["type"] == "heatmap"]
    rq = "nodetune_runqueue_latency_seconds_bucket"
    assert len(heatmaps) == 2
    for p, t in heatmaps:
        assert t["format"] == "heatmap" and t["legendFormat"] == "{{le}}", p["title"]
        assert reads(t["expr"]).grouping == {"le"} and reads(t["expr"]).metrics == {rq}
        assert p["options"]["calculate"] is False  # the agent's buckets, not Grafana's
    assert ["$pod" in t["expr"] for _, t in heatmaps] == [False, True]  # per node, per pod

    def panel_reading(*metrics: str, legend: str = "", grouping: str = "") -> list[str]:
        return [
            p["title"]
            for p, t in targets()
            if set(metrics) <= reads(t["expr"]).metrics
            and legend in t["legendFormat"]
            and (not grouping or grouping in reads(t["expr"]).grouping)
        ]

    assert panel_reading(rq, grouping="pod") and panel_reading(rq, legend="{{node}}")  # p99 per pod and node
    assert any("histogram_quantile(0.99" in t["expr"] and rq in t["expr"] for _, t in targets())
    assert panel_reading("nodetune_cpu_cfs_throttled_periods_total", "nodetune_cpu_cfs_periods_total")
    assert panel_reading("nodetune_cpu_usage_seconds_total") and panel_reading("nodetune_cpu_limit_cores")
    saturation = panel_reading(
        "nodetune_ephemeral_ports_in_use", "nodetune_ephemeral_port_range_size", legend="{{destination}}"
    )
    assert saturation
    assert panel_reading("nodetune_connect_port_allocation_failures_total")
    assert panel_reading("nodetune_tcp_listen_overflows_total")
    assert panel_reading("nodetune_lock_contention_wait_seconds_total", legend="{{caller}}")
    assert panel_reading("nodetune_workload_lock_wait_seconds_total", legend="{{pod}}")
    assert panel_reading("nodetune_tuning_in_sync") and panel_reading("nodetune_tuning_profile_info")


# --- names ----------------------------------------------------------------------------------------
@pytest.mark.bpf
def test_queries_use_only_series_and_labels_the_agent_exports(header_cache: Path) -> None:
    exported = agent_exports(header_cache)
    for expr in all_exprs():
        found = reads(expr)
        assert found.metrics, expr
        assert found.metrics - PROMETHEUS_SERIES <= exported.series, found.metrics - exported.series
        for metric, labels in found.matchers.items():
            known = exported.labels.get(metric, exported.all_labels) | TARGET_LABELS
            assert labels <= known, f"{metric}: matchers on {labels - known}"
        assert found.grouping <= exported.all_labels, found.grouping - exported.all_labels
    for p, t in targets():
        legend_labels = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", t["legendFormat"]))
        assert legend_labels <= exported.all_labels, f"{p['title']}: {legend_labels - exported.all_labels}"
    for v in board()["templating"]["list"]:
        if v["type"] == "query":
            label = re.fullmatch(r"label_values\((.+), *(\w+)\)", v["definition"]).group(2)
            assert label in exported.all_labels

"""Generates nodetune's Grafana dashboard (``manifests/base/dashboards/nodetune.json``).

Rows: run-queue latency (heatmaps per node and per pod over the histogram's ``le``, p99 per node and
per pod), CPU throttling (ratio, usage against the limit), ports and connections (port saturation by
destination, allocation failures, port search p99, listen overflows and queue saturation), kernel
locks (wait by caller and by pod), tuning and the agent itself. Variables: datasource, node, namespace,
pod; "All" is ``.*``, which also matches series without the label (host cgroups have no pod).

    python scripts/gen_dashboard.py                         # rewrite the dashboard
    python scripts/gen_dashboard.py --check                 # exit 1 if the file is out of date
    python scripts/gen_dashboard.py --queries --interval 30s  # every panel's query, variables set to
                                                              # "All", as JSON (for end-to-end tests)

The ``node`` label is the one the manifests' scrape configs relabel from the pod's node name.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
DASHBOARD_FILE = REPO / "manifests/base/dashboards/nodetune.json"

DS = {"type": "prometheus", "uid": "${datasource}"}
NODE = 'node=~"$node"'
WORKLOAD = f'{NODE}, namespace=~"$namespace", pod=~"$pod"'
RATE = "$__rate_interval"
WORKLOAD_LEGEND = "{{namespace}}/{{pod}} {{container}} {{cgroup}}"
NETNS_LEGEND = "{{namespace}}/{{pod}} {{netns}}"
#: what the variables stand for in --queries (Grafana's "All")
ALL = {"node": ".*", "namespace": ".*", "pod": ".*"}


def target(expr: str, legend: str = "", fmt: str = "time_series", instant: bool = False) -> dict[str, Any]:
    t: dict[str, Any] = {"datasource": DS, "expr": expr, "legendFormat": legend, "format": fmt, "range": not instant}
    if instant:
        t["instant"] = True
    return t


class Layout:
    """Panels placed on Grafana's 24-column grid, row by row."""

    def __init__(self) -> None:
        self.panels: list[dict[str, Any]] = []
        self.y = 0
        self.x = 0
        self.row_h = 0

    def row(self, title: str) -> None:
        self._newline()
        self.panels.append(
            {"type": "row", "title": title, "collapsed": False, "gridPos": {"h": 1, "w": 24, "x": 0, "y": self.y}}
        )
        self.y += 1

    def _newline(self) -> None:
        if self.x:
            self.y += self.row_h
            self.x = 0
            self.row_h = 0

    def add(self, panel: dict[str, Any], w: int = 12, h: int = 8) -> None:
        if self.x + w > 24:
            self._newline()
        panel["gridPos"] = {"h": h, "w": w, "x": self.x, "y": self.y}
        panel["datasource"] = DS
        for i, t in enumerate(panel["targets"]):
            t["refId"] = chr(ord("A") + i)
        self.panels.append(panel)
        self.x += w
        self.row_h = max(self.row_h, h)


def heatmap(title: str, description: str, expr: str) -> dict[str, Any]:
    return {
        "type": "heatmap",
        "title": title,
        "description": description,
        "targets": [target(expr, "{{le}}", fmt="heatmap")],
        "options": {
            "calculate": False,
            "yAxis": {"unit": "s", "axisPlacement": "left"},
            "cellGap": 1,
            "color": {"mode": "scheme", "scheme": "Oranges", "steps": 64, "exponent": 0.5},
            "rowsFrame": {"layout": "auto"},
            "tooltip": {"mode": "single", "yHistogram": True},
            "legend": {"show": True},
        },
        "fieldConfig": {"defaults": {}, "overrides": []},
    }


def timeseries(
    title: str,
    description: str,
    targets: list[dict[str, Any]],
    unit: str,
    thresholds: list[tuple[float, str]] | None = None,
) -> dict[str, Any]:
    steps: list[dict[str, Any]] = [{"color": "green", "value": None}]
    steps += [{"color": color, "value": value} for value, color in thresholds or []]
    return {
        "type": "timeseries",
        "title": title,
        "description": description,
        "targets": targets,
        "fieldConfig": {
            "defaults": {
                "unit": unit,
                "min": 0,
                "thresholds": {"mode": "absolute", "steps": steps},
                "custom": {"thresholdsStyle": {"mode": "dashed" if thresholds else "off"}},
            },
            "overrides": [],
        },
        "options": {"legend": {"displayMode": "table", "placement": "bottom", "calcs": ["max", "lastNotNull"]}},
    }


def table(title: str, description: str, targets: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "type": "table",
        "title": title,
        "description": description,
        "targets": targets,
        "transformations": [{"id": "merge", "options": {}}],
        "fieldConfig": {"defaults": {}, "overrides": []},
        "options": {"showHeader": True},
    }


def variable(name: str, label: str, query: str) -> dict[str, Any]:
    return {
        "type": "query",
        "name": name,
        "label": label,
        "datasource": DS,
        "query": {"query": query, "refId": f"{name}-values"},
        "definition": query,
        "includeAll": True,
        "allValue": ".*",
        "multi": True,
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
        "refresh": 2,
        "sort": 1,
    }


def panels() -> list[dict[str, Any]]:
    g = Layout()
    rq = "nodetune_runqueue_latency_seconds_bucket"

    g.row("Run-queue latency (time runnable before running)")
    g.add(
        heatmap(
            "Run-queue latency per node",
            "Waits for a CPU of every task on the selected nodes, per histogram bucket (per second).",
            f"sum by (le) (rate({rq}{{{NODE}}}[{RATE}]))",
        )
    )
    g.add(
        heatmap(
            "Run-queue latency of the selected pods",
            "Waits for a CPU of the selected pods' tasks, per histogram bucket (per second).",
            f"sum by (le) (rate({rq}{{{WORKLOAD}}}[{RATE}]))",
        )
    )
    g.add(
        timeseries(
            "p99 run-queue latency per node",
            "99 % of the waits for a CPU were shorter than this.",
            [target(f"histogram_quantile(0.99, sum by (node, le) (rate({rq}{{{NODE}}}[{RATE}])))", "{{node}}")],
            "s",
            [(0.010, "red")],
        )
    )
    g.add(
        timeseries(
            "p99 run-queue latency per pod",
            "Per pod (containers summed); host cgroups by their cgroup. The alert fires above 10 ms for 10 m.",
            [
                target(
                    "histogram_quantile(0.99, sum by (node, namespace, pod, cgroup, le) "
                    f"(rate({rq}{{{WORKLOAD}}}[{RATE}])))",
                    "{{namespace}}/{{pod}} {{cgroup}} on {{node}}",
                )
            ],
            "s",
            [(0.010, "red")],
        )
    )

    g.row("CPU throttling (CFS bandwidth)")
    by = "by (node, namespace, pod, container, cgroup)"
    g.add(
        timeseries(
            "Throttled share of CFS periods",
            "Periods in which the container used up its quota and waited. Alerts: above 25 % for 15 m; above 5 % "
            "while using less than half its limit (seeds 000 and 002).",
            [
                target(
                    f"sum {by} (rate(nodetune_cpu_cfs_throttled_periods_total{{{WORKLOAD}}}[{RATE}]))\n"
                    f"  / sum {by} (rate(nodetune_cpu_cfs_periods_total{{{WORKLOAD}}}[{RATE}]))",
                    WORKLOAD_LEGEND,
                )
            ],
            "percentunit",
            [(0.05, "orange"), (0.25, "red")],
        )
    )
    g.add(
        timeseries(
            "CPU usage against the limit",
            "Average usage (cores) and the CFS limit of each container: throttling far below the limit means "
            "bursts exhaust the quota; raise the limit or allow a CFS burst.",
            [
                target(
                    f"sum {by} (rate(nodetune_cpu_usage_seconds_total{{{WORKLOAD}}}[{RATE}]))",
                    "usage " + WORKLOAD_LEGEND,
                ),
                target(f"nodetune_cpu_limit_cores{{{WORKLOAD}}}", "limit " + WORKLOAD_LEGEND),
            ],
            "short",
        )
    )

    g.row("Ephemeral ports and connections")
    g.add(
        timeseries(
            "Ephemeral-port saturation by destination",
            "Local ports in use towards each destination over the namespace's usable range (the busiest "
            "destinations). At 100 % connect() to it fails with EADDRNOTAVAIL. Alerts at 75 % and 90 %.",
            [
                target(
                    f"nodetune_ephemeral_ports_in_use{{{WORKLOAD}}}\n"
                    f"  / ignoring (destination) group_left ()\n"
                    f"nodetune_ephemeral_port_range_size{{{WORKLOAD}}}",
                    NETNS_LEGEND + " → {{destination}}",
                )
            ],
            "percentunit",
            [(0.75, "orange"), (0.9, "red")],
        )
    )
    g.add(
        timeseries(
            "connect() port-allocation failures",
            "connect() calls per second that found no free local port for their destination (EADDRNOTAVAIL).",
            [
                target(
                    f"sum {by} (rate(nodetune_connect_port_allocation_failures_total{{{WORKLOAD}}}[{RATE}]))",
                    WORKLOAD_LEGEND,
                )
            ],
            "reqps",
            [(0.000001, "red")],
        )
    )
    g.add(
        timeseries(
            "p99 connect() port search time",
            "Time the kernel spent choosing a local port: grows long before the range is exhausted.",
            [
                target(
                    "histogram_quantile(0.99, sum by (node, namespace, pod, cgroup, le) "
                    f"(rate(nodetune_connect_port_search_seconds_bucket{{{WORKLOAD}}}[{RATE}])))",
                    "{{namespace}}/{{pod}} {{cgroup}} on {{node}}",
                )
            ],
            "s",
        )
    )
    g.add(
        timeseries(
            "Listen-queue overflows and accept-queue saturation",
            "Connections dropped per second because an accept queue was full, and the fullest accept queue "
            "of each namespace (1 = full).",
            [
                target(
                    "sum by (node, namespace, pod, netns) "
                    f"(rate(nodetune_tcp_listen_overflows_total{{{WORKLOAD}}}[{RATE}]))",
                    "overflows/s " + NETNS_LEGEND,
                ),
                target(
                    f"nodetune_tcp_listen_queue_saturation_ratio{{{WORKLOAD}}}",
                    "queue saturation " + NETNS_LEGEND,
                ),
            ],
            "short",
        )
    )

    g.row("Kernel lock contention")
    g.add(
        timeseries(
            "Lock wait by kernel caller",
            "Seconds per second spent waiting on contended kernel locks, by lock type and the kernel "
            "function that took the lock (top callers; the rest in caller=other).",
            [
                target(
                    "topk(10, sum by (node, lock_type, caller) "
                    f"(rate(nodetune_lock_contention_wait_seconds_total{{{NODE}}}[{RATE}])))",
                    "{{lock_type}} {{caller}} on {{node}}",
                )
            ],
            "s",
        )
    )
    g.add(
        timeseries(
            "Lock wait by pod",
            "Seconds per second the selected pods' tasks waited on contended kernel locks, by lock type.",
            [
                target(
                    "sum by (node, namespace, pod, cgroup, lock_type) "
                    f"(rate(nodetune_workload_lock_wait_seconds_total{{{WORKLOAD}}}[{RATE}]))",
                    "{{namespace}}/{{pod}} {{cgroup}} {{lock_type}}",
                )
            ],
            "s",
        )
    )

    g.row("Tuning and the agent")
    g.add(
        table(
            "Tuning state per key",
            "1 = the key holds the profile's value. In observe mode 0 is the report; in enforce mode a 0 "
            "lasting 15 m raises NodetuneTuningOutOfSync.",
            [target(f"nodetune_tuning_in_sync{{{NODE}}}", fmt="table", instant=True)],
        ),
        w=12,
        h=8,
    )
    g.add(
        timeseries(
            "Keys out of sync, per node",
            "Keys of the profile not holding their value, and whether the last profile read was valid.",
            [
                target(f"sum by (node, instance) (1 - nodetune_tuning_in_sync{{{NODE}}})", "out of sync {{node}}"),
                target(f"nodetune_tuning_profile_valid{{{NODE}}}", "profile valid {{node}}"),
            ],
            "short",
        ),
        w=12,
        h=8,
    )
    g.add(
        table(
            "Profile and agent",
            "The profile in force and its mode, the version, and each probe's attach strategy.",
            [
                target(f"nodetune_tuning_profile_info{{{NODE}}}", fmt="table", instant=True),
                target(f"nodetune_build_info{{{NODE}}}", fmt="table", instant=True),
                target(f"nodetune_probe_info{{{NODE}}}", fmt="table", instant=True),
            ],
        ),
        w=12,
        h=8,
    )
    g.add(
        timeseries(
            "Probes and collectors up",
            "1 when a probe is loaded (nodetune_probe_up) and when each collector succeeded in the last scrape.",
            [
                target(f"nodetune_probe_up{{{NODE}}}", "probe {{probe}} {{node}}"),
                target(f"nodetune_scrape_collector_success{{{NODE}}}", "collector {{collector}} {{node}}"),
            ],
            "short",
        ),
        w=12,
        h=8,
    )
    return g.panels


def dashboard() -> dict[str, Any]:
    source = "nodetune_cpu_usage_seconds_total"
    return {
        "uid": "nodetune",
        "title": "nodetune",
        "description": "What hurts latency-sensitive pods on each node: run-queue latency, CFS throttling, "
        "ephemeral ports, listen queues, kernel lock contention; and the node's tuning.",
        "tags": ["nodetune", "kubernetes", "node"],
        "timezone": "browser",
        "editable": True,
        "graphTooltip": 1,
        "refresh": "30s",
        "time": {"from": "now-1h", "to": "now"},
        "schemaVersion": 39,
        "version": 1,
        "links": [],
        "annotations": {"list": []},
        "templating": {
            "list": [
                {
                    "type": "datasource",
                    "name": "datasource",
                    "label": "Data source",
                    "query": "prometheus",
                    "current": {"selected": False, "text": "default", "value": "default"},
                    "hide": 0,
                },
                variable("node", "Node", "label_values(nodetune_build_info, node)"),
                variable("namespace", "Namespace", f"label_values({source}{{{NODE}}}, namespace)"),
                variable("pod", "Pod", f'label_values({source}{{{NODE}, namespace=~"$namespace"}}, pod)'),
            ]
        },
        "panels": panels(),
    }


def dashboard_text() -> str:
    return json.dumps(dashboard(), indent=2, ensure_ascii=False) + "\n"


def substitute(expr: str, interval: str = "5m", values: dict[str, str] | None = None) -> str:
    """A panel query as Grafana sends it: the rate interval and each variable (default: "All")."""
    values = {**ALL, **(values or {})}
    expr = re.sub(r"\$__(rate_interval|interval|range)\b", interval, expr)
    return re.sub(r"\$\{?(\w+)\}?", lambda m: values[m.group(1)], expr)


def queries(interval: str = "5m") -> list[dict[str, str]]:
    """Every panel target's query, variables set to All: what an end-to-end test evaluates."""
    out = []
    for panel in dashboard()["panels"]:
        for t in panel.get("targets", []):
            out.append({"panel": panel["title"], "refId": t["refId"], "expr": substitute(t["expr"], interval)})
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the dashboard file is out of date")
    parser.add_argument("--queries", action="store_true", help="print every panel's query as JSON")
    parser.add_argument("--interval", default="5m", help="rate interval for --queries (default 5m)")
    args = parser.parse_args(argv)
    if args.queries:
        json.dump(queries(args.interval), sys.stdout, indent=1)
        sys.stdout.write("\n")
        return 0
    text = dashboard_text()
    current = DASHBOARD_FILE.read_text() if DASHBOARD_FILE.exists() else None
    if current == text:
        return 0
    if args.check:
        print(f"{DASHBOARD_FILE} is out of date: run python scripts/gen_dashboard.py", file=sys.stderr)
        return 1
    DASHBOARD_FILE.parent.mkdir(parents=True, exist_ok=True)
    DASHBOARD_FILE.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

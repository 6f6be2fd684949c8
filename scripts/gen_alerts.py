"""Generates nodetune's Prometheus alerting and recording rules, in the two forms the manifests ship.

Every threshold, window, ``for`` duration and selector is a constant below, used once; the rules'
texts (summary, description) quote the same constants. The levels ``nodetune doctor`` judges by too
are imported from ``agent/doctor/thresholds.py`` (one source: the doctor and the alerts agree).
Outputs:

* ``manifests/base/alerts/nodetune.rules.yml``: the plain Prometheus rules file (``rule_files:``);
* ``manifests/components/prometheus-operator/prometheusrule.yaml``: the same groups, read back from
  the plain file, as a ``monitoring.coreos.com/v1`` PrometheusRule.

Why a generator and not a hand-written file: an end-to-end run cannot wait 15 minutes for a
``for:``. ``--scale N`` prints the same rules with every window and duration divided by N (5m → 10s
at N=30), so a test with a fast scrape interval fires the very rules the cluster gets, not a copy.

    python scripts/gen_alerts.py             # rewrite both files
    python scripts/gen_alerts.py --check     # exit 1 if either file differs from what it would write
    python scripts/gen_alerts.py --scale 30  # the plain rules, 30 times faster, on stdout

Label assumptions (see README "Alerts and runbook"): the agent's own ``namespace``/``pod`` labels
reach Prometheus unchanged (the scrape uses ``honor_labels: true``), the scrape job is ``job="nodetune"``,
and a ``node`` target label, when the scrape config sets one, names the node (else ``instance``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script: the repository's packages
    sys.path.insert(0, str(REPO))

from agent.doctor import thresholds as shared  # noqa: E402  (the path above first)

RULES_FILE = REPO / "manifests/base/alerts/nodetune.rules.yml"
PROMETHEUS_RULE_FILE = REPO / "manifests/components/prometheus-operator/prometheusrule.yaml"

# --- the constants -------------------------------------------------------------------------------

#: Rate window of every rule (Prometheus needs at least 4 scrapes in it: 5m covers 1m scrapes).
WINDOW_S = 5 * 60

#: CPUThrottlingHigh as in kubernetes-mixin: more than 25 % of CFS periods throttled, for 15 m.
THROTTLED_RATIO = shared.THROTTLE_RATIO_WARN
THROTTLED_FOR_S = 15 * 60

#: Seeds 000 and 002: throttled in more than 5 % of periods while the average usage stays below half
#: the limit. The quota runs out within bursts; the fix is a higher limit or a CFS burst, not less work.
LOW_USAGE_THROTTLED_RATIO = shared.THROTTLED_LOW_USAGE_RATIO
LOW_USAGE_MAX_RATIO = shared.THROTTLED_LOW_USAGE
LOW_USAGE_FOR_S = 15 * 60

#: Run-queue latency: p99 of a pod's waits for a CPU above 10 ms (seed 000: 0.1 % of Redis requests
#: over 10 ms), for 10 m.
RUNQUEUE_QUANTILE = 0.99
RUNQUEUE_P99_S = shared.RUNQ_P99_WARN_S
RUNQUEUE_FOR_S = 10 * 60

#: Ephemeral ports towards one destination, as a share of the usable range (node-mixin's
#: saturation levels). At 1 the next connect() to that destination fails.
PORTS_WARNING_RATIO = shared.PORT_SATURATION_WARN
PORTS_WARNING_FOR_S = 5 * 60
PORTS_CRITICAL_RATIO = shared.PORT_SATURATION_CRIT
PORTS_CRITICAL_FOR_S = 2 * 60

#: Any connect() that found no local port (EADDRNOTAVAIL), and any listen-queue overflow: at once.
PORT_FAILURES_FOR_S = 0
LISTEN_OVERFLOWS_FOR_S = 0

#: Tuning: a key that does not hold its value for this long in enforce mode (the agent re-applies
#: drift within a minute), a rejected profile, a probe not loaded, a collector failing.
TUNING_OUT_OF_SYNC_FOR_S = 15 * 60
#: Only where the agent enforces: in observe mode being away from the profile is the report itself.
TUNING_MODE_SELECTOR = 'mode="enforce"'
TUNING_INVALID_FOR_S = 5 * 60
PROBE_DOWN_FOR_S = 10 * 60
COLLECTOR_FAILING_FOR_S = 10 * 60

#: The agent's scrape job (the plain scrape config's job_name; the ServiceMonitor's Service name).
AGENT_JOB_SELECTOR = 'job="nodetune"'
AGENT_DOWN_FOR_S = 5 * 60
AGENT_ABSENT_FOR_S = 15 * 60

#: Workload series the CPU alerts look at: pod containers and limited host cgroups, not the
#: pod-level cgroup (``container=""`` with a pod name), which would repeat its containers' alert.
CPU_SELECTORS = ('container!=""', 'pod=""')
#: Run-queue latency is alerted per pod (its containers summed); host cgroups are left out.
RUNQUEUE_SELECTOR = 'pod!=""'

#: Where each alert's runbook is: a README section named after the alert.
RUNBOOK_BASE = "README.md"

# --- texts shared by the rules -------------------------------------------------------------------

NODE = "{{ with $labels.node }}{{ . }}{{ else }}{{ $labels.instance }}{{ end }}"
WORKLOAD = (
    "{{ if $labels.pod }}pod {{ $labels.namespace }}/{{ $labels.pod }} container {{ $labels.container }}"
    "{{ else }}cgroup {{ $labels.cgroup }}{{ end }}"
)
NETNS = (
    "{{ if $labels.pod }}pod {{ $labels.namespace }}/{{ $labels.pod }}{{ else }}network namespace "
    "{{ $labels.netns }}{{ end }}"
)

# Recorded series (the alerts and the README's queries use them; their names carry no window, so
# that a scaled copy keeps them).
THROTTLED = "nodetune:cpu_cfs_throttled_periods:ratio"
USAGE = "nodetune:cpu_usage_seconds:ratio_limit"
RUNQUEUE_P99 = "nodetune:runqueue_latency_seconds:p99"
PORTS = "nodetune:ephemeral_ports_in_use:ratio"


def duration(seconds: float) -> str:
    """Prometheus duration text: 900 -> '15m', 10 -> '10s', 0 -> '0s'."""
    s = round(seconds)
    if s and s % 3600 == 0:
        return f"{s // 3600}h"
    if s and s % 60 == 0:
        return f"{s // 60}m"
    return f"{s}s"


def percent(ratio: float) -> str:
    return f"{ratio * 100:g} %"


def rules(scale: float = 1.0) -> dict[str, Any]:
    """The rule groups, every duration divided by ``scale`` (at least 1 s for windows)."""
    if scale <= 0:
        raise ValueError("scale must be positive")

    def d(seconds: int, floor: int = 0) -> str:
        return duration(max(seconds / scale, floor) if seconds else 0)

    w = d(WINDOW_S, 1)
    window_text = duration(WINDOW_S)  # texts name the production window, whatever the scale

    def cpu_rate(metric: str, over: str | None = None) -> str:
        parts = []
        for sel in CPU_SELECTORS:
            num = f"rate({metric}{{{sel}}}[{w}])"
            den = f"rate({over}{{{sel}}}[{w}])" if over else f"nodetune_cpu_limit_cores{{{sel}}}"
            parts.append(f"({num} / {den})")
        return "\n  or\n".join(parts) + "\n"

    def alert(name: str, expr: str, for_s: int, severity: str, summary: str, description: str) -> dict[str, Any]:
        rule: dict[str, Any] = {"alert": name, "expr": expr}
        if for_s:  # no "for": fires at the first evaluation that finds it true
            rule["for"] = d(for_s)
        return rule | {
            "labels": {"severity": severity},
            "annotations": {
                "summary": summary,
                "description": description,
                "runbook_url": f"{RUNBOOK_BASE}#{name.lower()}",
            },
        }

    usage_query = (
        "{{ with printf `" + USAGE + '{namespace="%s",pod="%s",container="%s",cgroup="%s",instance="%s"}` '
        "$labels.namespace $labels.pod $labels.container $labels.cgroup $labels.instance | query }}"
        "{{ . | first | value | humanizePercentage }}{{ else }}an unknown share{{ end }}"
    )
    recording = [
        {
            "record": THROTTLED,
            "expr": cpu_rate("nodetune_cpu_cfs_throttled_periods_total", "nodetune_cpu_cfs_periods_total"),
        },
        {"record": USAGE, "expr": cpu_rate("nodetune_cpu_usage_seconds_total")},
        {
            "record": RUNQUEUE_P99,
            "expr": (
                f"histogram_quantile({RUNQUEUE_QUANTILE}, sum without (container, cgroup) "
                f"(rate(nodetune_runqueue_latency_seconds_bucket{{{RUNQUEUE_SELECTOR}}}[{w}])))\n"
            ),
        },
        {
            # Per destination: the top destinations' ports over the range. The busiest destination
            # is always among them; a namespace with none listed (--ports-top-destinations 0) falls
            # back to its saturation without a destination label.
            "record": PORTS,
            "expr": (
                "nodetune_ephemeral_ports_in_use\n"
                "  / ignoring (destination) group_left ()\n"
                "(nodetune_ephemeral_port_range_size > 0)\n"
                "or ignoring (destination)\n"
                "nodetune_ephemeral_port_saturation_ratio\n"
            ),
        },
    ]
    alerts = [
        alert(
            "NodetuneCPUThrottlingHigh",
            f"{THROTTLED} > {THROTTLED_RATIO}\n",
            THROTTLED_FOR_S,
            "warning",
            f"CPU throttled in more than {percent(THROTTLED_RATIO)} of CFS periods.",
            f"{WORKLOAD} on {NODE} was throttled in {{{{ $value | humanizePercentage }}}} of its CFS periods "
            f"over the last {window_text}.",
        ),
        alert(
            "NodetuneCPUThrottledAtLowUsage",
            f"{THROTTLED} > {LOW_USAGE_THROTTLED_RATIO}\nand\n{USAGE} < {LOW_USAGE_MAX_RATIO}\n",
            LOW_USAGE_FOR_S,
            "warning",
            f"CPU throttled while using less than {percent(LOW_USAGE_MAX_RATIO)} of its limit.",
            f"{WORKLOAD} on {NODE} was throttled in {{{{ $value | humanizePercentage }}}} of its CFS periods "
            f"over the last {window_text} while using {usage_query} of its CPU limit on average: its quota "
            "runs out within bursts. Raise the limit or allow a CFS burst; less work will not help.",
        ),
        alert(
            "NodetuneRunqueueLatencyHigh",
            f"{RUNQUEUE_P99} > {RUNQUEUE_P99_S}\n",
            RUNQUEUE_FOR_S,
            "warning",
            f"p{RUNQUEUE_QUANTILE * 100:g} run-queue latency above {RUNQUEUE_P99_S * 1000:g} ms.",
            f"Tasks of pod {{{{ $labels.namespace }}}}/{{{{ $labels.pod }}}} on {NODE} waited "
            f"{{{{ $value | humanizeDuration }}}} or more for a CPU in {100 - RUNQUEUE_QUANTILE * 100:g} % of "
            f"their runs over the last {window_text} (p{RUNQUEUE_QUANTILE * 100:g}).",
        ),
        alert(
            "NodetuneEphemeralPortsSaturated",
            f"{PORTS} > {PORTS_WARNING_RATIO}\n",
            PORTS_WARNING_FOR_S,
            "warning",
            f"More than {percent(PORTS_WARNING_RATIO)} of the ephemeral ports in use towards one destination.",
            f"{NETNS} on {NODE} uses {{{{ $value | humanizePercentage }}}} of its ephemeral port range towards "
            "{{ with $labels.destination }}{{ . }}{{ else }}its busiest destination{{ end }}.",
        ),
        alert(
            "NodetuneEphemeralPortsSaturated",
            f"{PORTS} > {PORTS_CRITICAL_RATIO}\n",
            PORTS_CRITICAL_FOR_S,
            "critical",
            f"More than {percent(PORTS_CRITICAL_RATIO)} of the ephemeral ports in use towards one destination.",
            f"{NETNS} on {NODE} uses {{{{ $value | humanizePercentage }}}} of its ephemeral port range towards "
            "{{ with $labels.destination }}{{ . }}{{ else }}its busiest destination{{ end }}: "
            "connect() to it fails with EADDRNOTAVAIL at 100 %.",
        ),
        alert(
            "NodetunePortAllocationFailures",
            f"increase(nodetune_connect_port_allocation_failures_total[{w}]) > {shared.PORT_FAILURES_CRIT}\n",
            PORT_FAILURES_FOR_S,
            "critical",
            "connect() found no free local port (EADDRNOTAVAIL).",
            f'About {{{{ printf "%.0f" $value }}}} connect() calls of {WORKLOAD} on {NODE} found no free local '
            f"port for their destination over the last {window_text}.",
        ),
        alert(
            "NodetuneListenQueueOverflows",
            f"increase(nodetune_tcp_listen_overflows_total[{w}]) > {shared.LISTEN_OVERFLOWS_WARN}\n",
            LISTEN_OVERFLOWS_FOR_S,
            "warning",
            "Connections dropped because a listener's accept queue was full.",
            f'About {{{{ printf "%.0f" $value }}}} connections to listeners of {NETNS} on {NODE} were dropped over the '
            f"last {window_text} because an accept queue was full.",
        ),
        alert(
            "NodetuneTuningOutOfSync",
            "nodetune_tuning_in_sync == 0\n"
            f"and ignoring (item, key, profile, mode)\nnodetune_tuning_profile_info{{{TUNING_MODE_SELECTOR}}}\n",
            TUNING_OUT_OF_SYNC_FOR_S,
            "warning",
            "A tuned key does not hold the profile's value although the agent enforces it.",
            f"{{{{ $labels.item }}}} {{{{ $labels.key }}}} on {NODE} has not held its profile value for "
            f"{duration(TUNING_OUT_OF_SYNC_FOR_S)} in enforce mode.",
        ),
        alert(
            "NodetuneTuningProfileInvalid",
            "nodetune_tuning_profile_valid == 0\n",
            TUNING_INVALID_FOR_S,
            "warning",
            "The agent rejected its tuning profile and keeps the previous one.",
            f"The tuning profile the agent on {NODE} last read is invalid; it keeps its last good profile.",
        ),
        alert(
            "NodetuneProbeDown",
            "nodetune_probe_up == 0\n",
            PROBE_DOWN_FOR_S,
            "warning",
            "A nodetune BPF probe is not loaded.",
            f"Probe {{{{ $labels.probe }}}} is not loaded on {NODE}: its signals are missing there.",
        ),
        alert(
            "NodetuneCollectorFailing",
            "nodetune_scrape_collector_success == 0\n",
            COLLECTOR_FAILING_FOR_S,
            "warning",
            "A nodetune probe or collector fails at every scrape.",
            f"Collector {{{{ $labels.collector }}}} on {NODE} failed in every scrape for "
            f"{duration(COLLECTOR_FAILING_FOR_S)}: its metrics are missing there.",
        ),
        alert(
            "NodetuneAgentDown",
            f"up{{{AGENT_JOB_SELECTOR}}} == 0\n",
            AGENT_DOWN_FOR_S,
            "warning",
            "A nodetune agent does not answer scrapes.",
            f"The nodetune agent at {{{{ $labels.instance }}}} on {NODE} has not answered a scrape for "
            f"{duration(AGENT_DOWN_FOR_S)}.",
        ),
        alert(
            "NodetuneAgentAbsent",
            f"absent(up{{{AGENT_JOB_SELECTOR}}})\n",
            AGENT_ABSENT_FOR_S,
            "warning",
            "Prometheus scrapes no nodetune agent at all.",
            f"No target of {AGENT_JOB_SELECTOR} has been discovered for {duration(AGENT_ABSENT_FOR_S)}.",
        ),
    ]
    return {
        "groups": [
            {"name": "nodetune.rules", "rules": recording},
            {"name": "nodetune.alerts", "rules": alerts},
        ]
    }


class _Dumper(yaml.SafeDumper):
    """Block style for multi-line strings (the exprs), so the file reads like a hand-written one."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def dump(doc: dict[str, Any], header: str) -> str:
    body = yaml.dump(doc, Dumper=_Dumper, sort_keys=False, width=1000, allow_unicode=True)
    return "".join(f"# {line}\n" if line else "#\n" for line in header.splitlines()) + body


def plain_rules_text(scale: float = 1.0) -> str:
    header = "Generated by scripts/gen_alerts.py: edit its constants, then run it. Do not edit by hand."
    if scale != 1.0:
        header += f"\nEvery window and duration divided by {scale:g}: for tests only."
    return dump(rules(scale), header)


def prometheus_rule_text(plain: str) -> str:
    """The PrometheusRule holding exactly the groups of the plain rules file's text."""
    groups = yaml.safe_load(plain)["groups"]
    doc = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {
            "name": "nodetune",
            # kube-prometheus's Prometheus selects rules by these labels; adjust ruleSelector otherwise.
            "labels": {"app.kubernetes.io/name": "nodetune", "prometheus": "k8s", "role": "alert-rules"},
        },
        "spec": {"groups": groups},
    }
    header = (
        "Generated by scripts/gen_alerts.py from manifests/base/alerts/nodetune.rules.yml.\n"
        "Do not edit by hand: edit the script's constants, then run it."
    )
    return dump(doc, header)


def outputs() -> dict[Path, str]:
    plain = plain_rules_text()
    return {RULES_FILE: plain, PROMETHEUS_RULE_FILE: prometheus_rule_text(plain)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if a generated file is out of date")
    parser.add_argument("--scale", type=float, default=None, help="print the plain rules N times faster")
    args = parser.parse_args(argv)
    if args.scale is not None:
        if args.scale <= 0:
            parser.error("--scale must be positive")
        sys.stdout.write(plain_rules_text(args.scale))
        return 0
    stale = []
    for path, text in outputs().items():
        current = path.read_text() if path.exists() else None
        if current == text:
            continue
        stale.append(path)
        if not args.check:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    if args.check and stale:
        for path in stale:
            print(f"{path} is out of date: run python scripts/gen_alerts.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

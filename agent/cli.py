"""Command line: ``nodetune run``, ``nodetune probes`` and ``nodetune tune`` (agent/tuning/command.py).

Exit codes: 0 done; 2 invalid input (nothing was touched); ``tune`` adds 1 (pending or drift) and
3 (apply failed, rolled back). Every flag is validated, whole, by
``AgentConfig`` before the host is touched.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from agent import __version__, logs
from agent.config import (
    DEFAULT_PORT,
    HIERARCHY_CHOICES,
    AgentConfig,
    ConfigError,
    check_listen,
    parse_collectors,
    parse_listen,
    parse_probes,
)
from probes import PROBES

log = logging.getLogger("agent.cli")


def _common(p: argparse.ArgumentParser, log_level: str = "info") -> None:
    p.add_argument("--host-root", default="/", help="where the host's / is mounted (default: /)")
    p.add_argument("--probes", default="all", help="comma list of probes, 'all' (default) or 'none'")
    p.add_argument("--log-level", default=log_level, help=f"debug, info, warning, error (default {log_level})")
    p.add_argument("--cache-dir", default="/var/cache/nodetune", help="private state, e.g. merged kernel headers")
    p.add_argument(
        "--cgroup-hierarchy",
        default="auto",
        help=f"cgroup the probes charge a task to: {', '.join(HIERARCHY_CHOICES)} (default auto)",
    )
    for probe, cls in PROBES.items():  # each probe declares its own settings (probes/settings.py)
        p.add_argument(
            f"--{probe}-strategy",
            dest=f"strategy__{probe}",
            default="auto",
            help=f"attach strategy: {', '.join(cls.strategies)}, or auto (default: the first this kernel supports)",
        )
        for setting in cls.settings:
            p.add_argument(
                setting.flag(probe),
                dest=f"probe__{probe}__{setting.name}",
                type=int,
                default=setting.default,
                help=f"{setting.help} (default {setting.default})",
            )


def probe_settings(args: argparse.Namespace) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for key, value in vars(args).items():
        if key.startswith("probe__"):
            _, probe, name = key.split("__", 2)
            out.setdefault(probe, {})[name] = value
    return out


def probe_strategies(args: argparse.Namespace) -> dict[str, str]:
    """Probes whose attach strategy was chosen (``--<probe>-strategy``, not ``auto``)."""
    prefix = "strategy__"
    return {k[len(prefix) :]: v for k, v in vars(args).items() if k.startswith(prefix) and v != "auto"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nodetune", description="Kubernetes node agent: latency signals per workload."
    )
    parser.add_argument("--version", action="version", version=f"nodetune {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="load probes and serve Prometheus metrics")
    run.add_argument("--listen", default=f"0.0.0.0:{DEFAULT_PORT}", help=f"HOST:PORT (default 0.0.0.0:{DEFAULT_PORT})")
    _common(run)
    run.add_argument("--max-concurrent-scrapes", type=int, default=4, help="more get HTTP 503 (default 4)")
    run.add_argument(
        "--web-config-file",
        default=None,
        help="TLS, client certificates and basic auth for the endpoint (Prometheus exporter-toolkit format)",
    )
    run.add_argument(
        "--http-max-connections", type=int, default=4096, help="open HTTP connections at most (default 4096)"
    )
    run.add_argument(
        "--http-max-header-bytes", type=int, default=16384, help="request header bytes at most; more get 431"
    )
    run.add_argument(
        "--http-read-timeout", type=float, default=10.0, help="seconds to receive a request head (default 10)"
    )
    run.add_argument(
        "--http-idle-timeout", type=float, default=30.0, help="seconds a kept-alive connection may idle (default 30)"
    )
    run.add_argument(
        "--collectors", default="all", help="comma list of throttling, listen, ports; 'all' (default) or 'none'"
    )
    run.add_argument("--node-name", default="", help="this node's name (default: $NODE_NAME)")
    run.add_argument(
        "--ports-top-destinations", type=int, default=5, help="destinations per namespace with a series (default 5)"
    )
    run.add_argument("--kubeconfig", default=None, help="kubeconfig (default: in-cluster inside a pod, else no API)")
    run.add_argument("--profile", default=None, help="tuning profile YAML (default: the built-in one, observe only)")
    run.add_argument("--mode", default="observe", help="observe (default: report only) or enforce (apply, fix drift)")
    run.add_argument(
        "--bpf-stats",
        action="store_true",
        help="keep the kernel's BPF run-time stats on while running, to export what each probe program costs",
    )
    run.add_argument(
        "--workload-series-grace",
        type=float,
        default=300.0,
        help="seconds a workload's series outlive its last cgroup (default 300)",
    )

    probes = sub.add_parser("probes", help="say, for each probe, whether it loads here and how")
    _common(probes, log_level="warning")
    probes.add_argument("--json", action="store_true", help="machine-readable output")
    probes.add_argument("--print-c", metavar="PROBE", help=argparse.SUPPRESS)  # hidden: generated C + cflags

    from agent.tuning import command as tune_command

    tune_command.add_parser(sub)

    from agent.doctor import command as doctor_command

    doctor = sub.add_parser(
        "doctor", help="a one-shot verdict on this node: exit 0 all OK, 1 a WARN, 2 a CRIT, 3 could not run"
    )
    _common(doctor, log_level="error")
    doctor_command.add_arguments(doctor)
    return parser


def config_from_args(args: argparse.Namespace) -> AgentConfig:
    kwargs: dict[str, object] = {
        "host_root": Path(args.host_root),
        "probes": parse_probes(args.probes),
        "log_level": args.log_level,
        "cache_dir": Path(args.cache_dir),
        "cgroup_hierarchy": args.cgroup_hierarchy,
        "probe_settings": probe_settings(args),
        "probe_strategies": probe_strategies(args),
    }
    if args.command == "run":
        host, port = parse_listen(args.listen)
        kwargs.update(
            listen_host=host,
            listen_port=port,
            max_concurrent_scrapes=args.max_concurrent_scrapes,
            web_config_file=Path(args.web_config_file) if args.web_config_file else None,
            http_max_connections=args.http_max_connections,
            http_max_header_bytes=args.http_max_header_bytes,
            http_read_timeout_s=args.http_read_timeout,
            http_idle_timeout_s=args.http_idle_timeout,
            workload_series_grace_s=args.workload_series_grace,
            collectors=parse_collectors(args.collectors),
            node_name=args.node_name or os.environ.get("NODE_NAME", ""),
            ports_top_destinations=args.ports_top_destinations,
            kubeconfig=Path(args.kubeconfig) if args.kubeconfig else None,
            profile=Path(args.profile) if args.profile else None,
            mode=args.mode,
            bpf_stats=args.bpf_stats,
        )
    return AgentConfig(**kwargs)  # type: ignore[arg-type]


def cmd_probes(config: AgentConfig, as_json: bool, print_c: str | None) -> int:
    from agent.daemon import Agent

    agent = Agent(config, collectors=False)
    if print_c:
        probe = next((p for p in agent.candidates if p.name == print_c), None)
        if probe is None:
            print(f"nodetune: unknown probe {print_c!r}", file=sys.stderr)
            return 2
        text, cflags = probe.render()
        print(f"// cflags: {' '.join(cflags)}\n{text}")
        return 0
    try:
        agent.load_probes()
        report = {
            "kernel": agent.kernel.release,
            "headers": agent.kernel.describe_headers(),
            "cgroup_hierarchy": agent.hierarchy,
            "probes": [
                {
                    "probe": s.name,
                    "loadable": s.attach != "",
                    "attach": s.attach or None,
                    "reason": s.reason or None,
                    "skipped": s.skipped,
                }
                for s in agent.probes.values()
            ],
        }
    finally:
        agent.close()
    if as_json:
        print(json.dumps(report, indent=2))
    else:
        print(f"kernel:  {report['kernel']}\nheaders: {report['headers']}")
        print(f"cgroups: workloads charged to the {report['cgroup_hierarchy']} hierarchy")
        for p in report["probes"]:
            if p["loadable"]:
                print(f"{p['probe']}: loadable, attach={p['attach']}")
            else:
                print(f"{p['probe']}: NOT loadable: {p['reason']}")
            for strategy, why in p["skipped"].items():
                print(f"  {strategy} not used: {why}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "tune":
        from agent.tuning import command as tune_command

        logs.setup("info")
        return tune_command.run(args)
    if args.command == "doctor":
        from agent.doctor import command as doctor_command

        logs.setup(args.log_level if args.log_level in logs.LEVELS else "warning")
        return doctor_command.run(args, config_from_args)
    try:
        config = config_from_args(args)
        if args.command == "run":
            check_listen(config.listen_host, config.listen_port)
    except ConfigError as e:
        print(f"nodetune: {e}", file=sys.stderr)
        return 2
    logs.setup(config.log_level)
    if args.command == "run":
        from agent.daemon import run

        return run(config)
    return cmd_probes(config, args.json, args.print_c)


if __name__ == "__main__":
    sys.exit(main())

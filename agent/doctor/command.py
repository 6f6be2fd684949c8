"""``nodetune doctor [--duration S] [--from URL] [--json]``: read twice, ``--duration`` apart, judge,
print. Exit 0 all OK, 1 a WARN, 2 a CRIT, 3 could not run (bad input included: the doctor's 2 means
CRIT). The other flags are ``nodetune run``'s (``--probes``, ``--host-root``, strategies ...), so the
live run loads what the agent would; ``--probes none`` diagnoses without BPF.

A progress line goes to stderr while sampling, only when stderr is a terminal; colour on stdout only
when stdout is a terminal and ``NO_COLOR`` is unset or empty.
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import shutil
import socket
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TextIO

from agent.doctor import render, report_json
from agent.doctor.analyse import analyse
from agent.doctor.cpu import CpuTimes, window
from agent.doctor.findings import EXIT_FAILED, Report
from agent.doctor.sources import LiveSource, RemoteSource, SourceError

log = logging.getLogger(__name__)

DEFAULT_DURATION_S = 10.0
MIN_DURATION_S, MAX_DURATION_S = 0.2, 3600.0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--duration",
        type=float,
        default=DEFAULT_DURATION_S,
        help=f"seconds between the two readings (default {DEFAULT_DURATION_S:g})",
    )
    p.add_argument(
        "--from",
        dest="from_url",
        metavar="URL",
        default=None,
        help="read a running agent's /metrics (e.g. http://127.0.0.1:9662/metrics) instead of loading the probes",
    )
    p.add_argument("--json", action="store_true", help="the findings as JSON (agent/doctor/schema.json)")
    p.add_argument("--profile", default=None, help="tuning profile to check against (default: the built-in one)")
    p.add_argument(
        "--collectors", default="all", help="comma list of throttling, listen, ports; 'all' (default) or 'none'"
    )
    p.add_argument("--node-name", default="", help="this node's name, for pod names (default: $NODE_NAME)")
    p.add_argument("--kubeconfig", default=None, help="kubeconfig (default: in-cluster inside a pod, else no API)")


def use_colour(stream: TextIO) -> bool:
    return stream.isatty() and not os.environ.get("NO_COLOR")


class Progress:
    """``sampling 3/10 s`` on stderr, rewritten in place, while the window runs (terminals only)."""

    def __init__(self, stream: TextIO, total_s: float) -> None:
        self.stream, self.total_s = stream, total_s
        self.on = stream.isatty()

    def wait(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            if self.on:
                done = self.total_s - left
                self.stream.write(f"\r\033[Knodetune doctor: sampling {done:4.1f}/{self.total_s:g} s")
                self.stream.flush()
            time.sleep(min(0.2, left))
        self.clear()

    def say(self, text: str) -> None:
        if self.on:
            self.stream.write(f"\r\033[K{text}")
            self.stream.flush()

    def clear(self) -> None:
        if self.on:
            self.stream.write("\r\033[K")
            self.stream.flush()


def _silence(stream: TextIO) -> None:
    """Point ``stream``'s descriptor at /dev/null, so nothing more is written to a closed pipe."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, stream.fileno())
        os.close(devnull)
    except (OSError, ValueError, io.UnsupportedOperation):  # not a file descriptor (a test's StringIO)
        pass


def diagnose(
    source: LiveSource | RemoteSource,
    duration_s: float,
    progress: Progress,
    cpu_times: Callable[[], CpuTimes] = CpuTimes.read,
) -> Report:
    """Two readings of ``source`` and of the CPUs, ``duration_s`` apart -> the report."""
    progress.say("nodetune doctor: loading probes and collectors ...")
    source.start()
    before, cpu_before = source.read(), cpu_times()
    log.info("doctor: first reading taken; sampling for %g s", duration_s)
    progress.wait(duration_s)
    after, cpu_after = source.read(), cpu_times()
    unavailable = source.unavailable(after)
    return analyse(
        before,
        after,
        window(cpu_before, cpu_after),
        source.tuning(after),
        unavailable,
        node=socket.gethostname(),
        source=source.name,
    )


def run(
    args: argparse.Namespace,
    config_from_args: Callable[[argparse.Namespace], object],
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
) -> int:
    """The subcommand. ``config_from_args`` is the CLI's (the same flags as ``nodetune run``)."""
    from agent.config import ConfigError, parse_collectors

    stdout, stderr = stdout or sys.stdout, stderr or sys.stderr
    if not MIN_DURATION_S <= args.duration <= MAX_DURATION_S:
        print(f"nodetune doctor: --duration must be within {MIN_DURATION_S:g}-{MAX_DURATION_S:g} s", file=stderr)
        return EXIT_FAILED
    progress = Progress(stderr, args.duration)
    source: LiveSource | RemoteSource | None = None
    report: Report | None = None
    code = EXIT_FAILED
    try:
        try:
            if args.from_url:
                source = RemoteSource(args.from_url, args.host_root)
            else:
                config = replace(
                    config_from_args(args),  # type: ignore[type-var]
                    collectors=parse_collectors(args.collectors),
                    profile=Path(args.profile) if args.profile else None,
                    node_name=args.node_name or os.environ.get("NODE_NAME", ""),
                    kubeconfig=Path(args.kubeconfig) if args.kubeconfig else None,
                )
                source = LiveSource(config)  # type: ignore[arg-type]
            report = diagnose(source, args.duration, progress)
            code = report.exit_code()
            # The verdict first: closing can take seconds (probes detach, the API watch ends).
            if args.json:
                stdout.write(report_json.dumps(report))
            else:
                columns = shutil.get_terminal_size((render.MAX_WIDTH, 24)).columns
                width = columns if stdout.isatty() else render.MAX_WIDTH
                stdout.write(render.render(report, width, use_colour(stdout)))
            stdout.flush()
        finally:
            if source is not None:
                source.close()  # a second Ctrl-C here is caught below: the probes detach in close()
    except (ConfigError, SourceError) as e:
        progress.clear()
        print(f"nodetune doctor: {e}", file=stderr)
        return EXIT_FAILED
    except BrokenPipeError:
        # The reader stopped reading (``doctor | head``): the diagnosis ran, its verdict is the
        # exit code. Python would also complain at exit when flushing the closed stdout: point it
        # at /dev/null (the documented recipe, docs.python.org/3/library/signal.html#note-on-sigpipe).
        _silence(stdout)
        return code if report is not None else EXIT_FAILED
    except KeyboardInterrupt:
        progress.clear()
        print("nodetune doctor: interrupted", file=stderr)
        return EXIT_FAILED
    except Exception:  # a bug: say so with the traceback, and exit "could not run", not "WARN"
        progress.clear()
        traceback.print_exc(file=stderr)
        return EXIT_FAILED
    return code

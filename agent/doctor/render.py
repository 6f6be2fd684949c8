"""The report as text for a person: one line per check (verdict, what was checked, the number behind
it), then the worst workloads, the fix the seeds found, and histograms where they help. Lines never
exceed the given width (100 by default; the terminal's, when narrower). Colour (the verdicts) only
when asked, which the command does when stdout is a terminal and ``NO_COLOR`` is not set
(no-color.org).
"""

from __future__ import annotations

import textwrap

from agent.doctor import histogram
from agent.doctor.findings import CRIT, OK, SKIP, WARN, Finding, Report

RESOURCES = {"cpu": "CPU", "network": "Network", "locks": "Kernel locks", "tuning": "Tuning"}
COLOURS = {OK: "32", WARN: "33", CRIT: "1;31", SKIP: "36"}  # SGR: green, yellow, bold red, cyan
VERDICT_W = 6
TITLE_W = 26
DETAIL_INDENT = " " * (2 + VERDICT_W)
MAX_WIDTH = 100


def paint(text: str, verdict: str, colour: bool) -> str:
    return f"\033[{COLOURS[verdict]}m{text}\033[0m" if colour else text


def bold(text: str, colour: bool) -> str:
    return f"\033[1m{text}\033[0m" if colour else text


def _wrap(text: str, width: int, first: str, rest: str) -> list[str]:
    return textwrap.wrap(
        text,
        width=width,
        initial_indent=first,
        subsequent_indent=rest,
        break_on_hyphens=False,
        break_long_words=True,
    ) or [first.rstrip()]


def finding_lines(f: Finding, width: int, colour: bool) -> list[str]:
    head = f"  {f.verdict:<{VERDICT_W}}{f.title:<{TITLE_W}}"
    lines = _wrap(f.summary, width, head, " " * len(head))
    lines[0] = lines[0].replace(f.verdict, paint(f.verdict, f.verdict, colour), 1)
    for o in f.offenders:
        lines += _wrap(f"{o.name}  {o.detail}", width, DETAIL_INDENT, DETAIL_INDENT + "    ")
    if f.fix:
        lines += _wrap("fix: " + f.fix, width, DETAIL_INDENT, DETAIL_INDENT + "     ")
    for h in f.histograms:
        rows = histogram.rows(h, width - len(DETAIL_INDENT))
        if rows:
            lines += _wrap(f"{h.title} ({h.count} waits):", width, DETAIL_INDENT, DETAIL_INDENT + "    ")
            lines += [DETAIL_INDENT + r for r in rows]
    return lines


def render(report: Report, width: int = MAX_WIDTH, colour: bool = False) -> str:
    width = min(width, MAX_WIDTH)
    source = "live, probes and collectors in this process" if report.source == "live" else report.source
    lines = _wrap(
        f"nodetune doctor: node {report.node}, {report.cpus} CPUs, {report.duration_s:.1f} s sampled ({source})",
        width,
        "",
        "    ",
    )
    resource = ""
    for f in report.findings:
        if f.resource != resource:
            resource = f.resource
            lines += ["", bold(RESOURCES.get(resource, resource), colour)]
        lines += finding_lines(f, width, colour)
    counts = {v: sum(1 for f in report.findings if f.verdict == v) for v in (CRIT, WARN, OK, SKIP)}
    tally = ", ".join(f"{n} {v}" for v, n in counts.items() if n)
    verdict = report.verdict
    lines += ["", f"verdict: {paint(verdict, verdict, colour)} ({tally}; exit {report.exit_code()})"]
    return "\n".join(lines) + "\n"

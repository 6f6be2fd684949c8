"""The doctor's findings as data: what ``analyse.py`` produces and ``render.py`` and ``report_json.py``
print. No I/O."""

from __future__ import annotations

from dataclasses import dataclass, field

OK, WARN, CRIT, SKIP = "OK", "WARN", "CRIT", "SKIP"
VERDICTS = (OK, WARN, CRIT, SKIP)
_RANK = {SKIP: -1, OK: 0, WARN: 1, CRIT: 2}
EXIT_OK, EXIT_WARN, EXIT_CRIT, EXIT_FAILED = 0, 1, 2, 3


def worst(verdicts: list[str]) -> str:
    """The most severe verdict; SKIP only when nothing was judged."""
    return max(verdicts, key=_RANK.__getitem__, default=SKIP)


@dataclass(frozen=True)
class Offender:
    """One named thing behind a finding: a workload, a namespace, a CPU, a kernel caller, a key."""

    kind: str  # workload | netns | cpu | caller | key
    name: str
    value: float  # what it is ranked by, in the finding's unit
    detail: str  # the numbers, for a person


@dataclass(frozen=True)
class Histogram:
    """Log2 latency buckets of the window: (upper bound in seconds, count), ``inf`` last."""

    title: str
    buckets: tuple[tuple[float, int], ...]

    @property
    def count(self) -> int:
        return sum(c for _le, c in self.buckets)


@dataclass(frozen=True)
class Finding:
    id: str  # resource.check, e.g. cpu.throttling
    title: str
    verdict: str
    summary: str  # the number behind the verdict, in words
    value: float | None = None  # that number
    unit: str = ""  # ratio | seconds | count | load
    warn: float | None = None  # thresholds the value was judged by
    crit: float | None = None
    offenders: tuple[Offender, ...] = ()
    fix: str = ""  # what the seeds found for this pattern (empty when OK)
    histograms: tuple[Histogram, ...] = ()

    @property
    def resource(self) -> str:
        return self.id.split(".", 1)[0]


@dataclass
class Report:
    node: str
    source: str  # "live" or the /metrics URL
    duration_s: float
    cpus: int
    findings: list[Finding] = field(default_factory=list)

    @property
    def verdict(self) -> str:
        return worst([f.verdict for f in self.findings])

    def exit_code(self) -> int:
        verdict = self.verdict
        if verdict == SKIP:
            return EXIT_FAILED
        return {OK: EXIT_OK, WARN: EXIT_WARN, CRIT: EXIT_CRIT}[verdict]

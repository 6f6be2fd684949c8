"""One reading of the agent's metrics (the samples of one scrape), from families collected in
process or from a ``/metrics`` text parsed with prometheus_client's parser, and what two readings
say about the window between them (counter increases, histogram buckets filled).

Counters are monotonic for as long as a label set is exported (DESIGN.md, Contract), so an increase
is ``after - before``; a decrease means the agent restarted, and then ``after`` is the increase. A
label set missing from ``after`` is left out (it went within the window). One missing from ``before``
counts from 0 when the readings say their counters started at 0 with the source (``new_from_zero``:
the doctor's own probes, whose BPF rows are created at a workload's first event after load); else it
is left out, as Prometheus' ``increase()`` has no earlier sample of it either (``--from``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

Labels = tuple[tuple[str, str], ...]  # sorted (name, value) pairs


def labels_key(labels: dict[str, str], drop: tuple[str, ...] = ()) -> Labels:
    return tuple(sorted((k, v) for k, v in labels.items() if k not in drop))


@dataclass(frozen=True)
class Reading:
    at: float  # time.monotonic() of the reading
    samples: dict[str, dict[Labels, float]]  # sample name (with _total, _bucket ...) -> label set -> value
    new_from_zero: bool = False  # a counter's label set absent from an earlier reading started at 0

    @classmethod
    def from_families(cls, families: Iterable[Metric], at: float, new_from_zero: bool = False) -> Reading:
        samples: dict[str, dict[Labels, float]] = {}
        for family in families:
            for s in family.samples:
                samples.setdefault(s.name, {})[labels_key(s.labels)] = float(s.value)
        return cls(at, samples, new_from_zero)

    @classmethod
    def from_text(cls, text: str, at: float) -> Reading:
        """The text exposition format (raises ValueError when it is not one)."""
        return cls.from_families(text_string_to_metric_families(text), at)

    def get(self, name: str) -> dict[Labels, float]:
        return self.samples.get(name, {})


def increase(before: Reading, after: Reading, name: str) -> dict[Labels, float]:
    """Counter increase per label set over the window (label sets in ``after``; one new in the window
    only when ``after.new_from_zero``)."""
    old = before.get(name)
    out = {}
    for labels, value in after.get(name).items():
        if labels in old:
            out[labels] = value - old[labels] if value >= old[labels] else value
        elif after.new_from_zero:
            out[labels] = value
    return out


def bucket_increase(before: Reading, after: Reading, name: str) -> dict[Labels, list[tuple[float, int]]]:
    """Histogram ``name``: label set (without ``le``) -> [(upper bound s, count in that bucket)] over
    the window, by bound, ``inf`` last (not cumulative)."""
    grouped: dict[Labels, list[tuple[float, float]]] = {}
    for labels, delta in increase(before, after, name + "_bucket").items():
        le = dict(labels).get("le")
        if le is None:
            continue
        key = tuple(kv for kv in labels if kv[0] != "le")
        grouped.setdefault(key, []).append((float(le), delta))
    out = {}
    for key, cumulative in grouped.items():
        cumulative.sort()
        counts, previous = [], 0.0
        for le, total in cumulative:
            counts.append((le, max(0, round(total - previous))))
            previous = max(previous, total)
        out[key] = counts
    return out


def quantile(q: float, buckets: list[tuple[float, int]]) -> float | None:
    """The q-quantile of bucketed durations, interpolated within its bucket as Prometheus'
    ``histogram_quantile`` does (so the doctor and the alert rules agree); None without data. A
    quantile in the ``+Inf`` bucket is the largest finite bound."""
    total = sum(c for _le, c in buckets)
    if total == 0:
        return None
    rank = q * total
    seen, lower = 0, 0.0
    for le, count in buckets:
        if count and seen + count >= rank:
            if math.isinf(le):
                return lower
            return lower + (le - lower) * (rank - seen) / count
        seen += count
        if not math.isinf(le):
            lower = le
    return lower

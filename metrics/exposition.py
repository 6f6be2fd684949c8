"""A histogram family that renders its own exposition text, for per-workload latency histograms.

Why: with 500 workloads a runqlat scrape has 13,000 histogram samples, and ``prometheus_client``'s
``generate_latest`` spends ~90 % of the scrape re-sorting and re-escaping the same labels for each
sample (profile in the commit that added this). Here the label prefix of each label set is built
once and each sample is one string format; the text is byte-identical to ``generate_latest``'s for
the same family (tests/metrics/test_exposition.py checks it on random families).

It is still a ``Metric``: ``samples`` is materialized on first access (tests, parsers, merging
with another unit's family of the same name); once materialized, the agent renders it the
library's way, so a family changed through ``samples`` is never rendered stale.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from itertools import accumulate
from typing import Any

from prometheus_client.metrics_core import Metric
from prometheus_client.samples import Sample
from prometheus_client.utils import floatToGoString

from metrics.histogram import BUCKET_LE


def _escape(value: str) -> str:
    # prometheus_client.openmetrics.exposition._escape with ALLOWUTF8: label values are UTF-8.
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


def count_text(n: int) -> str:
    """``floatToGoString(n)`` for a non-negative int counter, without the float round trip."""
    if n < 1_000_000:
        return f"{n}.0"
    if n >= 10**15:  # repr() switches to exponent form near 1e16: let the library decide
        return floatToGoString(n)
    digits = str(n)
    mantissa = f"{digits[0]}.{digits[1:]}".rstrip("0.")  # Go's %g: exponent form from 1e6 on
    return f"{mantissa}e+{len(digits) - 1:02d}"


def value_text(value: float) -> str:
    """``floatToGoString(value)``, fast for the common cases: a non-negative int counter, and a
    finite float below 1e6, for which the library returns ``repr()`` unchanged."""
    if type(value) is int and value >= 0:
        return count_text(value)
    if type(value) is float and -1e300 < value < 1e6:
        return repr(value)
    return floatToGoString(value)


def _count_line(n: int) -> str:
    return count_text(n) + "\n"


class _PrefixCache:
    """Label-set line prefixes of every compact family, kept across scrapes since a node's label
    sets change slowly. Two generations: a lookup is served from the current one, or promoted into
    it from the previous one; every ``generation_s`` (or when the current one holds ``LIMIT``
    entries) the previous generation is dropped and the current one becomes it. A label set not
    rendered for a whole generation (a pod gone, its series expired) is dropped, so pod churn cannot
    grow the cache; one still exported moves to the new generation on its next scrape."""

    LIMIT = 50000

    def __init__(self, generation_s: float = 600.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.generation_s = generation_s
        self.clock = clock
        self._current: dict[tuple, Any] = {}
        self._previous: dict[tuple, Any] = {}
        self._started = clock()

    def __len__(self) -> int:
        return len(self._current) + len(self._previous)

    def get(self, key: tuple, make: Callable[[tuple[str, ...]], Any], values: tuple[str, ...]) -> Any:
        current = self._current
        found = current.get(key)
        if found is None:
            found = self._previous.get(key)
            if found is None:
                found = make(values)
            current[key] = found
            if len(current) >= self.LIMIT or self.clock() - self._started >= self.generation_s:
                # one thread may swap while another reads: both dicts stay valid objects, and a
                # prefix missed in the swap is only built again
                self._previous, self._current, self._started = current, {}, self.clock()
        return found


_PREFIXES = _PrefixCache()


class CompactFamily(Metric):
    """A family that writes its own exposition text (``exposition()``) until its ``samples`` are
    materialized; then the agent renders it the library's way."""

    _samples: list[Sample] | None

    def _materialize(self) -> list[Sample]:
        raise NotImplementedError

    @property
    def samples(self) -> list[Sample]:  # type: ignore[override]
        if self._samples is None:
            self._samples = self._materialize()
        return self._samples

    @samples.setter
    def samples(self, value: list[Sample]) -> None:
        self._samples = value or None  # Metric.__init__ assigns []

    @property
    def materialized(self) -> bool:
        return self._samples is not None

    def _header(self, name: str, kind: str) -> str:
        doc = self.documentation.replace("\\", r"\\").replace("\n", r"\n")
        return f"# HELP {name} {doc}\n# TYPE {name} {kind}\n"

    def exposition(self) -> str:
        raise NotImplementedError


def _label_text(names: Sequence[str], values: Sequence[str]) -> str:
    text = ",".join(f'{k}="{_escape(v)}"' for k, v in sorted(zip(names, values, strict=True)))
    return f"{{{text}}}" if text else ""


class CompactScalar(CompactFamily):
    """A counter or gauge family stored as (label values, value) rows. Counters are named without
    ``_total`` (as ``CounterMetricFamily``); their samples and HELP/TYPE lines carry it."""

    def __init__(self, name: str, documentation: str, kind: str, labels: Sequence[str]) -> None:
        if kind not in ("counter", "gauge"):
            raise ValueError(f"{name}: kind {kind!r}")
        super().__init__(name.removesuffix("_total") if kind == "counter" else name, documentation, kind)
        self.label_names = tuple(labels)
        self.rows: list[tuple[tuple[str, ...], float]] = []
        self._sample_name = self.name + ("_total" if kind == "counter" else "")

    def add(self, values: Sequence[str], value: float) -> None:
        if len(values) != len(self.label_names):
            raise ValueError(f"{self.name}: expected {len(self.label_names)} labels")
        self.rows.append((tuple(values), value))

    def _materialize(self) -> list[Sample]:
        return [
            Sample(self._sample_name, dict(zip(self.label_names, values, strict=True)), value, None, None)
            for values, value in self.rows
        ]

    def exposition(self) -> str:
        out = [self._header(self._sample_name, self.type)]
        for values, value in self.rows:
            prefix = _PREFIXES.get((self._sample_name, self.label_names, values), self._prefix, values)
            out.append(f"{prefix}{value_text(value)}\n")
        return "".join(out)

    def _prefix(self, values: tuple[str, ...]) -> str:
        return f"{self._sample_name}{_label_text(self.label_names, values)} "


class CompactHistogram(CompactFamily):
    """Histogram family stored as (label values, per-bucket counts, sum) rows; see module docstring."""

    def __init__(self, name: str, documentation: str, labels: Sequence[str], le: Sequence[str] = BUCKET_LE) -> None:
        super().__init__(name, documentation, "histogram")
        self.label_names = tuple(labels)
        self.le = tuple(le)
        self.rows: list[tuple[tuple[str, ...], Sequence[int], float]] = []

    def add(self, values: Sequence[str], counts: Sequence[int], sum_value: float) -> None:
        """One label set: ``counts`` per bucket (not cumulative; the last one is ``+Inf``)."""
        if len(counts) != len(self.le) or len(values) != len(self.label_names):
            raise ValueError(f"{self.name}: expected {len(self.le)} counts and {len(self.label_names)} labels")
        self.rows.append((tuple(values), counts, sum_value))

    def _materialize(self) -> list[Sample]:
        out: list[Sample] = []
        for values, counts, sum_value in self.rows:
            labels = dict(zip(self.label_names, values, strict=True))
            total = 0
            for le, count in zip(self.le, counts, strict=True):
                total += count
                out.append(Sample(self.name + "_bucket", {**labels, "le": le}, total, None, None))
            out.append(Sample(self.name + "_count", dict(labels), total, None))
            out.append(Sample(self.name + "_sum", dict(labels), sum_value, None))
        return out

    def _prefixes(self, values: tuple[str, ...]) -> tuple[tuple[str, ...], str, str]:
        """(bucket line prefixes, _count prefix, _sum prefix) of one label set; labels sorted by
        name as ``generate_latest`` sorts them, ``le`` among them."""
        pairs = sorted([*zip(self.label_names, values, strict=True), ("le", "")])
        at = next(i for i, (k, v) in enumerate(pairs) if k == "le" and v == "")
        before = ",".join(f'{k}="{_escape(v)}"' for k, v in pairs[:at])
        after = ",".join(f'{k}="{_escape(v)}"' for k, v in pairs[at + 1 :])
        head = f'{self.name}_bucket{{{before}{"," if before else ""}le="'
        tail = f'"{"," if after else ""}{after}}} '
        plain = ",".join(f'{k}="{_escape(v)}"' for k, v in sorted(zip(self.label_names, values, strict=True)))
        plain = f"{{{plain}}}" if plain else ""
        return tuple(f"{head}{le}{tail}" for le in self.le), f"{self.name}_count{plain} ", f"{self.name}_sum{plain} "

    def exposition(self) -> str:
        """This family in the text format, as ``generate_latest`` writes it."""
        out = [self._header(self.name, "histogram")]
        for values, counts, sum_value in self.rows:
            buckets, count_prefix, sum_prefix = _PREFIXES.get(
                (self.name, self.label_names, self.le, values), self._prefixes, values
            )
            cumulative = list(accumulate(counts))
            out.extend(map(str.__add__, buckets, map(_count_line, cumulative)))
            out.append(f"{count_prefix}{count_text(cumulative[-1])}\n{sum_prefix}{value_text(sum_value)}\n")
        return "".join(out)

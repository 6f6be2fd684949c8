"""CompactHistogram: its own exposition text is byte-identical to prometheus_client's."""

from __future__ import annotations

import random
import shutil
import subprocess

import pytest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import generate_latest
from prometheus_client.utils import floatToGoString

from agent.exporter import _Metrics, render
from metrics.exposition import CompactHistogram, CompactScalar, _PrefixCache, count_text
from metrics.histogram import BUCKET_LE, NSLOTS, cumulative_buckets

ODD = ["", "a", 'quo"te', "back\\slash", "new\nline", "ünï", "/kubepods.slice/x.scope", "le"]


def random_family(
    rng: random.Random, label_names: tuple[str, ...], rows: int
) -> tuple[CompactHistogram, HistogramMetricFamily]:
    doc = 'Doc with \\ and \n and "quotes".'
    compact = CompactHistogram("nodetune_test_seconds", doc, label_names)
    plain = HistogramMetricFamily("nodetune_test_seconds", doc, labels=list(label_names))
    for _ in range(rows):
        values = tuple(rng.choice(ODD) + str(rng.randrange(100)) for _ in label_names)
        scale = rng.choice([1, 1000, 10**6, 10**9, 10**14, 10**17])
        slots = [rng.randrange(scale) for _ in range(NSLOTS)]
        total = rng.random() * rng.choice([1e-9, 1, 1e6, 1e12])
        compact.add(values, slots, total)
        plain.add_metric(list(values), cumulative_buckets(slots), total)
    return compact, plain


@pytest.mark.parametrize("label_names", [(), ("cgroup",), ("namespace", "pod", "container", "cgroup"), ("a", "z")])
def test_exposition_is_byte_identical_to_generate_latest(label_names: tuple[str, ...]) -> None:
    rng = random.Random(len(label_names))
    compact, plain = random_family(rng, label_names, 60)
    want = generate_latest(_Metrics([plain]))
    assert render([compact]) == want
    assert compact.samples == plain.samples  # the materialized samples are the library's too
    assert render([compact]) == want  # once materialized, rendered the library's way: same bytes


def test_count_text_matches_float_to_go_string() -> None:
    rng = random.Random(7)
    values = [0, 1, 999_999, 1_000_000, 1_200_000, 10**15 - 1, 10**15, 2**53, 2**63]
    values += [rng.randrange(10 ** rng.randrange(1, 19)) for _ in range(5000)]
    assert [count_text(v) for v in values] == [floatToGoString(v) for v in values]


def test_row_shape_is_checked() -> None:
    h = CompactHistogram("x", "d", ("a",))
    with pytest.raises(ValueError):
        h.add(("v",), [1, 2], 0.0)
    assert len(BUCKET_LE) == NSLOTS


def test_promtool_accepts_it() -> None:
    promtool = shutil.which("promtool")
    assert promtool, "promtool (Debian package prometheus) is installed by make test"
    compact, _ = random_family(random.Random(3), ("namespace", "pod", "container", "cgroup"), 5)
    result = subprocess.run([promtool, "check", "metrics"], input=render([compact]), capture_output=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("kind", ["counter", "gauge"])
@pytest.mark.parametrize("label_names", [(), ("namespace", "pod", "container", "cgroup")])
def test_scalar_exposition_is_byte_identical(kind: str, label_names: tuple[str, ...]) -> None:
    rng = random.Random(11)
    compact = CompactScalar(
        "nodetune_test_total" if kind == "counter" else "nodetune_test", "Doc \\ \n.", kind, label_names
    )
    cls = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
    plain = cls("nodetune_test_total" if kind == "counter" else "nodetune_test", "Doc \\ \n.", labels=list(label_names))
    for _ in range(1 if not label_names else 80):
        values = tuple(rng.choice(ODD) + str(rng.randrange(9)) for _ in label_names)
        value = rng.choice([0, 7, 10**7, 10**16 + 3, 0.5, 1e-9, 123456789.25, rng.random() * 1e12])
        compact.add(values, value)
        plain.add_metric(list(values), value)
    want = generate_latest(_Metrics([plain]))
    assert render([compact]) == want
    assert compact.samples == plain.samples
    empty = CompactScalar("nodetune_none", "Nothing.", kind, ("a",))
    other = cls("nodetune_none", "Nothing.", labels=["a"])
    assert render([empty]) == generate_latest(_Metrics([other]))


def test_value_text_matches_float_to_go_string() -> None:
    from metrics.exposition import value_text

    rng = random.Random(5)
    values = [0.0, -0.0, 1e-9, 999999.999, 1e6, 1e6 + 0.5, 123456789.25, 1e16, 1e300, -5.5, -1e7]
    values += [float("inf"), float("-inf"), float("nan"), 0, 5, 10**6, -3]
    values += [rng.random() * 10 ** rng.randrange(-12, 20) for _ in range(5000)]
    assert [value_text(v) for v in values] == [floatToGoString(v) for v in values]


def test_prefix_cache_drops_label_sets_not_rendered_for_a_generation() -> None:
    """Pod churn: label sets that stop being rendered leave the cache after two generations at the
    latest; a label set rendered on every scrape stays; 100,000 distinct sets never hold more than
    two generations' worth."""
    now = [0.0]
    cache = _PrefixCache(generation_s=60.0, clock=lambda: now[0])
    made: list[tuple[str, ...]] = []

    def make(values: tuple[str, ...]) -> str:
        made.append(values)
        return "|".join(values)

    live = ("ns", "redis-0")
    for scrape in range(40):  # a scrape every 15 s, a new pod each time, the old one gone
        now[0] = scrape * 15.0
        assert cache.get(("f", live), make, live) == "ns|redis-0"
        gone = ("ns", f"job-{scrape}")
        cache.get(("f", gone), make, gone)
    assert made.count(live) == 1  # built once, promoted across generations
    assert len(cache) <= 2 * (60 // 15 + 1) + 1, len(cache)  # two generations of churn, not 40 pods
    assert cache.get(("f", ("ns", "job-0")), make, ("ns", "job-0")) == "ns|job-0"
    assert made.count(("ns", "job-0")) == 2  # it had been dropped: built again

    cache = _PrefixCache(generation_s=1e9, clock=lambda: 0.0)
    for i in range(100_000):
        cache.get(("f", str(i)), make, (str(i),))
    assert len(cache) <= 2 * _PrefixCache.LIMIT

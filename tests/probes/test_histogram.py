"""log2 slot -> Prometheus bucket mapping."""

from __future__ import annotations

import itertools

import pytest

from probes.histogram import BUCKET_BOUNDS, NSLOTS, cumulative_buckets


def test_bounds_are_powers_of_two_from_one_microsecond() -> None:
    assert len(BUCKET_BOUNDS) + 1 == NSLOTS <= 24
    assert BUCKET_BOUNDS[0] == 1e-6
    assert all(b2 == 2 * b1 for b1, b2 in itertools.pairwise(BUCKET_BOUNDS))


def test_cumulative_with_open_last_slot() -> None:
    slots = [0] * NSLOTS
    slots[0], slots[3], slots[NSLOTS - 1] = 2, 5, 1
    buckets = cumulative_buckets(slots)
    assert buckets[0] == ("1e-06", 2)
    assert buckets[2] == ("4e-06", 2)
    assert buckets[3] == ("8e-06", 7)
    assert buckets[-2] == (repr(BUCKET_BOUNDS[-1]), 7)
    assert buckets[-1] == ("+Inf", 8)


def test_wrong_slot_count_is_an_error() -> None:
    with pytest.raises(ValueError):
        cumulative_buckets([0] * 10)

"""Top-N by recent wait: a caller that turns hot after a long warm-up is named within a minute,
a quiet one leaves, and every exported counter (named and ``other``) stays monotonic throughout."""

from __future__ import annotations

import random

from metrics.topn import TopN


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def exported(top: TopN, totals: dict[str, list[int]]) -> dict[str, int]:
    named, other = top.split(totals, group_of=lambda k: "g")
    out = {k: v[1] for k, v in named.items()}
    out["other"] = other.get("g", [0, 0])[1]
    return out


def test_a_caller_hot_after_a_day_is_named_within_a_minute_and_counters_never_drop() -> None:
    clock = Clock()
    top = TopN(3, 2, rank=lambda v: v[1], half_life_s=30.0, clock=clock)
    rates = {"a": 1000, "b": 800, "c": 600, "d": 500, "late": 0}  # wait ns per second
    totals = {k: [0, 0] for k in rates}
    rng = random.Random(7)
    previous: dict[str, int] = {}

    def tick(seconds: float) -> None:
        clock.now += seconds
        for k, r in rates.items():
            totals[k][0] += r and 1
            totals[k][1] += int(r * seconds)
        top.reselect(totals)
        current = exported(top, totals)
        for key, value in current.items():
            if key in previous and key in top.named | {"other"}:
                assert value >= previous[key], (key, value, previous[key])
        previous.clear()
        previous.update(current)

    for _ in range(6 * 360):  # six hours of ticks every ~10 s (jittered like the agent's timer)
        tick(rng.uniform(8, 12))
    assert top.named == {"a", "b", "c"}
    rates["late"] = 2 * rates["a"]  # ports run out: __inet_hash_connect turns hot
    turned_hot = clock.now
    while "late" not in top.named:
        tick(rng.uniform(8, 12))
        assert clock.now - turned_hot <= 60, "not named within a minute"
    rates["b"] = 0  # b goes quiet: it leaves the named set for the hottest unnamed one
    for _ in range(60):
        tick(rng.uniform(8, 12))
    assert top.named == {"late", "a", "c"}


def test_first_selection_ranks_by_lifetime_and_reclaimed_keys_are_forgotten() -> None:
    clock = Clock()
    top = TopN(1, 2, rank=lambda v: v[1], clock=clock)
    top.reselect({"x": [1, 5], "y": [1, 9]})
    assert top.named == {"y"}
    clock.now += 10
    top.reselect({"x": [2, 50]})  # y's row was reclaimed
    assert top.named == {"x"} and top.recent("y") == 0.0
    clock.now += 10
    top.reselect({"x": [2, 50]})  # no growth, but named with a total: stays while there is room
    assert top.named == {"x"}
    top.reselect({})
    assert top.named == set()

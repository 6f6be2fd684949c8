"""Series accounting: label sets stay monotonic while cgroups come, change labels and go."""

from __future__ import annotations

from metrics.workload_series import Lookup, WorkloadSeries

A, B = ("", "", "", "/x"), ("ns", "redis-0", "redis", "")


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_shared_label_set_keeps_the_counts_of_a_reclaimed_cgroup() -> None:
    """The issue's reproduction: /x/a and /x/b share /x; /x/b goes; /x must not drop."""
    s = WorkloadSeries(2, grace_s=60, clock=Clock())
    live = {1: [700, 7], 2: [55, 5]}
    for wid, v in live.items():
        assert not s.observe(wid, v, Lookup(A))
    assert s.totals(live, lambda w: Lookup(A)) == {A: [755, 12]}
    assert s.observe(2, [60, 6], Lookup(A, gone=True))  # gone: reclaim its row
    s.retire(2, [60, 6])  # final values, read after no event can reach the row
    assert s.totals({1: [701, 7]}, lambda w: Lookup(A)) == {A: [761, 13]}


def test_relabelled_cgroup_freezes_the_old_set_and_counts_only_new_events_in_the_new() -> None:
    s = WorkloadSeries(1, clock=Clock())
    s.observe(1, [10], Lookup(A))
    s.observe(9, [100], Lookup(B))  # B already has a cgroup (container restart)
    s.observe(1, [15], Lookup(B))  # names became known: A -> B
    assert s.totals({1: [20], 9: [100]}, lambda w: Lookup(None)) == {A: [15], B: [105]}


def test_label_set_without_live_cgroup_expires_after_grace() -> None:
    clock = Clock()
    s = WorkloadSeries(1, grace_s=10, clock=clock)
    s.observe(1, [3], Lookup(A))
    s.retire(1, [4])
    clock.t = 9
    s.expire()
    assert s.totals({}, lambda w: Lookup(None)) == {A: [4]}
    clock.t = 11
    s.expire()
    assert s.totals({}, lambda w: Lookup(None)) == {}


def test_scrape_labels_new_cgroups_without_changing_state() -> None:
    s = WorkloadSeries(1, clock=Clock())
    assert s.totals({5: [2]}, lambda w: Lookup(A)) == {A: [2]}
    assert s.totals({5: [2]}, lambda w: Lookup(None)) == {}  # unknown yet: left out, nothing kept
    assert not s.observe(6, [1], Lookup(None))  # unknown, not gone: kept in the kernel
    assert s.observe(7, [1], Lookup(None, gone=True)) and s.unlabelled_gone == 1

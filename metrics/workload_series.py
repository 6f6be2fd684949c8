"""Series accounting: per-cgroup cumulative counters -> per-label-set counters that never go back.

Several cgroups can share one label set (host cgroups cut to two levels; every restart of a pod's
container is a new cgroup with the same names), and a cgroup's label set can change (its pod's
names become known). Summing the live cgroups of a label set would make the sum drop whenever one
of them is reclaimed. So each label set is ``retired + sum(live cgroup - its baseline)``:

* a cgroup joins a label set with baseline 0 (its counts were all made under that label set);
* when its labels change from A to B, what it counted under A is moved into A's retired total
  and its baseline becomes its current value, so B counts only what comes after;
* when it is gone, its final values (read after the in-kernel row can no longer change, see
  ``probes/row_table.py``) minus its baseline are moved into its label set's retired total.

A label set with no live cgroup for ``grace_s`` seconds is dropped (the contract: a label set's
counters are monotonic for as long as it is exported). Pure Python: no kernel, no I/O.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

Labels = tuple[str, ...]


@dataclass(frozen=True)
class Lookup:
    """What the identity service knows of a workload id: its labels (None: not known) and whether
    the cgroup is gone for certain (not merely not found yet)."""

    labels: Labels | None
    gone: bool = False


@dataclass
class _Member:
    labels: Labels
    base: list[int] | None  # None: 0 (the cgroup counted under these labels from its first count)


def _add(acc: list[int], values: list[int], base: list[int] | None = None) -> None:
    if base is None:
        for i, v in enumerate(values):
            acc[i] += v
    else:
        for i, (v, b) in enumerate(zip(values, base, strict=True)):
            acc[i] += v - b


class WorkloadSeries:
    """See module docstring. Not thread-safe: the owner (``probes.row_table.RowTableSeries``) locks."""

    def __init__(self, width: int, grace_s: float = 300.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.width = width
        self.grace_s = grace_s
        self.clock = clock
        self._members: dict[int, _Member] = {}
        self._retired: dict[Labels, list[int]] = {}
        self._last_live: dict[Labels, float] = {}
        self.unlabelled_gone = 0  # cgroups that vanished before they could ever be labelled

    def observe(self, wid: int, values: list[int], lookup: Lookup) -> bool:
        """Timer: register or relabel ``wid``; returns whether its row should be reclaimed."""
        if lookup.labels is None:
            if lookup.gone:
                self.unlabelled_gone += 1
            return lookup.gone
        member = self._members.get(wid)
        if member is None:
            self._members[wid] = _Member(lookup.labels, None)
        elif member.labels != lookup.labels:
            _add(self._retired.setdefault(member.labels, [0] * self.width), values, member.base)
            self._last_live[member.labels] = self.clock()
            member.labels, member.base = lookup.labels, list(values)
        self._last_live[lookup.labels] = self.clock()
        return lookup.gone

    def retire(self, wid: int, final: list[int]) -> None:
        """Timer: ``wid``'s row is about to be zeroed; keep what it counted in its label set."""
        member = self._members.pop(wid, None)
        if member is not None:
            _add(self._retired.setdefault(member.labels, [0] * self.width), final, member.base)
            self._last_live[member.labels] = self.clock()

    def expire(self) -> None:
        """Timer: drop label sets that have had no live cgroup for ``grace_s``."""
        held = {m.labels for m in self._members.values()}
        cutoff = self.clock() - self.grace_s
        for labels in [lbl for lbl, t in self._last_live.items() if lbl not in held and t < cutoff]:
            del self._last_live[labels]
            self._retired.pop(labels, None)

    def totals(self, values: Mapping[int, list[int]], labels_of: Callable[[int], Lookup]) -> dict[Labels, list[int]]:
        """Scrape: label set -> counters, from the live rows' current ``values`` (by workload id).

        Reads only. A workload the timer has not registered yet is labelled on the spot (baseline 0,
        as the timer will do); one that cannot be labelled yet is left out until it can.
        """
        out = {labels: list(v) for labels, v in self._retired.items()}
        members = self._members
        for wid, vals in values.items():
            member = members.get(wid)
            if member is None:
                labels = labels_of(wid).labels
                if labels is None:
                    continue
                base = None
            else:
                labels, base = member.labels, member.base
            if base is None and labels not in out:
                # Most label sets have one cgroup, counted from 0: a copy, not a loop per word
                # (the loop was 10 % of a scrape at 500 workloads, py-spy).
                out[labels] = list(vals)
            else:
                _add(out.setdefault(labels, [0] * self.width), vals, base)
        return out

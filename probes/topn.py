"""Top-N keyed counters with an ``other`` remainder that never goes backwards.

A probe that aggregates by an unbounded key (a lock's caller) exports only the N keys with the
largest lifetime total, and sums the rest per group into ``other``. The named set changes only on
the agent's timer (:meth:`TopN.reselect`), never on a scrape, and each change keeps every exported
counter monotonic:

* a key joins the named set with a baseline = its total at that moment; it is exported as
  ``total - baseline`` (a new series, starting at 0);
* its baseline stays in ``other`` for good; when it leaves the named set, ``other`` takes its
  whole total (its exported value moves over, so ``other`` does not drop).

So ``other = sum(total of keys not named) + sum(baseline of named keys)`` per group, where every
term is monotonic between timer ticks and the sum is unchanged across a tick. Pure Python.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping

Values = list[int]


class TopN:
    """See module docstring. ``rank`` picks the word of the values to rank by."""

    def __init__(self, n: int, width: int, rank: Callable[[Values], int]) -> None:
        self.n = n
        self.width = width
        self.rank = rank
        self._baseline: dict[Hashable, Values] = {}  # named key -> its total when it joined

    @property
    def named(self) -> set[Hashable]:
        return set(self._baseline)

    def reselect(self, totals: Mapping[Hashable, Values]) -> None:
        """Timer: make the named set the N keys with the largest lifetime ``rank`` (ties: the keys
        already named stay, so equal totals do not make series flap)."""
        order = sorted(totals, key=lambda k: (self.rank(totals[k]), k in self._baseline), reverse=True)
        keep = {k for k in order[: self.n] if self.rank(totals[k]) > 0}
        for key in list(self._baseline):
            if key not in keep:
                del self._baseline[key]
        for key in keep:
            if key not in self._baseline:
                self._baseline[key] = list(totals[key])

    def split(
        self, totals: Mapping[Hashable, Values], group_of: Callable[[Hashable], Hashable]
    ) -> tuple[dict[Hashable, Values], dict[Hashable, Values]]:
        """Scrape: (named key -> exported values, group -> ``other`` values). Reads only."""
        named: dict[Hashable, Values] = {}
        other: dict[Hashable, Values] = {}
        for key, values in totals.items():
            group = other.setdefault(group_of(key), [0] * self.width)
            base = self._baseline.get(key)
            if base is None:
                for i, v in enumerate(values):
                    group[i] += v
            else:
                named[key] = [v - b for v, b in zip(values, base, strict=True)]
                for i, b in enumerate(base):
                    group[i] += b
        for key, base in self._baseline.items():  # named but absent now: its baseline stays counted
            if key not in totals:
                group = other.setdefault(group_of(key), [0] * self.width)
                for i, b in enumerate(base):
                    group[i] += b
        return named, other

"""Top-N keyed counters with an ``other`` remainder that never goes backwards.

A probe that aggregates by an unbounded key (a lock's caller) exports only the N keys with the
largest *recent* total, and sums the rest per group into ``other``. Recent: each timer tick adds
the growth of a key's ranked word since the last tick to a sum that decays with a half-life
(``half_life_s``, an exponentially weighted moving sum), so a caller that turns hot after days
(seed 000's ``__inet_hash_connect`` when the ports run out) is named within about one half-life
of turning hot if it waits at least twice as much as the callers named before it, and a caller
whose lifetime total is large but that has gone quiet leaves the named set. The named set changes only on
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

import time
from collections.abc import Callable, Hashable, Mapping

Values = list[int]


class TopN:
    """See module docstring. ``rank`` picks the word of the values to rank by."""

    def __init__(
        self,
        n: int,
        width: int,
        rank: Callable[[Values], int],
        half_life_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.n = n
        self.width = width
        self.rank = rank
        self.half_life_s = half_life_s
        self.clock = clock
        self._baseline: dict[Hashable, Values] = {}  # named key -> its total when it joined
        self._seen: dict[Hashable, int] = {}  # key -> its ranked word at the last reselect
        self._recent: dict[Hashable, float] = {}  # key -> decayed sum of its ranked word's growth
        self._at: float | None = None

    @property
    def named(self) -> set[Hashable]:
        return set(self._baseline)

    def recent(self, key: Hashable) -> float:
        return self._recent.get(key, 0.0)

    def reselect(self, totals: Mapping[Hashable, Values]) -> None:
        """Timer: make the named set the N keys with the largest recent ``rank`` growth (ties: the
        keys already named stay, so equal values do not make series flap). The first call, with
        nothing to compare to, ranks by the lifetime totals. Keys absent from ``totals`` are
        forgotten (their rows were reclaimed), so what is kept is bounded by the rows."""
        now = self.clock()
        decay = 0.5 ** ((now - self._at) / self.half_life_s) if self._at is not None else 0.0
        self._at = now
        recent: dict[Hashable, float] = {}
        for key, values in totals.items():
            value = self.rank(values)
            previous = self._seen.get(key, 0)
            growth = value - previous if value >= previous else value  # a row reused: counted anew
            recent[key] = self._recent.get(key, 0.0) * decay + growth
            self._seen[key] = value
        for key in [k for k in self._seen if k not in totals]:
            del self._seen[key]
        self._recent = recent
        # Candidates: keys that grew recently, and named keys with anything counted (a quiet named
        # key keeps its place while there is room).
        candidates = [k for k in totals if recent[k] > 0 or (k in self._baseline and self.rank(totals[k]) > 0)]
        keep = set(sorted(candidates, key=lambda k: (recent[k], k in self._baseline), reverse=True)[: self.n])
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

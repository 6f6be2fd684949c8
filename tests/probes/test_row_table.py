"""probes/row_table.py: reads of row runs (pure), and batch reads of scattered rows of a real map."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from metrics import histogram
from probes import bpfsys
from probes.base import KernelFacts
from probes.row_table import RUN_GAP, RowTable, RowTableSpec, gap_rows, runs


def test_runs_cut_where_rows_are_far_apart() -> None:
    gap = RUN_GAP
    assert runs([]) == []
    assert runs([5]) == [(5, [5])]
    assert runs([3, 1, 2, 1]) == [(1, [1, 2, 3])]  # sorted, distinct
    assert runs([0, gap, 3 * gap, 3 * gap + 1]) == [(0, [0, gap]), (3 * gap, [3 * gap, 3 * gap + 1])]
    assert runs([0, gap + 1]) == [(0, [0]), (gap + 1, [gap + 1])]


def test_the_gap_worth_copying_shrinks_with_row_width_and_cpus() -> None:
    assert gap_rows(25, 2) == RUN_GAP  # runqlat's 200 B row at 2 CPUs: the measured break-even
    assert gap_rows(2, 2) == 400  # lockstat's 16 B caller rows
    assert gap_rows(25, 96) == 1  # 19 KB a row on 96 CPUs: never copy a row not asked for


def compiled(spec: RowTableSpec, header_cache: Path) -> Any:  # a bcc.BPF
    """One row table alone in a BPF module (nothing attached)."""
    from bcc import BPF

    common = (Path(bpfsys.__file__).parent / "common.bpf.h").read_text()
    KernelFacts(cache_dir=header_cache).headers.apply_env()
    flags = [*histogram.cflags(), "-DNSTATS=1", "-DSTAT_CGROUP_MAP_FULL=0"]
    return BPF(text=(common + spec.c_source()).encode(), cflags=flags)


@pytest.mark.bpf
def test_read_of_scattered_rows_matches_what_was_written(header_cache: Path) -> None:
    """Rows at both ends of a real per-CPU row map, and one run with gaps in the middle: each read
    row is its words summed over CPUs, and rows not asked for (in a gap of a run or between runs)
    are not returned."""
    spec = RowTableSpec("test_rows", 3, 1024, cache=0)
    bpf = compiled(spec, header_cache)
    rows = RowTable(spec, lambda name: bpf[name.encode()])
    try:
        ncpu = bpfsys.possible_cpus()
        table = rows.values
        wanted = [0, 500, 501, 520, 540, 1023]  # 500..540: one run with gaps inside it
        expected = {}
        for row in [*wanted, 510, 700]:  # written, never asked for: 510 inside a run, 700 between runs
            leaf = table.Leaf()  # BCC: one struct per possible CPU
            for cpu in range(ncpu):
                for w in range(spec.words):
                    leaf[cpu].w[w] = (row + 1) * 1000 + cpu * 10 + w
            table[table.Key(row)] = leaf
            expected[row] = [sum((row + 1) * 1000 + cpu * 10 + w for cpu in range(ncpu)) for w in range(spec.words)]
        got = rows.read(wanted)
        assert got == {row: expected[row] for row in wanted}
        assert rows.read([]) == {}
    finally:
        rows.close()
        bpf.cleanup()


@pytest.mark.bpf
def test_owned_rows_come_from_the_mapped_owner_array(header_cache: Path) -> None:
    """The owner array is read through its mapping: an empty table owns nothing; owners written
    into the map (first row, last row, the largest id) show at once, an unowned row goes at once;
    a closed table refuses to read, and closing twice is harmless."""
    spec = RowTableSpec("test_rows", 1, 600, cache=0)  # 4,800 B: the mapping is two pages
    bpf = compiled(spec, header_cache)
    rows = RowTable(spec, lambda name: bpf[name.encode()])
    try:
        assert rows.owned() == {}
        owners = {0: 7, 511: 2**64 - 1, 599: 12345}  # 511/599: either side of the page boundary
        for row, wid in owners.items():
            rows.owner[rows.owner.Key(row)] = rows.owner.Leaf(wid)
        assert rows.owned() == owners
        rows.unown(511, 2**64 - 1)
        assert rows.owned() == {0: 7, 599: 12345}
    finally:
        rows.close()
        bpf.cleanup()
    with pytest.raises(RuntimeError, match="closed"):
        rows.owned()
    rows.close()

"""The text report: a golden file of the fixed node at 100 and 80 columns (regenerate with
NODETUNE_UPDATE_GOLDEN=1 and read the diff), lines within the width, colour only when asked, and
BCC-style log2 histograms."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest

from agent.doctor.analyse import analyse
from agent.doctor.cpu import window
from agent.doctor.findings import Histogram
from agent.doctor.histogram import rows
from agent.doctor.render import render
from tests.agent.doctor import fixed

GOLDEN = Path(__file__).with_name("golden")


def fixed_text(width: int, colour: bool = False) -> str:
    before, after = fixed.readings()
    report = analyse(before, after, window(fixed.CPU_BEFORE, fixed.CPU_AFTER), fixed.TUNING, {}, "node-a", "live")
    return render(report, width, colour)


@pytest.mark.parametrize("width", [100, 80])
def test_golden_text(width: int) -> None:
    text = fixed_text(width)
    path = GOLDEN / f"fixed-{width}.txt"
    if os.environ.get("NODETUNE_UPDATE_GOLDEN") == "1":
        path.write_text(text)
    assert text == path.read_text()
    assert max(len(line) for line in text.splitlines()) <= width


def test_colour_only_when_asked() -> None:
    assert "\033[" not in fixed_text(100)
    coloured = fixed_text(100, colour=True)
    assert "\033[1;31mCRIT\033[0m" in coloured and "\033[33mWARN\033[0m" in coloured
    # colour codes do not move the columns: the same text once they are stripped
    import re

    assert re.sub(r"\033\[[0-9;]*m", "", coloured) == fixed_text(100)


def test_histogram_rows_like_bcc() -> None:
    h = Histogram("x", ((1e-6, 0), (2e-6, 3), (4e-6, 0), (8e-6, 6), (16e-6, 0), (math.inf, 0)))
    out = rows(h, 100)
    assert out[1:] == [
        "        1 -> 2         : 3        |********************                    |",
        "        2 -> 4         : 0        |                                        |",
        "        4 -> 8         : 6        |****************************************|",
    ]
    assert max(len(r) for r in rows(h, 50)) <= 50
    assert rows(Histogram("empty", ((1e-6, 0), (math.inf, 0))), 100) == []
    # waits above the last finite bound: "4194304 -> inf"
    assert rows(Histogram("inf", ((4.194304, 0), (math.inf, 1))), 100)[1].strip().startswith("4194304 -> inf")


@pytest.mark.parametrize("width", [44, 52, 60])
def test_histogram_rows_fit_narrow_terminals_and_long_counts(width: int) -> None:
    """Lesser point: a bar of at least 8 overflowed below 52 columns, and a count of 9+ digits pushed
    every row past the width."""
    h = Histogram("x", ((1e-6, 123456789012), (2e-6, 5), (math.inf, 0)))
    out = rows(h, width)
    assert max(len(r) for r in out) <= width, out
    assert "123456789012" in out[1] and out[1].endswith("*|")


def test_tiny_shares_are_not_printed_as_zero() -> None:
    from agent.doctor.analyse import pct

    assert (pct(0), pct(0.0004), pct(0.004), pct(0.25)) == ("0%", "<0.1%", "0.4%", "25%")

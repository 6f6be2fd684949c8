"""The soak benchmark's short version (bench/soak.py): 90 s of pod churn (cgroups v1 and v2 with
quotas, network namespaces with listeners and connections, pods through the local API server)
scraped by two scrapers. No counter goes back, fds and threads return to their baseline when the
churn stops, and no series of a gone pod outlives the grace. The hour-long run is
``make bench-soak`` (its RSS budget needs more than 90 s to mean anything)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO


@pytest.mark.bpf
def test_short_soak_under_pod_churn(header_cache: Path, tmp_path: Path) -> None:
    out = tmp_path / "soak.json"
    argv = ["--minutes", "1.5", "--pods", "8", "--churn-s", "2", "--grace", "15", "--scrape-s", "2"]
    argv += ["--sample-s", "20", "--cache-dir", str(header_cache), "--out", str(out)]
    res = subprocess.run(
        [sys.executable, "bench/soak.py", *argv], cwd=REPO, capture_output=True, text=True, timeout=900
    )
    print(res.stdout[-4000:], res.stderr[-4000:])
    result = json.loads(out.read_text())
    assert result["pods_made"] >= 30, "the churn did not run"
    assert result["failures"] == [], result["failures"]
    assert res.returncode == 0
    assert max(s["series"] for s in result["samples"]) > result["samples"][0]["series"]  # pods were seen

"""Cost of a checked cgroup id lookup (what each housekeeping tick does per live row): answered by
the watched index (one read of the inotify queue) against open_by_handle_at + readlink + close.

Makes N cgroups below the v2 root, then interleaves rounds of N checked lookups with each way; prints
the median and spread of the per-lookup cost. Root only (cgroupfs, CAP_DAC_READ_SEARCH).

    .venv/bin/python bench/cgroup_lookup_cost.py --cgroups 500 --rounds 11
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent.identity.cgroup_hierarchy import CgroupHierarchy
from host.paths import HostPaths


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cgroups", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=11)
    args = parser.parse_args()
    root = HostPaths().cgroup_v2()
    assert root is not None, "no cgroup v2 hierarchy"
    top = root / f"nodetune-bench-{uuid.uuid4().hex[:8]}"
    top.mkdir()
    made = [top / f"c{i}" for i in range(args.cgroups)]
    watched = CgroupHierarchy(root)
    by_handle = CgroupHierarchy(root)
    by_handle.tree.close()  # no inotify: every checked lookup asks the kernel by handle
    try:
        for d in made:
            d.mkdir()
        ids = [os.stat(d).st_ino for d in made]
        for h in (watched, by_handle):
            assert all(not h.lookup(i)[1] for i in ids)
        per_lookup: dict[str, list[float]] = {"tree": [], "handle": []}
        for _ in range(args.rounds):  # interleaved A/B rounds
            for name, h in (("tree", watched), ("handle", by_handle)):
                t = time.perf_counter()
                for i in ids:
                    h.lookup(i)
                per_lookup[name].append((time.perf_counter() - t) / len(ids) * 1e6)
        for name, values in per_lookup.items():
            print(
                f"{name}: median {statistics.median(values):.2f} µs per checked lookup "
                f"(min {min(values):.2f}, max {max(values):.2f}; {args.rounds} rounds of {len(ids)})"
            )
    finally:
        watched.close()
        by_handle.close()
        for d in made:
            d.rmdir()
        top.rmdir()


if __name__ == "__main__":
    main()

"""Cost of the throttling collector's scrape with many container cgroups. Not a test.

Makes N pods with one container each in the v1 ``cpu`` hierarchy (and ``cpuacct``), as the
kubelet's cgroupfs driver lays them out (``kubepods/burstable/pod<uid>/<container id>``), half of
them with a CPU quota, and times ``collect()`` plus rendering the text (median and max of ``--scrapes``), plus one
``maintain()`` tick. Run as root: ``make bench-throttling``. Every cgroup made here is removed.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agent.collectors.throttling import ThrottlingCollector
from agent.exporter import render
from agent.identity.workloads import Workloads
from host.paths import HostPaths


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--containers", type=int, default=500)
    ap.add_argument("--scrapes", type=int, default=30)
    args = ap.parse_args()
    paths = HostPaths()
    roots = [r for r in (paths.cgroup_v1("cpu"), paths.cgroup_v1("cpuacct")) if r is not None]
    if not roots:
        print("no v1 cpu hierarchy", file=sys.stderr)
        return 1
    top = f"nodetune-bench-{uuid.uuid4().hex[:8]}"
    made: list[Path] = []
    try:
        for i in range(args.containers):
            rel = f"{top}/kubepods/burstable/pod{uuid.UUID(int=i + 1)}/{i + 1:064x}"
            for root in roots:
                d = root / rel
                d.mkdir(parents=True)
                made.append(d)
            if i % 2 == 0:
                (roots[0] / rel / "cpu.cfs_quota_us").write_text("50000")
        collector = ThrottlingCollector(paths, Workloads(None))
        t = time.perf_counter()
        collector.maintain()
        tick = time.perf_counter() - t
        times = []
        series = 0
        for _ in range(args.scrapes):
            t = time.perf_counter()
            families = list(collector.collect())
            body = render(families)  # the text the exporter sends
            times.append(time.perf_counter() - t)
            series = len(families[0].rows)
        collector.close()
        print(f"containers: {args.containers}, cgroups in the tree: {len(collector.cgroups.paths)}, series: {series}")
        print(
            f"collect + render ({len(body) / 1e3:.0f} kB): median {statistics.median(times) * 1e3:.1f} ms, "
            f"max {max(times) * 1e3:.1f} ms over {len(times)} scrapes; one maintain tick {tick * 1e3:.1f} ms"
        )
    finally:
        for root in roots:
            base = root / top
            for d in sorted((p for p in base.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
                d.rmdir()
            if base.exists():
                base.rmdir()
    return 0


if __name__ == "__main__":
    sys.exit(main())

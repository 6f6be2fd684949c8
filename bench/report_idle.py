"""The agent and prometheus-node-exporter on the same node, both scraped every ``--interval``
seconds for ``--seconds``: each one's CPU, RSS and scrape time over the run. Not a test.

Both run at once, with their defaults, so the node's load falls on both alike; one thread scrapes
them in turn (``Accept-Encoding: gzip``, each over one kept-alive connection as Prometheus does;
``--new-connection`` for one per scrape, which makes the agent dump the host's TCP table at every
scrape: bench/report_agent.py ``Scraper``). Every ``--interval`` the script records, per process,
the scrape's wall time, ``VmRSS`` and cumulative CPU seconds (utime + stime from
``/proc/<pid>/stat``: 10 ms ticks, so CPU is compared over windows of ``--window`` scrapes, not per
scrape). The report (bench/report.py) derives CPU per scrape, idle CPU in % of a core and their
ratio, per window, with a confidence interval over the windows.

Run as root: ``python bench/report_idle.py --seconds 600 --json out.json``. Both processes are
ended by their pid.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from contextlib import ExitStack
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.report_agent import Scraper, cpu_seconds, rss_mib, running_agent, running_exporter


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=600.0, help="length of the scraped run")
    ap.add_argument("--interval", type=float, default=5.0, help="scrape interval, seconds (both processes)")
    ap.add_argument("--json", type=Path, help="write every sample here")
    ap.add_argument("--new-connection", action="store_true", help="a new connection per scrape (default: kept alive)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root (the agent loads BPF programs)")
    with ExitStack() as stack:
        targets = [stack.enter_context(running_agent()), stack.enter_context(running_exporter())]
        scrapers = {t.name: Scraper(t.url, keep_alive=not args.new_connection) for t in targets}
        for t in targets:
            scrapers[t.name].scrape()  # warm-up (and the connection), not counted
        samples: dict[str, list[dict[str, float]]] = {t.name: [] for t in targets}
        t0 = time.monotonic()
        tick = t0
        while tick - t0 <= args.seconds:
            for t in targets:
                took = scrapers[t.name].scrape().seconds
                rss, anon = rss_mib(t.pid)
                sample = {"t": time.monotonic() - t0, "scrape_s": took, "rss_mib": rss, "anon_mib": anon}
                samples[t.name].append(sample | {"cpu_s": cpu_seconds(t.pid)})
            line = ", ".join(
                f"{name} scrape {s[-1]['scrape_s'] * 1e3:.1f} ms rss {s[-1]['rss_mib']:.1f} MiB "
                f"cpu {s[-1]['cpu_s']:.2f} s"
                for name, s in samples.items()
            )
            print(f"t={tick - t0:6.0f}s {line}", flush=True)
            tick += args.interval
            time.sleep(max(0.0, tick - time.monotonic()))
    if args.json:
        figures = {"interval_s": args.interval, "new_connection": args.new_connection, "samples": samples}
        args.json.write_text(json.dumps(figures, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What the agent really exports: the series names and label names of a real ``nodetune run`` on this
host, read from its /metrics, for the rules' and the dashboard's tests to check their names against.

A family with no sample on this host (no cgroup with a CPU limit, say) still has its ``# TYPE``
line; its series names follow from its type. Its label names are then unknown, and only checked
against the union of every family's labels.
"""

from __future__ import annotations

import functools
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import REPO, free_port, http_get, wait_until

#: Labels Prometheus adds to every series of a target (``node`` by the manifests' relabelling).
TARGET_LABELS = frozenset({"instance", "job", "node"})
#: Series Prometheus itself records for every target.
PROMETHEUS_SERIES = frozenset({"up"})

_SUFFIXES = {"histogram": ("_bucket", "_sum", "_count"), "summary": ("_sum", "_count", "")}


@dataclass
class Exports:
    series: set[str] = field(default_factory=set)
    #: series name -> label names seen on its samples (absent: no sample on this host)
    labels: dict[str, set[str]] = field(default_factory=dict)

    @property
    def all_labels(self) -> set[str]:
        return set().union(*self.labels.values()) | TARGET_LABELS


def parse(text: str) -> Exports:
    out = Exports()
    for family in text_string_to_metric_families(text):
        # the parser names a counter family without its _total; its series carry it
        kind = family.type
        names = [family.name + "_total"] if kind == "counter" else [family.name + s for s in _SUFFIXES.get(kind, ("",))]
        out.series.update(names)
        for sample in family.samples:
            out.series.add(sample.name)
            out.labels.setdefault(sample.name, set()).update(sample.labels)
    return out


@functools.cache
def agent_exports(cache_dir: Path) -> Exports:
    """Runs ``nodetune run`` (every probe and collector), reads /metrics once it is ready, stops it."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = cache_dir / f"exports-agent-{port}.log"
    cmd = [sys.executable, "-m", "agent.cli", "run", "--listen", f"127.0.0.1:{port}", "--cache-dir", str(cache_dir)]
    with open(log, "w") as log_file:
        proc = subprocess.Popen(cmd, cwd=REPO, stderr=log_file, text=True)
    try:
        deadline = time.monotonic() + 240  # a fresh header cache is merged first: ~50 s on a busy 2-CPU VM
        while True:
            assert proc.poll() is None, log.read_text()
            try:
                if http_get(url + "/readyz", timeout=1)[0] == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "agent not ready in 240 s: " + log.read_text()
            time.sleep(0.1)
        # Lock callers are labelled only once some lock contended since the probe loaded: a quiet
        # machine may have had none yet, so some is made (tests/contention.py's pipe writers).
        subprocess.run([sys.executable, "-m", "tests.contention", "1", "4"], cwd=REPO, check=True)
        wait_until(
            lambda: "nodetune_lock_contentions_total{" in http_get(url + "/metrics")[1],
            timeout=60,
            what="lock callers in /metrics",
        )
        status, body = http_get(url + "/metrics")
        assert status == 200, body
        return parse(body)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

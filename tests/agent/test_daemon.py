"""``nodetune run`` as a real process on the real kernel: per-workload histograms, health, SIGTERM."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from agent.config import AgentConfig
from agent.daemon import Agent, longest_first, prefetch_in_order
from host.paths import HostPaths
from probes import bpfsys, reclaim
from probes.base import KernelFacts, Probe
from tests import bpf_query
from tests.conftest import (
    BUSY,
    REPO,
    SLEEPER,
    SpreadCgroup,
    free_port,
    http_get,
    parse_metrics,
    run_delay_ns,
    wait_until,
)

if TYPE_CHECKING:
    from tests.conftest import TestCgroup

# Every unit of a default agent, all succeeding: the probes and the collectors.
UNITS_UP = {
    unit: 1.0 for unit in ("agent", "runqlat", "lockstat", "connect", "throttling", "listen", "ports", "tuning")
}

HIST = "nodetune_runqueue_latency_seconds"


def series(metrics: dict, cgroup: str) -> dict[str, float]:
    """{le: cumulative count, "sum": s, "count": n} of one workload's histogram."""
    out: dict[str, float] = {}
    for s in metrics.get(HIST, []):
        if s.labels.get("cgroup") != cgroup:
            continue
        if s.name.endswith("_bucket"):
            out[s.labels["le"]] = s.value
        else:
            out[s.name.rsplit("_", 1)[1]] = s.value
    return out


def quantile(q: float, after: dict[str, float], before: dict[str, float]) -> float:
    """Upper bound of the bucket holding quantile q of the interval (histogram_quantile's bracket)."""
    bounds = sorted((float(le), after[le] - before.get(le, 0.0)) for le in after if le not in ("sum", "count"))
    total = bounds[-1][1]
    assert total > 0
    for bound, cumulative in bounds:
        if cumulative >= q * total:
            return bound
    return float("inf")


def delays(*groups: TestCgroup) -> tuple[int, ...]:
    """Each test cgroup's schedstat run_delay (ns), read now."""
    return tuple(run_delay_ns(g.pids()) for g in groups)


def assert_within(probe_s: float, low_s: float, high_s: float, rel: float, abs_s: float) -> None:
    """The probe's sum lies in the kernel's bracket [low, high], give or take rel x high + abs."""
    slack = rel * high_s + abs_s
    assert low_s - slack <= probe_s <= high_s + slack, f"histogram sum {probe_s}s vs schedstat [{low_s}, {high_s}]s"


@pytest.mark.bpf
def test_busy_cgroup_waits_far_more_than_idle_and_matches_schedstat(agent_process, make_cgroup) -> None:
    busy, idle = make_cgroup("busy"), make_cgroup("idle")
    agent = agent_process()
    cpus = sorted(os.sched_getaffinity(0))
    for _ in range(len(cpus) + 2):  # more runnable busy tasks than CPUs, all on one CPU
        busy.spawn(BUSY, cpu=cpus[0])
    idle.spawn(SLEEPER, cpu=cpus[-1])
    wait_until(  # both test cgroups export a series with cgroup=<path>
        lambda: (m := agent.metrics()) and series(m, busy.rel) and series(m, idle.rel), what="both series"
    )

    # The kernel's run_delay is read just before and just after each scrape: a wait that ends while
    # the agent reads its maps is in one count and not yet in the other, and the scrape itself makes
    # such waits (the agent runs on the CPUs the tasks wait for: a CI run saw the sleeper's 8 ms in
    # flight). The histogram's sums must fall inside the bracket the two reads give.
    busy0, idle0 = delays(busy, idle)
    outer0 = time.monotonic()
    before = agent.metrics()
    inner0 = time.monotonic()
    busy1, idle1 = delays(busy, idle)
    time.sleep(4)  # the window measured (not a wait for something to happen)
    busy2, idle2 = delays(busy, idle)
    inner1 = time.monotonic()
    after = agent.metrics()
    outer1 = time.monotonic()
    busy3, idle3 = delays(busy, idle)

    b0, b1 = series(before, busy.rel), series(after, busy.rel)
    i0, i1 = series(before, idle.rel), series(after, idle.rel)
    assert b1 and i1, "both test cgroups export a series with cgroup=<path>"
    busy_p50, busy_p99 = quantile(0.5, b1, b0), quantile(0.99, b1, b0)
    idle_p50, idle_p90 = quantile(0.5, i1, i0), quantile(0.9, i1, i0)
    print(f"busy p50 <= {busy_p50:g}s p99 <= {busy_p99:g}s, idle p50 <= {idle_p50:g}s p90 <= {idle_p90:g}s")
    # What holds at any load: the busy tasks share one CPU, so at every instant all but one of them
    # wait (more when other work runs there): their waits add up to at least (n - 1) x the window,
    # less the waits still in flight at its ends (a slice each). The sleeper is one task: its waits
    # add up to at most the window. Quantiles depend on what else runs on those CPUs (a CI run at
    # load average 40 saw busy p50 at 0.13 ms: other tasks' wakeups preempted the busy ones for
    # short turns), so they are printed, not asserted; the histograms are checked against schedstat.
    busy_s, idle_s = b1["sum"] - b0["sum"], i1["sum"] - i0["sum"]
    assert busy_s >= 0.8 * (len(cpus) + 1) * (inner1 - inner0), (busy_s, inner1 - inner0)
    assert idle_s <= outer1 - outer0 and idle_s < busy_s / 2, (idle_s, outer1 - outer0, busy_s)
    assert_within(i1["sum"] - i0["sum"], (idle2 - idle1) / 1e9, (idle3 - idle0) / 1e9, 0.25, 1e-3)
    assert_within(b1["sum"] - b0["sum"], (busy2 - busy1) / 1e9, (busy3 - busy0) / 1e9, 0.10, 0.0)

    # Workload labels of the contract, names empty until the pod watch knows them.
    labels = next(s.labels for s in after[HIST] if s.labels.get("cgroup") == busy.rel)
    assert {k: v for k, v in labels.items() if k != "le"} == {
        "namespace": "",
        "pod": "",
        "container": "",
        "cgroup": busy.rel,
    }
    assert [s.value for s in after["nodetune_probe_up"] if s.labels["probe"] == "runqlat"] == [1.0]
    assert [s.labels["attach"] for s in after["nodetune_probe_info"]] == [
        "raw_tracepoint",
        "raw_tracepoint",
        "tracepoint",
    ]
    success = {s.labels["collector"]: s.value for s in after["nodetune_scrape_collector_success"]}
    assert success == UNITS_UP


@pytest.mark.bpf
def test_scrape_passes_promtool_lint(agent_process, make_cgroup) -> None:
    promtool = shutil.which("promtool")
    assert promtool, "promtool (Debian package prometheus) is installed by make test"
    cg = make_cgroup("lint")
    agent = agent_process()
    cg.spawn(SLEEPER)

    def with_histogram() -> str:
        text = agent.metrics_text()
        return text if HIST + "_bucket" in text else ""

    text = wait_until(with_histogram, what="a histogram")
    result = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.bpf
def test_health_endpoints_and_sigterm_exit_cleanly(agent_process) -> None:
    agent = agent_process("--connect-strategy", "tracepoint+sock_ops")  # one program linked to the cgroup root
    assert http_get(agent.url + "/healthz")[0] == 200
    assert http_get(agent.url + "/readyz")[0] == 200
    assert http_get(agent.url + "/nope")[0] == 404
    fds = {p: os.readlink(p) for p in Path(f"/proc/{agent.proc.pid}/fd").iterdir()}
    # runqlat: sched_switch; lockstat: contention_begin and _end; connect: inet_sock_set_state and
    # the sock_ops program
    assert sum(target == "anon_inode:bpf-prog" for target in fds.values()) == 5
    linked = {bpf_query.prog_id(int(p.name), agent.proc.pid) for p, t in fds.items() if t == "anon_inode:bpf_link"}
    root = os.open(HostPaths().cgroup_v2(), os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert linked & set(bpf_query.attached_ids(root, bpfsys.BPF_CGROUP_SOCK_OPS)), linked
        agent.proc.send_signal(signal.SIGTERM)
        assert agent.proc.wait(timeout=15) == 0
        # its link went with the process: its program is no longer on the cgroup root
        assert not linked & set(bpf_query.attached_ids(root, bpfsys.BPF_CGROUP_SOCK_OPS))
    finally:
        os.close(root)


@pytest.mark.bpf
def test_loading_leaves_no_compiler_pages_resident(agent_process, tmp_path: Path) -> None:
    """Once every probe is loaded the agent gives back what compiling left resident (probes/reclaim.py):
    the code of clang and LLVM (tens of MiB) is no longer in its RSS, before and after scrapes."""
    agent = agent_process()
    smaps = Path(f"/proc/{agent.proc.pid}/smaps")
    deadline = time.monotonic() + 30  # given back right after /readyz turned 200
    while "memory given back after loading" not in (tmp_path / "agent.log").read_text():
        assert time.monotonic() < deadline, (tmp_path / "agent.log").read_text()
        time.sleep(0.05)

    def compiler_text_kib() -> int:
        return sum(m.rss_kib for m in reclaim.compiler_mappings(smaps) if "x" in m.perms)

    assert any("x" in m.perms for m in reclaim.compiler_mappings(smaps))  # BCC's compiler is mapped
    assert compiler_text_kib() < 1024
    for _ in range(3):
        metrics = agent.metrics()
    assert {s.labels["probe"]: s.value for s in metrics["nodetune_probe_up"]} == {
        "runqlat": 1.0,
        "lockstat": 1.0,
        "connect": 1.0,
    }
    assert compiler_text_kib() < 1024


HEAP_HOLES = """
import ctypes
from agent.config import AgentConfig
from agent.daemon import Agent
from probes import reclaim

agent = Agent(AgentConfig(probes=(), cache_dir="/nonexistent"), collectors=False)
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
blocks = [libc.malloc(1000) for _ in range(30000)]  # 30 MB of small blocks, as a scrape's strings
for b in blocks:
    ctypes.memset(b, 1, 1000)
before = reclaim.rss_kib()
for i, b in enumerate(blocks):
    if i % 30:  # one block in 30 stays (long-lived label sets): the heap cannot shrink from its top
        libc.free(b)
freed = reclaim.rss_kib()
agent.maintain()
print(before - freed, before - reclaim.rss_kib())
"""


def test_housekeeping_gives_freed_heap_back() -> None:
    """Agent.maintain() (the timer) returns the free pages between live heap blocks to the kernel."""
    out = subprocess.run([sys.executable, "-c", HEAP_HOLES], cwd=REPO, capture_output=True, text=True, check=True)
    given_back_by_free, given_back_by_tick = (int(x) for x in out.stdout.split())
    assert given_back_by_free < 4096, out.stdout  # free() alone keeps them resident
    assert given_back_by_tick > 20000, out.stdout  # the tick returns most of the 29 MB freed


def inotify_instances() -> int:
    """inotify instances this process holds (/proc/self/fd links to anon_inode:inotify)."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            count += os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:inotify"
        except OSError:  # the directory's own fd, closed meanwhile
            continue
    return count


@pytest.mark.root
@pytest.mark.parametrize("choice", ["unified", "cpu"])
def test_users_of_one_cgroup_hierarchy_share_one_watched_index(tmp_path: Path, choice: str) -> None:
    """The identity service, the netns index and the throttling collector get one index per
    hierarchy root: one inotify instance for each hierarchy they read, not one per user. On a
    hybrid host throttling reads the v1 cpu hierarchy, which the identity service charges with
    ``--cgroup-hierarchy cpu``."""
    paths = HostPaths()
    if paths.workload_hierarchy(choice)[1] is None:
        pytest.skip(f"no {choice} hierarchy")
    before = inotify_instances()
    config = AgentConfig(probes=(), cache_dir=tmp_path, cgroup_hierarchy=choice, collectors=("throttling", "listen"))
    agent = Agent(config)
    try:
        throttling, workloads = agent.collectors["throttling"], agent.workloads
        assert agent.netns is not None and agent.netns.hierarchy is workloads.hierarchy
        roots = {os.path.realpath(workloads.hierarchy.root), os.path.realpath(throttling.cgroups.root)}
        assert (throttling.cgroups is workloads.hierarchy) == (len(roots) == 1)
        assert inotify_instances() - before == len(roots)
    finally:
        agent.close()
    assert inotify_instances() == before


class BrokenProbe(Probe):
    """Attaches to a raw tracepoint that does not exist: the kernel refuses it for real."""

    name = "broken"
    strategies = ("raw_tracepoint",)

    def source(self) -> str:
        return "RAW_TRACEPOINT_PROBE(nodetune_no_such_tracepoint) { return 0; }"

    def cflags(self, strategy: str) -> list[str]:
        return []

    def collect_loaded(self):
        return []


class SlowProbe(BrokenProbe):
    """Takes its time to load, like a first-run header merge plus compile."""

    name = "slow"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.release = threading.Event()

    def load(self) -> None:
        self.release.wait(30)
        super().load()


class RaisingCollector:
    def collect(self):
        raise OSError("cpu.stat vanished")


@pytest.mark.bpf
def test_probe_that_fails_to_load_leaves_the_agent_serving(header_cache: Path) -> None:
    config = AgentConfig(listen_host="127.0.0.1", listen_port=free_port(), cache_dir=header_cache)
    agent = Agent(config, extra_probes=[BrokenProbe(KernelFacts(cache_dir=config.cache_dir))])
    agent.exporter.register("raising", RaisingCollector())
    try:
        agent.start_server()
        assert http_get(f"http://127.0.0.1:{config.listen_port}/readyz")[0] == 503  # not attempted yet
        agent.load_probes()
        status, body = http_get(f"http://127.0.0.1:{config.listen_port}/metrics")
        assert http_get(f"http://127.0.0.1:{config.listen_port}/readyz")[0] == 200
    finally:
        agent.close()
    assert status == 200
    m = parse_metrics(body)
    up = {s.labels["probe"]: s.value for s in m["nodetune_probe_up"]}
    assert up == {"runqlat": 1.0, "lockstat": 1.0, "connect": 1.0, "broken": 0.0}
    assert list(agent.probes) == ["runqlat", "lockstat", "connect", "broken"]  # the configured order
    assert "Failed to attach BPF to raw tracepoint" in agent.probes["broken"].skipped["raw_tracepoint"]
    success = {s.labels["collector"]: s.value for s in m["nodetune_scrape_collector_success"]}
    assert success == {**UNITS_UP, "raising": 0.0}
    assert HIST in m


@pytest.mark.bpf
def test_health_beats_while_a_slow_probe_loads(header_cache: Path) -> None:
    config = AgentConfig(
        listen_host="127.0.0.1", listen_port=free_port(), cache_dir=header_cache, health_timeout_s=1.0, probes=()
    )
    slow = SlowProbe(KernelFacts(cache_dir=header_cache))
    agent = Agent(config, extra_probes=[slow])
    url = f"http://127.0.0.1:{config.listen_port}"
    loop = threading.Thread(target=agent.run_forever, kwargs={"tick_s": 0.1}, daemon=True)
    try:
        agent.start_server()
        agent.start_loading()
        loop.start()
        for _ in range(15):  # 3 s, three times the health timeout, while loading
            time.sleep(0.2)
            assert http_get(url + "/healthz")[0] == 200
            assert http_get(url + "/readyz")[0] == 503
            status, body = http_get(url + "/metrics")  # a scrape while loading never fails
            assert status == 200 and "nodetune_build_info" in body
        slow.release.set()
        deadline = time.monotonic() + 30
        while http_get(url + "/readyz")[0] != 200:
            assert time.monotonic() < deadline
            time.sleep(0.1)
    finally:
        slow.release.set()
        agent.stop_event.set()
        loop.join(5)
        agent.close()
    assert agent.probes["slow"].reason


@pytest.mark.bpf
def test_scrapes_have_no_side_effects(agent_process, make_cgroup) -> None:
    """Two scrapers (an HA Prometheus pair) and HEAD requests see the same data; reclaim is the timer's."""
    cg = make_cgroup("twice")
    agent = agent_process()
    cg.spawn(SLEEPER)
    wait_until(lambda: series(agent.metrics(), cg.rel), what="the cgroup's series")
    cg.stop()  # its task reaped: nothing runs in the cgroup any more, its histogram is frozen
    first = series(agent.metrics(), cg.rel)
    assert first["count"] > 0
    for _ in range(5):
        req = urllib.request.Request(agent.url + "/metrics", method="HEAD")
        with urllib.request.urlopen(req, timeout=10) as r:
            assert r.status == 200
    assert series(agent.metrics(), cg.rel) == series(agent.metrics(), cg.rel) == first


@pytest.mark.bpf
def test_pod_names_from_the_api_label_runqlat_and_throttling(agent_process, tmp_path: Path) -> None:
    """End to end: nodetune run against a local API server; a task in a pod-shaped cgroup (v2 for
    runqlat, v1 cpu/cpuacct for throttling) gets its pod's names on both signals."""
    from tests.fake_apiserver import FakeAPIServer, pod

    paths = HostPaths()
    uid, cid = "0a1b2c3d-0000-4000-8000-00000000e2e0", "e" * 64
    rel = f"/nodetune-test-e2e-{uuid.uuid4().hex[:8]}/kubepods/burstable/pod{uid}/{cid}"
    roots = [r for r in (paths.cgroup_v2(), paths.cgroup_v1("cpu"), paths.cgroup_v1("cpuacct")) if r is not None]
    cg = SpreadCgroup(roots, rel)
    server = FakeAPIServer().start()
    server.put("pods", pod(uid, "redis-0", "n1", {"redis": cid}, namespace="cache"))
    try:
        cg.spawn(BUSY)
        agent = agent_process("--kubeconfig", str(server.kubeconfig(tmp_path)), "--node-name", "n1")
        names = {"namespace": "cache", "pod": "redis-0", "container": "redis", "cgroup": ""}
        deadline = time.monotonic() + 30
        while True:
            m = agent.metrics()
            runq = [s for s in m.get(HIST, []) if s.name.endswith("_count") and s.labels == names]
            thr = [s for s in m.get("nodetune_cpu_usage_seconds", []) if s.labels == names]
            if runq and thr:
                break
            assert time.monotonic() < deadline, f"no named series: {[s.labels for s in m.get(HIST, [])][:5]}"
            time.sleep(0.5)
        assert runq[0].value > 0 and thr[0].value > 0
        assert m["nodetune_kube_pods"][0].value == 1
        assert {s.labels.get("collector"): s.value for s in m["nodetune_scrape_collector_success"]}["kube"] == 1
    finally:
        server.stop()
        cg.remove()


@pytest.mark.bpf
def test_api_server_down_changes_nothing_else(agent_process, tmp_path: Path) -> None:
    """An API server that refuses connections: errors counted with backoff, everything else runs."""
    from tests.fake_apiserver import FakeAPIServer

    with FakeAPIServer() as dead:  # bound, never served, closed: its port refuses
        kubeconfig = dead.kubeconfig(tmp_path)
    agent = agent_process("--kubeconfig", str(kubeconfig), "--node-name", "n1")
    started = time.monotonic()

    def refused() -> float:
        errors = agent.metrics().get("nodetune_kube_watch_errors", [])
        return sum(s.value for s in errors if s.labels["code"] == "refused")

    wait_until(refused, what="a refused attempt")  # past the start-up jitter
    wait_until(lambda: time.monotonic() - started >= 8, what="8 s")  # a few more attempts, backing off
    assert http_get(agent.url + "/healthz")[0] == 200
    m = agent.metrics()
    assert 1 <= refused() <= 20  # two reflectors backing off (a spinning client: thousands)
    success = {s.labels["collector"]: s.value for s in m["nodetune_scrape_collector_success"]}
    assert success == {**UNITS_UP, "kube": 1.0}
    assert HIST in m


@pytest.mark.root
def test_ports_alone_sees_namespaces_made_after_start(agent_process) -> None:
    """The daemon's timer refreshes the namespace discovery whichever network collectors run."""
    agent = agent_process("--collectors", "ports", "--probes", "none")
    name = f"nodetune-test-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        deadline = time.monotonic() + 20
        while True:
            sizes = {s.labels["netns"] for s in agent.metrics().get("nodetune_ephemeral_port_range_size", [])}
            if name in sizes:
                break
            assert time.monotonic() < deadline, f"{name} not discovered: {sizes}"
            time.sleep(0.5)
        assert "host" in sizes
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=True)


def program_counters(metrics: dict, family: str, probe: str) -> dict[str, float]:
    """program -> value of one of the nodetune_probe_bpf_* counters, for one probe."""
    return {s.labels["program"]: s.value for s in metrics[family] if s.labels["probe"] == probe}


@pytest.mark.bpf
def test_bpf_stats_show_what_each_probe_program_costs_and_stop_with_the_agent(
    agent_process, header_cache: Path
) -> None:
    """--bpf-stats: the connect probe's programs count the runs of a known number of loopback
    connects; once the agent is gone the kernel no longer times programs (the sysctl was off)."""
    assert Path("/proc/sys/kernel/bpf_stats_enabled").read_text().strip() == "0", "the test needs the sysctl off"
    agent = agent_process("--bpf-stats", "--probes", "connect,runqlat", "--collectors", "none")
    before = agent.metrics()
    assert before["nodetune_probe_bpf_stats_enabled"][0].value == 1
    connects = 200
    with socket.create_server(("127.0.0.1", 0)) as listener:
        for _ in range(connects):
            with socket.create_connection(listener.getsockname()) as client:
                listener.accept()[0].close()
                client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    after = agent.metrics()
    runs = {
        p: program_counters(after, "nodetune_probe_bpf_runs", "connect")[p] - n
        for p, n in program_counters(before, "nodetune_probe_bpf_runs", "connect").items()
    }
    seconds = {
        p: program_counters(after, "nodetune_probe_bpf_run_seconds", "connect")[p] - s
        for p, s in program_counters(before, "nodetune_probe_bpf_run_seconds", "connect").items()
    }
    # Each connect passes CLOSE->SYN_SENT->ESTABLISHED on the client and more on both sides' close.
    assert runs and all(n >= 2 * connects for n in runs.values()), runs
    assert all(0 < seconds[p] / runs[p] < 100e-6 for p in runs), (seconds, runs)
    assert program_counters(after, "nodetune_probe_bpf_runs", "runqlat")  # every loaded probe is listed
    assert all(s.value == 0 for s in after["nodetune_probe_bpf_recursion_misses"] if s.labels["probe"] == "connect"), (
        after["nodetune_probe_bpf_recursion_misses"]
    )

    # The agent held the only stats fd: when it exits, a program of ours is no longer timed.
    KernelFacts(cache_dir=header_cache).headers.apply_env()
    from bcc import BPF

    bpf = BPF(text=b"int noop(void *ctx) { return 0; }")
    try:
        fd = bpf.load_func(b"noop", BPF.RAW_TRACEPOINT).fd
        bpfsys.prog_test_run_raw_tp(fd, (0,))
        assert bpfsys.prog_stats(fd).run_cnt == 1  # timed while the agent runs
        agent.proc.send_signal(signal.SIGTERM)
        assert agent.proc.wait(timeout=15) == 0
        bpfsys.prog_test_run_raw_tp(fd, (0,))
        assert bpfsys.prog_stats(fd).run_cnt == 1
    finally:
        bpf.cleanup()


class _Prefetching:
    """A probe's prefetch side only: records its turn, or fails as told."""

    def __init__(self, name: str, order: list[str], fail: type[BaseException] | None = None) -> None:
        self.name, self.order, self.fail = name, order, fail

    def prefetch(self) -> None:
        self.order.append(self.name)
        if self.fail is not None:
            raise self.fail("prefetch failed")


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # SystemExit ends the helper
def test_prefetch_in_order_sets_every_event_whatever_happens() -> None:
    """Prefetches run in load order on a helper; every probe's event is set even when one raises
    (an Exception, or a BaseException the probe's own prefetch would not catch) or the agent is
    stopping: a load never waits for a prefetch that will not come."""
    order: list[str] = []
    probes = [_Prefetching("a", order), _Prefetching("b", order, RuntimeError), _Prefetching("c", order)]
    events = prefetch_in_order(probes, threading.Event())  # type: ignore[arg-type]
    assert all(e.wait(30) for e in events) and order == ["a", "b", "c"]
    order.clear()
    probes = [_Prefetching("a", order, SystemExit), _Prefetching("b", order)]
    events = prefetch_in_order(probes, threading.Event())  # type: ignore[arg-type]
    assert all(e.wait(30) for e in events) and order == ["a"]
    # the helper ends with the SystemExit: reported while this test's filter still applies
    wait_until(lambda: not any(t.name == "probe-prefetch" for t in threading.enumerate()), what="helper ended")
    order.clear()
    stopped = threading.Event()
    stopped.set()
    events = prefetch_in_order([_Prefetching("a", order)], stopped)  # type: ignore[list-item]
    assert all(e.wait(30) for e in events) and order == []
    assert prefetch_in_order([], threading.Event()) == []


class _Sized(BrokenProbe):
    """A probe of a given source size whose prefetch and load record their calls."""

    def __init__(self, name: str, size: int, calls: list[str] | None = None) -> None:
        super().__init__(KernelFacts())
        self.name, self.size, self.calls = name, size, calls if calls is not None else []

    def source(self) -> str:
        if self.size < 0:
            raise FileNotFoundError("no such C source")
        return "x" * self.size

    def prefetch(self) -> None:
        self.calls.append(self.name)

    def load(self) -> None:
        self.attach = f"recorded-{self.name}"


def test_loads_start_longest_source_first_ties_in_order_unreadable_last() -> None:
    probes = [_Sized("a", 10), _Sized("b", -1), _Sized("c", 30), _Sized("d", 10), _Sized("e", 0)]
    assert [probes[i].name for i in longest_first(probes)] == ["c", "a", "d", "e", "b"]  # type: ignore[arg-type]
    assert longest_first([]) == []


@pytest.mark.bpf  # real loader children are started ahead (prespawn), and the header cache read
def test_the_agent_starts_loads_longest_first_and_registers_them_as_configured(header_cache: Path) -> None:
    """The agent's own loading: prefetches (and so loads) in ``longest_first`` order, each
    probe's outcome under its own name, registered in the configured order."""
    calls: list[str] = []
    extra = [_Sized("short", 5, calls), _Sized("long", 50, calls), _Sized("mid", 20, calls)]
    config = AgentConfig(listen_host="127.0.0.1", listen_port=free_port(), cache_dir=header_cache, probes=())
    agent = Agent(config, extra_probes=extra)  # type: ignore[arg-type]
    try:
        agent.load_probes()
    finally:
        agent.close()
    assert calls == ["long", "mid", "short"]
    assert list(agent.probes) == ["short", "long", "mid"]
    assert {name: (state.name, state.attach) for name, state in agent.probes.items()} == {
        name: (name, f"recorded-{name}") for name in calls
    }

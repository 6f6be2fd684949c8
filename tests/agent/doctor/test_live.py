"""``nodetune doctor`` on this machine, against real cgroups and network namespaces made by the test:
a throttled v1 cpu cgroup and a namespace whose port range is exhausted are both CRIT with the right
workload; the JSON validates against the schema; without BPF the rest is still judged and the
skipped sections say why; ``--from`` reads a running agent's /metrics; an unreadable source exits 3."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import uuid
from functools import partial
from pathlib import Path

import jsonschema
import pytest

from agent.cli import main
from agent.doctor.report_json import schema
from host.paths import HostPaths
from tests.conftest import BUSY, REPO, SpreadCgroup
from tests.netns import enter_cgroup

SCHEMA = schema()
PROBE_CHECKS = {"cpu.runqueue": "runqlat", "locks.contention": "lockstat", "network.port_failures": "connect"}


def doctor(*args: str, user: int | None = None) -> tuple[int, dict, str]:
    """The doctor as a user runs it; (exit code, the JSON report or {}, stderr)."""
    cmd = [sys.executable, "-m", "agent.cli", "doctor", "--json", *args]
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, user=user)
    report = json.loads(res.stdout) if res.stdout.strip() else {}
    if report:
        jsonschema.validate(report, SCHEMA)
    return res.returncode, report, res.stderr


def findings(report: dict) -> dict[str, dict]:
    return {f["id"]: f for f in report["findings"]}


@pytest.fixture
def throttled():
    """A non-pod v1 cpu cgroup (cpuacct alongside for usage) with 10 % of a CPU and a busy loop."""
    paths = HostPaths()
    roots = [r for r in (paths.cgroup_v1("cpu"), paths.cgroup_v1("cpuacct")) if r is not None]
    if paths.cgroup_v1("cpu") is None:
        pytest.skip("no v1 cpu hierarchy")
    cg = SpreadCgroup(roots, f"/nodetune-test-doctor-{uuid.uuid4().hex[:8]}")
    try:
        (cg.dirs[0] / "cpu.cfs_quota_us").write_text("10000")  # period 100 ms
        cg.spawn(BUSY)
        yield cg
    finally:
        cg.remove()


@pytest.fixture
def exhausted(netns):
    """A namespace with a 10-port range, all 10 held towards one listener (an 11th connect fails)."""
    ns = netns("40000 40009")
    _holder, result = ns.hold(11, "127.0.0.1:30000")
    assert result == "EADDRNOTAVAIL 10", result
    return ns


# A listener with backlog 1 that never accepts, and a client that keeps connecting to it (non-blocking,
# one SYN every 20 ms): each SYN that finds the accept queue full is a ListenOverflow (seeds 001, 003).
OVERFLOWING = """
import socket, time
s = socket.socket(); s.bind(("127.0.0.1", 0)); s.listen(1)
port, socks = s.getsockname()[1], []
print("listening", flush=True)
for _ in range(6000):
    c = socket.socket(); c.setblocking(False)
    try: c.connect(("127.0.0.1", port))
    except BlockingIOError: pass
    socks.append(c); time.sleep(0.02)
"""


@pytest.fixture
def overflowing(netns):
    ns = netns("40000 40999")
    p = subprocess.Popen(
        ["ip", "netns", "exec", ns.name, sys.executable, "-c", OVERFLOWING], stdout=subprocess.PIPE, text=True
    )
    ns.procs.append(p)  # ended with the namespace
    assert p.stdout.readline().strip() == "listening"
    return ns


@pytest.mark.root
def test_throttled_cgroup_exhausted_and_overflowing_namespaces_are_crit_without_bpf(
    throttled, exhausted, overflowing
) -> None:
    code, report, _ = doctor("--duration", "1.5", "--probes", "none")
    f = findings(report)
    listen = f["network.listen"]
    assert listen["verdict"] == "WARN", listen  # as NodetuneListenQueueOverflows: a warning
    mine = next(o for o in listen["offenders"] if o["name"] == overflowing.name)
    assert mine["value"] >= 1 and "backlog 1" in mine["detail"] and "somaxconn" in listen["fix"]
    thr = f["cpu.throttling"]
    assert thr["verdict"] == "CRIT", thr
    mine = next(o for o in thr["offenders"] if o["name"] == throttled.rel)
    assert mine["value"] >= 0.5 and "0.10 cores" in mine["detail"]
    ports = f["network.ports"]
    assert ports["verdict"] == "CRIT" and ports["value"] == 1.0
    mine = next(o for o in ports["offenders"] if o["name"] == exhausted.name)
    assert mine["value"] == 1.0 and "10 of 10 ports in use towards 127.0.0.1:30000" in mine["detail"]
    assert "ip_local_port_range" in ports["fix"]
    assert code == 2 and report["exit_code"] == 2 and report["verdict"] == "CRIT"
    # without BPF: the probes' sections say why, the rest is judged
    for check, probe in PROBE_CHECKS.items():
        assert f[check]["verdict"] == "SKIP" and f[check]["summary"] == f"{probe}: left out (--probes)"
    judged = {i for i, x in f.items() if x["verdict"] != "SKIP"}
    assert {"cpu.utilisation", "cpu.saturation", "cpu.interrupts", "network.listen", "tuning.profile"} <= judged
    # the built-in profile is read (the tuning unit's tick ran), observe mode: never written
    assert "profile nodetune-default (observe)" in f["tuning.profile"]["summary"], f["tuning.profile"]


@pytest.mark.root
def test_a_live_run_reads_the_profile_given(tmp_path: Path) -> None:
    """--profile FILE: its name and its one key are judged (the key is read, never written)."""
    profile = tmp_path / "profile.yaml"
    name = f"doctor-{uuid.uuid4().hex[:6]}"
    profile.write_text(f"name: {name}\nsysctl: {{net.core.somaxconn: '>=1'}}\n")
    _code, report, stderr = doctor("--duration", "0.3", "--probes", "none", "--profile", str(profile))
    tp = findings(report)["tuning.profile"]
    assert tp["summary"] == f"profile {name} (observe): 1 of 1 keys as the profile wants", (tp, stderr)
    assert [o["name"] for o in tp["offenders"]] == ["sysctl net.core.somaxconn"]


def doctor_until(marker: str, *args: str) -> tuple[subprocess.Popen[str], list[str]]:
    """The doctor (JSON, --log-level info) started, and its stderr read up to the line holding ``marker``."""
    cmd = [sys.executable, "-m", "agent.cli", "doctor", "--json", "--log-level", "info", *args]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    for line in proc.stderr:  # ends at EOF, when the doctor exits without the marker
        lines.append(line)
        if marker in line:
            return proc, lines
    proc.wait()
    raise AssertionError(f"{marker!r} not logged:\n" + "".join(lines))


@pytest.mark.bpf
def test_connect_failures_of_a_workload_new_in_the_window_are_crit(make_cgroup, netns, header_cache: Path) -> None:
    """The connect probe's row of a workload is made at its first failure: a cgroup and a namespace
    made after the first reading, 40 connects that find no port, must count (from 0)."""
    proc, lines = doctor_until(
        "first reading taken", "--duration", "6", "--probes", "connect", "--cache-dir", str(header_cache)
    )
    try:
        cg = make_cgroup("doctor-ports")
        ns = netns("40000 40001")  # two ports: the 3rd connect to one destination fails
        _holder, result = ns.hold(2, "127.0.0.1:30000", extra=40, cgroup=str(cg.path))
        assert result == "ok 2 EADDRNOTAVAIL=40", result
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    report = json.loads(out)
    jsonschema.validate(report, SCHEMA)
    pf = findings(report)["network.port_failures"]
    assert pf["verdict"] == "CRIT", (pf, "".join(lines) + err)
    mine = next(o for o in pf["offenders"] if o["name"] == cg.rel)
    assert mine["value"] == 40, pf


@pytest.mark.root
def test_a_namespace_that_comes_within_the_window_is_read(netns) -> None:
    """The agent's timer (namespace index, collectors' registers) runs once more at the end of the
    window: a namespace made after the first reading, whose listener overflows, is named."""
    proc, lines = doctor_until("first reading taken", "--duration", "3", "--probes", "none")
    try:
        ns = netns("40000 40999")
        p = subprocess.Popen(
            ["ip", "netns", "exec", ns.name, sys.executable, "-c", OVERFLOWING], stdout=subprocess.PIPE, text=True
        )
        ns.procs.append(p)
        assert p.stdout.readline().strip() == "listening"
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    listen = findings(json.loads(out))["network.listen"]
    assert ns.name in [o["name"] for o in listen["offenders"]], (listen, "".join(lines) + err)


@pytest.mark.root
def test_a_probe_that_fails_to_load_is_skipped_with_its_reason(tmp_path: Path) -> None:
    """An injected failure: the header cache is a file, so no probe can be compiled. The probe's
    section says why, the others are judged, and the exit is a verdict (not 3)."""
    not_a_dir = tmp_path / "cache"
    not_a_dir.write_text("")
    code, report, stderr = doctor("--duration", "0.5", "--cache-dir", str(not_a_dir), "--probes", "runqlat")
    assert report, stderr
    f = findings(report)
    rq = f["cpu.runqueue"]
    assert rq["verdict"] == "SKIP" and rq["summary"].startswith("runqlat: not loadable here: "), rq
    assert "Not a directory" in rq["summary"]
    assert f["locks.contention"]["summary"] == "lockstat: left out (--probes)"
    judged = {i for i, x in f.items() if x["verdict"] != "SKIP"}
    assert {"cpu.utilisation", "cpu.throttling", "network.ports", "network.listen", "tuning.profile"} <= judged
    assert code in (0, 1, 2) and code == report["exit_code"]


@pytest.fixture
def running_agent():
    """The agent's units and HTTP server in this process, without probes (no header merge to wait
    for: tests/conftest.py's agent_process gives a fresh header cache 30 s, which a loaded machine
    can spend on the merge alone)."""
    from agent.config import AgentConfig
    from agent.daemon import Agent

    agent = Agent(AgentConfig(listen_host="127.0.0.1", listen_port=0, probes=()))
    agent.start_server()
    try:
        agent.maintain()
        host, port = agent.server.server_address[:2]
        yield f"http://{host}:{port}"
    finally:
        agent.close()


@pytest.mark.root
def test_from_url_reads_a_running_agent(throttled, running_agent: str) -> None:
    url = running_agent + "/metrics"
    code, report, _ = doctor("--duration", "1.5", "--from", url)
    assert report["source"] == url
    f = findings(report)
    thr = f["cpu.throttling"]
    assert thr["verdict"] == "CRIT" and throttled.rel in [o["name"] for o in thr["offenders"]], thr
    for check, probe in PROBE_CHECKS.items():  # the agent ran without probes: said, not guessed
        assert f[check]["verdict"] == "SKIP" and probe in f[check]["summary"], f[check]
    profile = f["tuning.profile"]  # the agent's tuning unit, through nodetune_tuning_in_sync
    assert profile["verdict"] != "SKIP" and "nodetune-default" in profile["summary"]
    assert code == 2


def test_a_source_that_cannot_be_read_exits_3(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import socket

    with socket.socket() as s:  # a port nothing listens on (bound, not listening: refused)
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}/metrics"
        assert main(["doctor", "--duration", "0.2", "--from", url]) == 3
    out, err = capsys.readouterr()
    assert out == "" and err.startswith(f"nodetune doctor: --from {url}: ")
    for args in (["--from", "ftp://x/metrics"], ["--duration", "0"], ["--profile", str(tmp_path / "none.yaml")]):
        assert main(["doctor", *args]) == 3, args
        out, err = capsys.readouterr()
        assert out == "" and err.startswith("nodetune doctor: "), (args, err)


def test_from_url_that_is_not_an_agent_exits_3() -> None:
    """Valid Prometheus text without nodetune_build_info: some other exporter."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Other(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = b"# TYPE up gauge\nup 1\n"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Other)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/metrics"
        res = subprocess.run(
            [sys.executable, "-m", "agent.cli", "doctor", "--duration", "0.2", "--from", url],
            cwd=REPO, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    finally:
        server.shutdown()
        server.server_close()
    assert res.returncode == 3 and "not a nodetune agent's /metrics" in res.stderr, res.stderr


@pytest.mark.bpf
def test_runqueue_latency_and_lock_waits_name_their_workloads(make_cgroup, header_cache: Path) -> None:
    """More busy tasks than CPUs, all on one CPU, in a test cgroup: its run-queue p99 is above the
    alert's 10 ms, it is named, and its histogram is drawn from the window's waits. Pipe writers in
    another, stalled on the pipe's mutex within the window (tests/contention.py), are named among the
    lock waiters, and their kernel caller among the callers (review 2 and 4: rows and callers new
    in the window)."""
    busy, pipes = make_cgroup("doctor-busy"), make_cgroup("doctor-pipes")
    cpu = sorted(os.sched_getaffinity(0))[0]
    for _ in range(8):  # each waits out seven others' slices (1.5-4 ms each here)
        busy.spawn(BUSY, cpu=cpu)
    proc, lines = doctor_until(
        "first reading taken", "--duration", "3", "--probes", "runqlat,lockstat", "--cache-dir", str(header_cache)
    )
    stall = None
    try:  # within the window: 4 writers asleep 1 s on one pipe's mutex (tests/contention.py), a
        # caller the agent's top-N, chosen before the window, has never seen
        stall = subprocess.Popen(
            [sys.executable, "-m", "tests.contention", "stall", "4"],
            cwd=REPO,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            preexec_fn=partial(enter_cgroup, str(pipes.path)),
        )
        assert stall.stdout.readline().strip() == "stalled 4"
        time.sleep(1.0)  # the stimulus: each waits this long (not a synchronisation)
        stall.stdin.write("\n")
        stall.stdin.flush()
        assert stall.stdout.readline().startswith("released")
        out, stderr = proc.communicate(timeout=120)
    finally:
        for p in (proc, stall):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()
    code, report, stderr = proc.returncode, json.loads(out), "".join(lines) + stderr
    jsonschema.validate(report, SCHEMA)
    f = findings(report)
    locks = f["locks.contention"]
    assert locks["verdict"] != "SKIP", locks
    kinds = {o["kind"] for o in locks["offenders"]}
    assert kinds == {"caller", "workload"}, locks["offenders"]
    # callers ranked over the window, not by a top-N chosen before it: the pipe's own kernel path
    callers = [o["name"] for o in locks["offenders"] if o["kind"] == "caller"]
    assert any("pipe_write (mutex)" in c for c in callers), callers
    assert pipes.rel in [o["name"] for o in locks["offenders"] if o["kind"] == "workload"], locks["offenders"]
    assert locks["histograms"] and all(sum(b["count"] for b in h["buckets"]) > 0 for h in locks["histograms"])
    rq = f["cpu.runqueue"]
    assert rq["verdict"] in ("WARN", "CRIT"), (rq, stderr)
    assert busy.rel in [o["name"] for o in rq["offenders"]], rq["offenders"]
    mine = next(o for o in rq["offenders"] if o["name"] == busy.rel)
    assert mine["value"] >= 0.010
    drawn = {h["title"]: h for h in rq["histograms"]}
    if f"run-queue latency of {busy.rel}" in drawn:  # drawn when among the worst three
        buckets = drawn[f"run-queue latency of {busy.rel}"]["buckets"]
        assert sum(b["count"] for b in buckets) == int(mine["detail"].rsplit(", ", 1)[1].split()[0])
    assert rq["histograms"] and code in (1, 2)
    assert f["network.port_failures"]["summary"] == "connect: left out (--probes)"


@pytest.mark.root
def test_pod_names_come_from_the_api_when_there_is_one(tmp_path: Path) -> None:
    """A throttled pod-shaped cgroup and a local API server that knows the pod: the doctor names it
    (it waits for the first pod list before its first reading)."""
    from tests.fake_apiserver import FakeAPIServer, pod

    paths = HostPaths()
    if paths.cgroup_v1("cpu") is None:
        pytest.skip("no v1 cpu hierarchy")
    uid, cid = "0a1b2c3d-0000-4000-8000-00000000d0c7", "d" * 64
    rel = f"/nodetune-test-doctor-{uuid.uuid4().hex[:8]}/kubepods/burstable/pod{uid}/{cid}"
    roots = [r for r in (paths.cgroup_v1("cpu"), paths.cgroup_v1("cpuacct")) if r is not None]
    cg = SpreadCgroup(roots, rel)
    server = FakeAPIServer().start()
    server.put("pods", pod(uid, "redis-0", "n1", {"redis": cid}, namespace="cache"))
    try:
        (cg.dirs[0] / "cpu.cfs_quota_us").write_text("10000")
        cg.spawn(BUSY)
        kubeconfig = str(server.kubeconfig(tmp_path))
        _code, report, stderr = doctor(
            "--duration", "1.5", "--probes", "none", "--kubeconfig", kubeconfig, "--node-name", "n1"
        )
    finally:
        server.stop()
        cg.remove()
    thr = findings(report)["cpu.throttling"]
    assert thr["verdict"] == "CRIT", (thr, stderr)
    assert "cache/redis-0/redis" in [o["name"] for o in thr["offenders"]], thr


@pytest.mark.bpf
def test_bccs_own_stderr_stays_off_the_users_terminal(header_cache: Path) -> None:
    """BCC's C code prints "bpf: Failed to load program: ..." on fd 2 while a probe tries attach
    strategies the kernel refuses (here fentry: EPERM). The report says which probe could not run;
    at the default log level nothing else reaches stderr. With --log-level info the text is shown."""
    cmd = [sys.executable, "-m", "agent.cli", "doctor", "--json", "--duration", "0.3", "--cache-dir", str(header_cache)]
    quiet = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert json.loads(quiet.stdout)["findings"], quiet.stderr
    assert "bpf:" not in quiet.stderr and "libbpf" not in quiet.stderr, quiet.stderr
    loud = subprocess.run([*cmd, "--log-level", "info"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert "probes loaded" in loud.stderr and "first reading taken" in loud.stderr, loud.stderr

"""Shared fixtures: real cgroups and processes made (and removed) by the tests, a running agent.

BPF tests are marked ``bpf``. They skip when not root or BCC is missing, except under
``NODETUNE_REQUIRE_BPF=1`` (CI), where such a skip is turned into a failure.

Tests marked ``tracing`` need fentry/fexit or kprobes, which the development kernel refuses: they
are deselected here and run inside a stock Debian kernel booted under qemu
(``tests/test_kernel_vm.py``, which sets ``NODETUNE_IN_TEST_VM=1`` there and checks that every
one of them passed). So do tests marked ``modules``, which need loadable kernel modules (the
development kernel has none).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest
from prometheus_client.parser import text_string_to_metric_families

from host.paths import HostPaths

T = TypeVar("T")
REQUIRE_BPF = os.environ.get("NODETUNE_REQUIRE_BPF") == "1"
IN_TEST_VM = os.environ.get("NODETUNE_IN_TEST_VM") == "1"
REPO = Path(__file__).resolve().parent.parent
# Tests that run only inside the stock-kernel guest (tests/test_kernel_vm.py): fentry/fexit and
# kprobes (``tracing``), loadable modules (``modules``).
GUEST_MARKERS = ("tracing", "modules")


def bpf_unavailable_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root"
    try:
        import bcc  # noqa: F401
    except ImportError as e:
        return f"BCC not importable: {e}"
    return None


@pytest.fixture(autouse=True)
def _bpf_gate(request: pytest.FixtureRequest) -> None:
    if request.node.get_closest_marker("bpf"):
        reason = bpf_unavailable_reason()
    elif request.node.get_closest_marker("root"):
        reason = "needs root" if os.geteuid() != 0 else None
    else:
        return
    if reason:
        pytest.skip(reason)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if IN_TEST_VM:
        return
    tracing = [item for item in items if any(item.get_closest_marker(m) for m in GUEST_MARKERS)]
    if tracing:
        config.hook.pytest_deselected(items=tracing)
        items[:] = [item for item in items if item not in tracing]


@pytest.fixture(autouse=True)
def _root_logging_restored() -> Iterator[None]:
    """In-process CLI tests call ``agent.logs.setup()``, which points the root logger at the
    stderr of that moment: pytest's capture for that test, closed once it ends. A later test's
    log line then fails with "--- Logging error ---" and a traceback on stderr. Restored here."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    if REQUIRE_BPF and report.skipped and item.get_closest_marker("bpf"):
        report.outcome = "failed"
        report.longrepr = f"BPF test skipped under NODETUNE_REQUIRE_BPF=1: {report.longrepr}"


# --- cgroups and processes ----------------------------------------------------------------------
class TestCgroup:
    """A cgroup directory made for one test (v2, or a v1 controller); processes spawned into it are
    ended by pid. ``child()`` makes nested ones, removed before their parent."""

    def __init__(self, root: Path, name: str, rel_parent: str = "") -> None:
        self.path = root / name
        self.path.mkdir()
        self.rel = f"{rel_parent}/{name}"
        self.procs: list[subprocess.Popen[bytes]] = []
        self.children: list[TestCgroup] = []

    def child(self, name: str) -> TestCgroup:
        cg = TestCgroup(self.path, name, self.rel)
        self.children.append(cg)
        return cg

    @property
    def id(self) -> int:
        return os.stat(self.path).st_ino

    def spawn(self, argv: list[str], cpu: int | None = None) -> subprocess.Popen[bytes]:
        procs_file = str(self.path / "cgroup.procs")

        def enter() -> None:  # runs in the child between fork and exec
            with open(procs_file, "w") as f:
                f.write(str(os.getpid()))
            if cpu is not None:
                os.sched_setaffinity(0, {cpu})

        proc = subprocess.Popen(argv, preexec_fn=enter, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.procs.append(proc)
        return proc

    def pids(self) -> list[int]:
        return [int(p) for p in (self.path / "cgroup.procs").read_text().split()]

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
        for proc in self.procs:
            proc.wait(timeout=10)
        self.procs.clear()

    def remove(self) -> None:
        for child in self.children:
            child.remove()
        self.children.clear()
        self.stop()
        rmdir_cgroup(self.path)


def rmdir_cgroup(path: Path) -> None:
    """Remove an empty cgroup directory; exiting tasks leave it asynchronously, so retry a while."""
    for _ in range(50):
        try:
            path.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:
            time.sleep(0.1)
    path.rmdir()


class SpreadCgroup:
    """One relative cgroup path made in several hierarchies (v2, v1 cpu, v1 cpuacct ...), with its
    tasks in all of them, as a kubelet with the cgroupfs driver on a hybrid host does.
    ``remove()`` ends its tasks by pid and removes every directory it made, deepest first."""

    def __init__(self, roots: list[Path], rel: str) -> None:
        self.rel = rel
        self.dirs = [root / rel.lstrip("/") for root in roots]
        self.made: list[Path] = []
        for d in self.dirs:
            missing = [p for p in [d, *d.parents] if not p.exists()]
            d.mkdir(parents=True)
            self.made.extend(missing)
        self.procs: list[subprocess.Popen[bytes]] = []

    def spawn(self, argv: list[str]) -> subprocess.Popen[bytes]:
        files = [str(d / "cgroup.procs") for d in self.dirs]

        def enter() -> None:  # runs in the child between fork and exec
            for f in files:
                with open(f, "w") as fh:
                    fh.write(str(os.getpid()))

        proc = subprocess.Popen(argv, preexec_fn=enter)
        self.procs.append(proc)
        return proc

    def remove(self) -> None:
        for proc in self.procs:
            proc.kill()
            proc.wait()
        for d in sorted(self.made, key=lambda p: -len(p.parts)):
            rmdir_cgroup(d)


@pytest.fixture
def cgroup_v2_root() -> Path:
    root = HostPaths().cgroup_v2()
    if root is None:
        pytest.skip("no cgroup v2 hierarchy mounted")
    return root


@pytest.fixture
def make_cgroup(cgroup_v2_root: Path) -> Iterator[callable]:
    made: list[TestCgroup] = []

    def make(label: str, root: Path | None = None) -> TestCgroup:
        cg = TestCgroup(root or cgroup_v2_root, f"nodetune-test-{label}-{uuid.uuid4().hex[:8]}")
        made.append(cg)
        return cg

    yield make
    for cg in made:
        cg.remove()


@pytest.fixture(scope="session")
def header_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tests' own cache of merged kernel headers (never /var/cache/nodetune), shared by the session."""
    return tmp_path_factory.mktemp("cache")


BUSY = ["/bin/sh", "-c", "while :; do :; done"]
SLEEPER = [sys.executable, "-c", "import time\nwhile True: time.sleep(0.004)"]


def run_delay_ns(pids: list[int]) -> int:
    """Sum of /proc/<pid>/schedstat run_delay (2nd field, ns): the kernel's own run-queue wait."""
    total = 0
    for pid in pids:
        for task in Path(f"/proc/{pid}/task").iterdir():
            total += int((task / "schedstat").read_text().split()[1])
    return total


# --- a running agent ----------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listens(pid: int, port: int) -> bool:
    """Process ``pid`` has a TCP socket listening on ``port`` (IPv4, /proc/net/tcp)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    for line in Path(f"/proc/{pid}/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port and fields[9] in inodes:
            return True
    return False


def http_get(url: str, timeout: float = 10) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def parse_metrics(text: str) -> dict[str, list]:
    """family name -> samples (prometheus_client parser)."""
    return {f.name: f.samples for f in text_string_to_metric_families(text)}


class AgentProcess:
    def __init__(self, proc: subprocess.Popen[str], url: str) -> None:
        self.proc = proc
        self.url = url

    def metrics_text(self) -> str:
        status, body = http_get(self.url + "/metrics")
        assert status == 200, body
        return body

    def metrics(self) -> dict[str, list]:
        return parse_metrics(self.metrics_text())


@pytest.fixture
def agent_process(tmp_path: Path, header_cache: Path) -> Iterator[callable]:
    started: list[subprocess.Popen[str]] = []

    def start(*args: str) -> AgentProcess:
        # free_port() only says the port was free a moment ago: another process (a parallel test
        # run, another agent) may bind it first. Such a start is retried on another port.
        for _attempt in range(3):
            agent = attempt(args)
            if agent is not None:
                return agent
        raise AssertionError("agent: every port tried was taken: " + (tmp_path / "agent.log").read_text())

    def attempt(args: tuple[str, ...]) -> AgentProcess | None:
        port = free_port()
        cache = ["--cache-dir", str(header_cache)] if "--cache-dir" not in args else []
        cmd = [sys.executable, "-m", "agent.cli", "run", "--listen", f"127.0.0.1:{port}", *cache, *args]
        with open(tmp_path / "agent.log", "w") as log_file:  # the child keeps its own descriptor
            proc = subprocess.Popen(cmd, cwd=REPO, stderr=log_file, text=True)
        started.append(proc)
        url = f"http://127.0.0.1:{port}"
        # a deadline, not a wait: three BCC compiles take 3-5 s here, and over 30 s on a machine with
        # a load average of 10
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                log = (tmp_path / "agent.log").read_text()
                assert "Address already in use" in log, log
                return None
            try:
                # ready, and the listener is ours (not whoever took the port meanwhile)
                if http_get(url + "/readyz", timeout=1)[0] == 200 and listens(proc.pid, port):
                    return AgentProcess(proc, url)
            except OSError:
                pass
            time.sleep(0.1)
        raise AssertionError("agent not ready in 120 s: " + (tmp_path / "agent.log").read_text())

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture
def netns() -> Iterator[callable]:
    """Network namespaces with their own port range (tests/netns.py), removed after the test."""
    from tests.netns import Netns

    made: list[Netns] = []

    def make(port_range: str, reserved: str = "") -> Netns:
        ns = Netns(port_range, reserved)
        made.append(ns)
        return ns

    yield make
    for ns in made:
        ns.remove()


def wait_until(check: Callable[[], T], timeout: float = 30, what: str = "the condition", every: float = 0.05) -> T:
    """Poll ``check`` until it returns something true (returned), failing after ``timeout`` s with
    ``what``. Tests wait for conditions, never for a fixed time: a loaded machine is slow, not wrong."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        assert time.monotonic() < deadline, f"{what}: not within {timeout} s"
        time.sleep(every)

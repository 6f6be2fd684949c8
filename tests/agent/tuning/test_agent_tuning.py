"""Tuning inside ``nodetune run``: it runs on its own thread, so an apply stuck for 40 s in a host
command (a fake ``modprobe`` first on PATH, as slow as a hung ``systemctl``) delays neither the HTTP
server nor /healthz (nor a fake 40 s ``systemctl`` reached through the host's namespaces, as the
irqbalance item runs it); and with ``--mode enforce`` a ``--listen`` address that cannot be bound is
exit 2 before the host is touched."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from agent.config import AgentConfig
from agent.daemon import Agent
from tests.agent.tuning.hostns import IRQBALANCE, SandboxHost
from tests.agent.tuning.hostns import wait_for as hostns_wait
from tests.agent.tuning.hosttree import make_host, snapshot
from tests.conftest import REPO, free_port, http_get, parse_metrics

SLOW = """#!/bin/sh
echo $$ > {pidfile}
exec sleep 40
"""


def wait_for(condition, what: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_a_40s_host_command_in_an_apply_delays_neither_the_server_nor_health(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    host = make_host(tmp_path / "host")
    fakes = tmp_path / "bin"
    fakes.mkdir()
    pidfile = tmp_path / "slow.pid"
    for command in ("modprobe", "systemctl"):
        (fakes / command).write_text(SLOW.format(pidfile=pidfile))
        (fakes / command).chmod(0o755)
    monkeypatch.setenv("PATH", f"{fakes}:{os.environ['PATH']}")
    profile = tmp_path / "p.yaml"
    profile.write_text("name: slow\nkmod: {load: [ip_vs]}\n")  # absent in the fixture: modprobe runs
    config = AgentConfig(
        listen_host="127.0.0.1",
        listen_port=free_port(),
        host_root=host,
        probes=(),
        collectors=(),
        profile=profile,
        mode="enforce",
        health_timeout_s=1.0,
        maintain_interval_s=0.1,
        cache_dir=tmp_path / "cache",
    )
    url = f"http://127.0.0.1:{config.listen_port}"
    agent = Agent(config)  # the old daemon applied here, before the server existed
    loop = threading.Thread(target=agent.run_forever, kwargs={"tick_s": 0.05}, daemon=True)
    slow_pid = 0
    try:
        agent.start_server()
        agent.start_loading()
        loop.start()
        wait_for(lambda: pidfile.exists() and pidfile.read_text().strip(), "the apply to start the slow command")
        slow_pid = int(pidfile.read_text())
        for _ in range(15):  # 3 s: three health timeouts while the apply is stuck
            assert Path(f"/proc/{slow_pid}").exists()  # still inside the 40 s command
            assert http_get(url + "/healthz", timeout=5)[0] == 200
            time.sleep(0.2)
        status, body = http_get(url + "/metrics", timeout=5)
        assert status == 200
        assert "nodetune_tuning_profile_info" in body  # a scrape does not wait for the tick either
        os.kill(slow_pid, signal.SIGKILL)  # the command fails: the item is reported, tuning runs on
        slow_pid = 0

        def kmod_errors() -> float:
            samples = parse_metrics(http_get(url + "/metrics", timeout=5)[1])["nodetune_tuning_errors"]
            return sum(s.value for s in samples if s.labels.get("item") == "kmod")

        wait_for(lambda: kmod_errors() >= 1, "the failed apply to be counted under kmod")
    finally:
        if slow_pid:
            os.kill(slow_pid, signal.SIGKILL)
        agent.stop_event.set()
        loop.join(5)
        agent.close()


def listening_socket() -> tuple[socket.socket, int]:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(1)
    return s, s.getsockname()[1]


@pytest.mark.parametrize("where", ["in use", "not on this host"])
def test_enforce_with_a_listen_address_it_cannot_bind_exits_2_before_touching_the_host(
    tmp_path: Path, where: str
) -> None:
    host = make_host(tmp_path / "host")
    profile = tmp_path / "p.yaml"
    profile.write_text("name: p\nsysctl: {net.core.somaxconn: '>=8192'}\n")
    before = snapshot(host)
    busy, port = listening_socket()
    # 192.0.2.1 (TEST-NET-1, RFC 5737) is on no interface here: bind(2) says EADDRNOTAVAIL, nothing is sent
    listen = f"127.0.0.1:{port}" if where == "in use" else f"192.0.2.1:{free_port()}"
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "agent.cli", "run", "--listen", listen, "--profile", str(profile), "--mode",
             "enforce", "--host-root", str(host), "--probes", "none", "--collectors", "none", "--cache-dir",
             str(tmp_path / "cache")],
            cwd=REPO, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
    finally:
        busy.close()
    assert proc.returncode == 2, proc.stderr
    assert f"nodetune: --listen {listen}" in proc.stderr and "Traceback" not in proc.stderr
    assert snapshot(host) == before  # nothing applied, no journal


SLOW_SYSTEMCTL = """#!/bin/sh
echo "$*" >>/run/systemctl.log
echo $$ > /run/slow-systemctl.pid
exec sleep 40
"""


@pytest.mark.root
def test_a_40s_systemctl_reached_through_the_hosts_namespaces_delays_neither_the_server_nor_health(
    tmp_path: Path,
) -> None:
    """The issue's named reproduction: a fake 40 s ``systemctl``. It cannot be a fake first on PATH
    (the item runs it with ``nsenter`` in the host PID 1's mount namespace, with a fixed PATH), so
    the host is a pid + mount namespace made by the test, with systemd's marker, the slow
    systemctl in its /usr/local/sbin, its own irqbalance to stop, and its own /var/lib."""
    sandbox = SandboxHost(tmp_path, systemd=True, systemctl=SLOW_SYSTEMCTL, private_var_lib=True)
    agent = None
    loop = None
    try:
        assert sandbox.run(IRQBALANCE).returncode == 0
        hostns_wait(lambda: sandbox.pids("irqbalance"), "the host's irqbalance")
        profile = tmp_path / "p.yaml"
        profile.write_text("name: slow\nirqbalance: {enabled: false}\n")
        config = AgentConfig(
            listen_host="127.0.0.1",
            listen_port=free_port(),
            host_root=sandbox.root,
            probes=(),
            collectors=(),
            profile=profile,
            mode="enforce",
            health_timeout_s=1.0,
            maintain_interval_s=0.1,
            cache_dir=tmp_path / "cache",
        )
        url = f"http://127.0.0.1:{config.listen_port}"
        agent = Agent(config)
        loop = threading.Thread(target=agent.run_forever, kwargs={"tick_s": 0.05}, daemon=True)
        agent.start_server()
        agent.start_loading()
        loop.start()
        pidfile = sandbox.root / "run/slow-systemctl.pid"
        wait_for(lambda: pidfile.exists() and pidfile.read_text().strip(), "the apply to run the slow systemctl")
        assert (sandbox.root / "run/systemctl.log").read_text() == "disable --now irqbalance.service\n"
        for _ in range(15):  # 3 s: three health timeouts while the apply waits for systemctl
            assert sandbox.pids("sleep"), "the slow systemctl ended early"
            assert http_get(url + "/healthz", timeout=5)[0] == 200
            time.sleep(0.2)
        status, body = http_get(url + "/metrics", timeout=5)
        assert status == 200 and "nodetune_tuning_profile_info" in body
    finally:
        sandbox.close()  # ends the slow systemctl (and the apply's nsenter with it)
        if agent is not None:
            agent.stop_event.set()
            if loop is not None:
                loop.join(5)
            agent.close()

"""The DaemonSet's own pod template, run for real from the image ``make image`` built, scraped by a
real Prometheus whose alerts reach a real Alertmanager and a webhook receiver here.

* The pod: ``kubectl kustomize manifests/variants/<v>``'s DaemonSet template and profile ConfigMap,
  as written (mounts, env, securityContext, args), run by ``podman kube play`` with runc, the
  cgroupfs manager and explicit ulimits (DESIGN, environment facts). Substituted: the image
  reference, ``NODE_NAME`` (the downward API has no node here) and, in the TLS variant, the Secret
  volume by a host directory holding the same files: podman 4.3 writes a Secret's values to the
  volume still base64-encoded.
* TLS variant (base + web-config-tls): /metrics refuses a client without a password and a
  certificate from another CA; Prometheus 2.42 (Debian) scrapes it with a client certificate and
  basic auth every second, with the shipped rules sped up 30 times by ``scripts/gen_alerts.py
  --scale 30`` (15 m ``for`` -> 30 s, 5 m windows -> 10 s); Alertmanager (Debian) routes to the
  webhook here. The test fills a network namespace's port range towards one destination, keeps
  connect() failing with EADDRNOTAVAIL there, and throttles a cgroup; the port-saturation,
  allocation-failure and throttling alerts must arrive with the right labels, and every query of
  the dashboard must return data.
* capabilities-only variant: the same pod without ``privileged``; every probe and collector works.

Everything started is stopped and removed (pods, containers, processes, namespaces, cgroups);
the image stays. All traffic is on loopback or in the namespace made here.
"""

from __future__ import annotations

import copy
import json
import os
import resource
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import bcrypt
import pytest
import yaml

from agent import __version__
from host.paths import HostPaths
from tests.agent.test_web_config import client_context, get, make_ca, make_cert
from tests.conftest import BUSY, REPO, SpreadCgroup, free_port, parse_metrics
from tests.netns import Netns, enter_cgroup

IMAGE = f"localhost/nodetune:{__version__}"
PORT = 9662  # the manifest's --listen (hostNetwork)
NODE = socket.gethostname()
PASSWORD = "e2e-" + uuid.uuid4().hex[:8]
PODMAN = ["podman", "--storage-driver", "vfs", "--runtime", "runc", "--cgroup-manager", "cgroupfs"]

pytestmark = [pytest.mark.bpf, pytest.mark.root]


def poll(check: Callable[[], object], seconds: float, what: str | Callable[[], str], step: float = 0.5) -> object:
    """``check()``'s first true result within ``seconds``; else fail saying ``what`` (a callable is
    called then, for state to show at the failure)."""
    deadline = time.monotonic() + seconds
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {seconds} s: {what() if callable(what) else what}")
        time.sleep(step)


# --- the pod ------------------------------------------------------------------------------------
def rendered(variant: str) -> list[dict]:
    out = subprocess.run(
        ["kubectl", "kustomize", str(REPO / "manifests/variants" / variant)], capture_output=True, text=True, check=True
    ).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def pod_documents(variant: str, name: str, secret_dir: Path | None = None) -> list[dict]:
    """The variant's profile ConfigMap and a Pod made of its DaemonSet's template; substitutions as
    in the module docstring, nothing else."""
    objs = rendered(variant)
    (ds,) = [o for o in objs if o["kind"] == "DaemonSet"]
    (profile,) = [o for o in objs if o["kind"] == "ConfigMap" and o["metadata"]["name"] == "nodetune-profile"]
    template = copy.deepcopy(ds["spec"]["template"])
    (container,) = template["spec"]["containers"]
    container["image"] = IMAGE
    (env,) = [e for e in container["env"] if e["name"] == "NODE_NAME"]
    assert env.pop("valueFrom") == {"fieldRef": {"fieldPath": "spec.nodeName"}}
    env["value"] = NODE
    # podman 4.3 maps a containerPort to a host port even with hostNetwork ("PortMappings can only
    # be used with Bridge or slirp4netns networking"); with hostNetwork Kubernetes only records it.
    container.pop("ports")
    for volume in template["spec"]["volumes"]:
        if "secret" in volume:
            assert secret_dir is not None, "a Secret volume needs its files"
            volume.pop("secret")
            volume["hostPath"] = {"path": str(secret_dir), "type": "Directory"}
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, **template["metadata"]},
        "spec": template["spec"],
    }
    return [
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "nodetune-profile"}, "data": profile["data"]},
        pod,
    ]


class Pod:
    """``podman kube play`` of the documents; ``down()`` removes the pod and its containers."""

    def __init__(self, docs: list[dict], tmp: Path) -> None:
        self.name = docs[-1]["metadata"]["name"]
        # kube play keeps each ConfigMap as a named volume, which kube down (4.3) leaves behind
        self.volumes = [d["metadata"]["name"] for d in docs if d["kind"] == "ConfigMap"]
        self.file = tmp / f"{self.name}.yaml"
        self.file.write_text(yaml.safe_dump_all(docs))
        # The VM's hard limits are below podman's defaults (DESIGN): ask for what this process has.
        nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        nproc = resource.getrlimit(resource.RLIMIT_NPROC)[1]
        nofile = 65536 if nofile == resource.RLIM_INFINITY else min(nofile, 65536)
        nproc = 4096 if nproc == resource.RLIM_INFINITY else min(nproc, 4096)
        self.conf = tmp / "containers.conf"
        self.conf.write_text(
            f'[containers]\ndefault_ulimits = ["nofile={nofile}:{nofile}", "nproc={nproc}:{nproc}"]\n'
            '[engine]\nruntime = "runc"\ncgroup_manager = "cgroupfs"\nevents_logger = "file"\n'
        )
        self.env = {**os.environ, "CONTAINERS_CONF": str(self.conf)}

    def play(self) -> None:
        self.podman("kube", "play", str(self.file))

    def podman(self, *args: str, check: bool = True) -> str:
        p = subprocess.run([*PODMAN, *args], env=self.env, capture_output=True, text=True, timeout=300)
        if check and p.returncode != 0:
            raise AssertionError(f"podman {' '.join(args)}: {p.stderr}")
        return p.stdout

    def logs(self) -> str:
        return self.podman("logs", f"{self.name}-nodetune", check=False)

    def down(self) -> None:
        self.podman("kube", "down", str(self.file), check=False)
        self.podman("pod", "rm", "--force", "--ignore", self.name, check=False)
        for volume in self.volumes:
            self.podman("volume", "rm", "--force", volume, check=False)


@pytest.fixture(scope="module")
def image() -> str:
    if subprocess.run([*PODMAN, "image", "exists", IMAGE]).returncode != 0:
        pytest.fail(f"{IMAGE} missing: `make e2e` builds it first (make image)")
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the agent: TIME_WAIT is no owner
        try:
            s.bind(("0.0.0.0", PORT))
        except OSError as e:
            pytest.fail(f"port {PORT} (the manifest's) is taken on this host: {e}")
    return IMAGE


@pytest.fixture
def pod(image: str, tmp_path: Path) -> Iterator[Callable[..., Pod]]:
    started: list[Pod] = []

    def play(variant: str, secret_dir: Path | None = None) -> Pod:
        p = Pod(pod_documents(variant, f"nodetune-e2e-{uuid.uuid4().hex[:8]}", secret_dir), tmp_path)
        started.append(p)  # before play: a pod that failed to start is removed too
        p.play()
        return p

    yield play
    for p in started:
        p.down()


# --- TLS material and the web config (the Secret's files) ---------------------------------------
@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("openssl") is None:
        pytest.fail("openssl missing: make e2e installs it")
    d = tmp_path_factory.mktemp("pki")
    make_ca(d, "ca")
    make_ca(d, "other-ca")
    make_cert(d, "server", "ca", "IP:127.0.0.1", "serverAuth")
    make_cert(d, "prometheus", "ca", "DNS:prometheus", "clientAuth")
    make_cert(d, "stranger", "other-ca", "DNS:prometheus", "clientAuth")
    return d


def secret_files(pki: Path, dest: Path) -> Path:
    """What the Secret nodetune-web-config holds: the example web config with a real password hash,
    and the files it names (tls.crt, tls.key, ca.crt)."""
    dest.mkdir()
    web = yaml.safe_load((REPO / "manifests/components/web-config-tls/web-config.example.yml").read_text())
    web["basic_auth_users"] = {"prometheus": bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(4)).decode()}
    (dest / "web-config.yml").write_text(yaml.safe_dump(web))
    shutil.copy(pki / "server.crt", dest / "tls.crt")
    shutil.copy(pki / "server.key", dest / "tls.key")
    shutil.copy(pki / "ca.crt", dest / "ca.crt")
    return dest


# --- Prometheus, Alertmanager, webhook -----------------------------------------------------------
class Webhook(ThreadingHTTPServer):
    """Alertmanager's webhook receiver: every alert it was sent, newest state last."""

    def __init__(self) -> None:
        self.alerts: list[dict] = []
        self.lock = threading.Lock()
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with hook.lock:
                    hook.alerts.extend(body["alerts"])
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    def firing(self, alertname: str, **labels: str) -> list[dict]:
        with self.lock:
            return [
                a
                for a in self.alerts
                if a["status"] == "firing"
                and a["labels"].get("alertname") == alertname
                and all(a["labels"].get(k) == v for k, v in labels.items())
            ]


class Process:
    def __init__(self, argv: list[str], log: Path) -> None:
        self.log = log
        with open(log, "w") as f:
            self.proc = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def http_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


@pytest.fixture
def tls_agent(pod, pki: Path, tmp_path: Path) -> Pod:
    """The base + web-config-tls pod, ready (its first start merges headers and compiles)."""
    p = pod("web-config-tls", secret_files(pki, tmp_path / "secret"))
    poll(
        lambda: https(pki, None, "/readyz")[0] == 200, 300, lambda: "the agent's /readyz over TLS: " + p.logs()[-3000:]
    )
    return p


@pytest.fixture
def monitoring(tls_agent: Pod, tmp_path: Path, pki: Path) -> Iterator[tuple[str, Webhook]]:
    """Alertmanager -> webhook, and Prometheus scraping the agent at 127.0.0.1:9662 over TLS with the
    shipped rules sped up 30 times. Yields (Prometheus's URL, the webhook)."""
    hook = Webhook()
    procs: list[Process] = []
    try:
        am_port, prom_port = free_port(), free_port()
        am_dir = tmp_path / "alertmanager"
        am_dir.mkdir()
        (am_dir / "alertmanager.yml").write_text(
            yaml.safe_dump(
                {
                    "route": {
                        "receiver": "test",
                        "group_by": ["..."],  # every alert on its own: each label set is seen
                        "group_wait": "1s",
                        "group_interval": "1s",
                        "repeat_interval": "1h",
                    },
                    "receivers": [
                        {"name": "test", "webhook_configs": [{"url": f"http://127.0.0.1:{hook.server_port}/"}]}
                    ],
                }
            )
        )
        procs.append(
            Process(
                [
                    "prometheus-alertmanager",
                    f"--config.file={am_dir / 'alertmanager.yml'}",
                    f"--storage.path={am_dir}",
                    f"--web.listen-address=127.0.0.1:{am_port}",
                    "--cluster.listen-address=",  # no gossip port
                ],
                tmp_path / "alertmanager.log",
            )
        )
        prom_dir = tmp_path / "prometheus"
        prom_dir.mkdir()
        rules = subprocess.run(
            [sys.executable, str(REPO / "scripts/gen_alerts.py"), "--scale", "30"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        (prom_dir / "rules.yml").write_text(rules)
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s", "scrape_timeout": "1s"},
            "rule_files": [str(prom_dir / "rules.yml")],
            "alerting": {"alertmanagers": [{"static_configs": [{"targets": [f"127.0.0.1:{am_port}"]}]}]},
            "scrape_configs": [
                {
                    "job_name": "nodetune",
                    "honor_labels": True,
                    "scheme": "https",
                    "tls_config": {
                        "ca_file": str(pki / "ca.crt"),
                        "cert_file": str(pki / "prometheus.crt"),
                        "key_file": str(pki / "prometheus.key"),
                    },
                    "basic_auth": {"username": "prometheus", "password": PASSWORD},
                    "static_configs": [{"targets": [f"127.0.0.1:{PORT}"], "labels": {"node": NODE}}],
                }
            ],
        }
        (prom_dir / "prometheus.yml").write_text(yaml.safe_dump(config))
        procs.append(
            Process(
                [
                    "prometheus",
                    f"--config.file={prom_dir / 'prometheus.yml'}",
                    f"--storage.tsdb.path={prom_dir / 'data'}",
                    f"--web.listen-address=127.0.0.1:{prom_port}",
                ],
                tmp_path / "prometheus.log",
            )
        )
        url = f"http://127.0.0.1:{prom_port}"

        def scraped() -> bool:
            try:
                result = http_json(url + "/api/v1/query?query=" + urllib.parse.quote('up{job="nodetune"}'))
            except OSError:
                return False
            return any(r["value"][1] == "1" for r in result["data"]["result"])

        poll(
            scraped,
            60,
            lambda: "Prometheus scrapes the agent over TLS: " + (tmp_path / "prometheus.log").read_text()[-2000:],
        )
        yield url, hook
    finally:
        for p in reversed(procs):
            p.stop()
        hook.shutdown()
        hook.server_close()


# --- what the alerts are about -------------------------------------------------------------------
# Holds every port of the namespace's range towards one destination, then keeps trying one more
# connect every 0.2 s (each fails with EADDRNOTAVAIL) until stdin closes.
EXHAUST = """
import socket, sys, threading, time, errno
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("127.0.0.1", 7000)); srv.listen(4096)
accepted = []
threading.Thread(target=lambda: [accepted.append(srv.accept()[0]) for _ in iter(int, 1)], daemon=True).start()
held = []
while True:
    c = socket.socket()
    try:
        c.connect(("127.0.0.1", 7000))
    except OSError as e:
        c.close()
        if e.errno != errno.EADDRNOTAVAIL: raise
        break
    held.append(c)
print("held", len(held), flush=True)
stop = threading.Event()
threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
while not stop.wait(0.2):
    c = socket.socket()
    try:
        c.connect(("127.0.0.1", 7000))
    except OSError:
        pass
    c.close()
"""


@pytest.fixture
def incidents() -> Iterator[tuple[Netns, str, str]]:
    """Seed 000 twice over: a namespace whose 10-port range is used up towards 127.0.0.1:7000 by a
    process of cgroup A that keeps failing to connect, and a busy loop throttled to 10 % of a CPU in
    cgroup B. Yields (the namespace, A's and B's cgroup paths)."""
    paths = HostPaths()
    roots = [r for r in (paths.cgroup_v2(), paths.cgroup_v1("cpu"), paths.cgroup_v1("cpuacct")) if r is not None]
    tag = uuid.uuid4().hex[:8]
    porter = SpreadCgroup(roots, f"/nodetune-e2e-ports-{tag}")
    throttled = SpreadCgroup(roots, f"/nodetune-e2e-thr-{tag}")
    ns = Netns("40000 40009")
    exhaust = None
    try:
        cpu = paths.cgroup_v1("cpu")
        cpu_dir = (cpu or paths.cgroup_v2()) / throttled.rel.lstrip("/")
        if cpu is not None:
            (cpu_dir / "cpu.cfs_quota_us").write_text("10000")  # 10 % of one CPU per 100 ms period
        else:
            (cpu_dir / "cpu.max").write_text("10000 100000")
        throttled.spawn(BUSY)
        files = [str(d) for d in porter.dirs]
        exhaust = subprocess.Popen(
            ["ip", "netns", "exec", ns.name, sys.executable, "-c", EXHAUST],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            preexec_fn=lambda: [enter_cgroup(f) for f in files],
        )
        assert exhaust.stdout.readline().strip() == "held 10"
        yield ns, porter.rel, throttled.rel
    finally:
        if exhaust is not None:
            exhaust.stdin.close()
            exhaust.wait(timeout=10)
        ns.remove()
        throttled.remove()
        porter.remove()


# --- the tests -----------------------------------------------------------------------------------
def https(pki: Path, cert: str | None, path: str = "/metrics", auth: tuple[str, str] | None = None) -> tuple[int, str]:
    return get(f"https://127.0.0.1:{PORT}{path}", client_context(pki, cert), auth)


def dashboard_queries() -> list[dict]:
    out = subprocess.run(
        [sys.executable, str(REPO / "scripts/gen_dashboard.py"), "--queries"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return json.loads(out)


def metrics_ok(body: str) -> None:
    """Every probe up and every unit's scrape succeeded."""
    families = parse_metrics(body)
    up = {s.labels["probe"]: s.value for s in families["nodetune_probe_up"]}
    assert up == {"runqlat": 1, "lockstat": 1, "connect": 1}, up
    failed = [s.labels["collector"] for s in families["nodetune_scrape_collector_success"] if s.value != 1]
    assert not failed, failed


def query(prom: str, expr: str) -> list[dict]:
    return http_json(prom + "/api/v1/query?query=" + urllib.parse.quote(expr))["data"]["result"]


def test_daemonset_pod_over_tls_alerts_reach_the_webhook(
    tls_agent: Pod, pki: Path, monitoring: tuple[str, Webhook], incidents: tuple[Netns, str, str]
) -> None:
    prom, hook = monitoring
    ns, porter, throttled = incidents
    # The DaemonSet does not mount the host's /run/netns, so the agent finds the namespace through
    # its process and labels it as any unnamed one: net:[<inode>].
    netns = f"net:[{os.stat(f'/run/netns/{ns.name}').st_ino}]"

    def seen() -> str:
        with hook.lock:
            alerts = sorted({json.dumps(a["labels"], sort_keys=True) for a in hook.alerts})
        return "\nwebhook: " + "\n".join(alerts) + "\nrule: " + json.dumps(query(prom, "ALERTS"))[:3000]

    # /metrics is protected: no password -> 401; a certificate from another CA -> no TLS session
    assert https(pki, None)[0] == 401
    assert https(pki, "prometheus", auth=("prometheus", "wrong"))[0] == 401
    status, why = https(pki, "stranger", auth=("prometheus", PASSWORD))
    assert status == 0, (status, why[:200])
    status, body = https(pki, "prometheus", auth=("prometheus", PASSWORD))
    assert status == 200
    metrics_ok(body)

    saturated = poll(
        lambda: hook.firing(
            "NodetuneEphemeralPortsSaturated",
            severity="critical",
            netns=netns,
            destination="127.0.0.1:7000",
            node=NODE,
        ),
        240,
        lambda: "critical port saturation alert at the webhook" + seen(),
    )
    assert "127.0.0.1:7000" in saturated[0]["annotations"]["description"]
    failures = poll(
        lambda: hook.firing("NodetunePortAllocationFailures", severity="critical", cgroup=porter, node=NODE),
        240,
        "allocation-failure alert at the webhook: "
        + json.dumps(query(prom, "nodetune_connect_port_allocation_failures_total")),
    )
    assert porter in failures[0]["annotations"]["description"]
    throttling = poll(
        lambda: hook.firing("NodetuneCPUThrottlingHigh", severity="warning", cgroup=throttled, node=NODE),
        240,
        lambda: "throttling alert at the webhook" + seen(),
    )
    assert throttled in throttling[0]["annotations"]["description"]
    # the warning level of saturation fires too (its `for` is longer)
    poll(
        lambda: hook.firing("NodetuneEphemeralPortsSaturated", severity="warning", netns=netns, node=NODE),
        120,
        lambda: "warning port saturation alert at the webhook" + seen(),
    )

    # every dashboard query returns data
    empty = []
    for q in dashboard_queries():
        try:
            poll(lambda q=q: query(prom, q["expr"]), 60, q["panel"])
        except AssertionError:
            empty.append(f"{q['panel']} {q['refId']}: {q['expr']}")
    assert not empty, "\n".join(empty)


def test_capabilities_only_pod_loads_every_probe_and_collector(pod) -> None:
    p = pod("capabilities-only")
    url = f"http://127.0.0.1:{PORT}"

    def ready() -> bool:
        try:
            with urllib.request.urlopen(url + "/readyz", timeout=5) as r:
                return r.status == 200
        except OSError:
            return False

    poll(ready, 300, lambda: "the capabilities-only agent's /readyz: " + p.logs()[-3000:])
    inspect = json.loads(p.podman("inspect", f"{p.name}-nodetune"))[0]
    assert inspect["HostConfig"]["Privileged"] is False
    assert sorted(inspect["EffectiveCaps"]) == ["CAP_SYSLOG", "CAP_SYS_ADMIN", "CAP_SYS_PTRACE"]
    with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
        metrics_ok(r.read().decode())

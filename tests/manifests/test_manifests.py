"""The Kubernetes manifests: ``kubectl kustomize`` renders the base and every variant (one per
component), every rendered object passes ``kubernetes-validate --strict`` for the Kubernetes
release the package's schemas end at, and the objects say what README "Deploy on Kubernetes"
promises (RBAC read-only, the DaemonSet's host access, the capability list, the scrape configs).

Custom resources (ServiceMonitor, PrometheusRule) have no schema in kubernetes-validate: they are
skipped by kind name (CRD_KINDS) and checked field by field here instead.
"""

from __future__ import annotations

import shutil
import subprocess
from functools import cache
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from agent.tuning.profile import parse as parse_profiles
from tests.conftest import REPO
from tests.e2e.capabilities import component_capabilities

MANIFESTS = REPO / "manifests"
VARIANTS = sorted(p.name for p in (MANIFESTS / "variants").iterdir() if (p / "kustomization.yaml").is_file())
COMPONENTS = sorted(p.name for p in (MANIFESTS / "components").iterdir() if p.is_dir())
CRD_KINDS = {"ServiceMonitor", "PrometheusRule"}
K8S_VERSION = kubernetes_validate.utils.latest_version()
KUBECTL = shutil.which("kubectl")
needs_kubectl = pytest.mark.skipif(KUBECTL is None, reason="kubectl missing (the machine image has it)")
pytestmark = needs_kubectl


@cache
def render(path: str = "") -> tuple[dict, ...]:
    out = subprocess.run(
        [KUBECTL or "kubectl", "kustomize", str(MANIFESTS / path)], capture_output=True, text=True, check=True
    ).stdout
    return tuple(d for d in yaml.safe_load_all(out) if d)


def one(objs: tuple[dict, ...], kind: str, name: str = "nodetune") -> dict:
    found = [o for o in objs if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} objects"
    return found[0]


def container(objs: tuple[dict, ...]) -> dict:
    (c,) = one(objs, "DaemonSet")["spec"]["template"]["spec"]["containers"]
    return c


def test_every_component_has_a_variant() -> None:
    assert COMPONENTS == VARIANTS == ["capabilities-only", "prometheus-operator", "web-config-tls"]


@pytest.mark.parametrize("variant", ["", *(f"variants/{v}" for v in VARIANTS)])
def test_renders_and_validates_strictly(variant: str) -> None:
    objs = render(variant)
    kinds = {o["kind"] for o in objs}
    assert {"Namespace", "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "ConfigMap", "DaemonSet"} <= kinds
    assert {"Service", "FlowSchema", "PriorityLevelConfiguration"} <= kinds
    checked = 0
    for obj in objs:
        if obj["kind"] in CRD_KINDS:
            continue  # no schema in kubernetes-validate (custom resources): see the module docstring
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        checked += 1
    assert checked >= 11


def test_strict_validation_catches_a_misspelt_field() -> None:
    """The check above can fail: a field the schema does not know is refused under --strict."""
    ds = yaml.safe_load(yaml.safe_dump(one(render(), "DaemonSet")))
    ds["spec"]["template"]["spec"]["containers"][0]["securityContext"]["readOnlyRootFileSystem"] = True
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(ds, K8S_VERSION, strict=True)


def test_namespace_admits_privileged_pods() -> None:
    ns = one(render(), "Namespace")
    assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "privileged"
    assert all(o["metadata"].get("namespace", "nodetune") == "nodetune" for o in render())


def test_rbac_is_read_only_pods_and_nodes() -> None:
    objs = render()
    role = one(objs, "ClusterRole")
    granted = {(res, verb) for rule in role["rules"] for res in rule["resources"] for verb in rule["verbs"]}
    assert granted == {(r, v) for r in ("pods", "nodes") for v in ("get", "list", "watch")}
    assert all(rule["apiGroups"] == [""] and "resourceNames" not in rule for rule in role["rules"])
    binding = one(objs, "ClusterRoleBinding")
    assert binding["roleRef"]["name"] == "nodetune"
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "nodetune", "namespace": "nodetune"}]


def test_profile_configmap_is_valid_and_observed() -> None:
    cm = one(render(), "ConfigMap", "nodetune-profile")
    profiles = parse_profiles(cm["data"]["profile.yaml"])
    assert profiles and profiles[0].sysctl
    args = container(render())["args"]
    assert "--profile=/etc/nodetune/profile.yaml" in args and "--mode=observe" in args


def test_rules_and_dashboard_configmaps() -> None:
    objs = render()
    rules = one(objs, "ConfigMap", "nodetune-rules")
    assert (MANIFESTS / "base/alerts/nodetune.rules.yml").read_text() == rules["data"]["nodetune.rules.yml"]
    dashboard = one(objs, "ConfigMap", "nodetune-dashboard")
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert "nodetune.json" in dashboard["data"]


def test_daemonset_runs_everywhere_with_host_access() -> None:
    ds = one(render(), "DaemonSet")
    spec = ds["spec"]["template"]["spec"]
    assert spec["tolerations"] == [{"operator": "Exists"}]
    assert spec["priorityClassName"] == "system-node-critical"
    assert spec["hostNetwork"] is True and spec["hostPID"] is True
    assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert spec["serviceAccountName"] == "nodetune"
    rolling = ds["spec"]["updateStrategy"]
    assert rolling["type"] == "RollingUpdate" and rolling["rollingUpdate"]["maxUnavailable"] == "10%"
    assert rolling["rollingUpdate"]["maxSurge"] == 0  # hostNetwork: the port is the old pod's until it stops
    c = container(render())
    sc = c["securityContext"]
    assert sc["privileged"] is True and sc["readOnlyRootFilesystem"] is True
    assert c["env"] == [{"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}}]
    assert "--host-root=/host" in c["args"]
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    res = c["resources"]
    assert res["limits"]["memory"] == res["requests"]["memory"] and "cpu" in res["requests"]


def test_host_mounts_read_only_except_journal_and_debugfs() -> None:
    spec = one(render(), "DaemonSet")["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["mountPath"]: m for m in container(render())["volumeMounts"]}
    host = {
        path: volumes[m["name"]]["hostPath"]["path"] for path, m in mounts.items() if "hostPath" in volumes[m["name"]]
    }
    assert host == {
        "/host/proc": "/proc",
        "/host/sys": "/sys",
        "/host/lib/modules": "/lib/modules",
        "/host/usr/src": "/usr/src",
        "/sys/kernel/debug": "/sys/kernel/debug",
        "/host/var/lib/nodetune": "/var/lib/nodetune",
    }
    for path in ("/host/proc", "/host/sys", "/host/lib/modules", "/host/usr/src"):
        assert mounts[path]["readOnly"] is True and mounts[path]["mountPropagation"] == "HostToContainer"
    writable = {p for p, m in mounts.items() if not m.get("readOnly")}
    assert writable == {"/sys/kernel/debug", "/host/var/lib/nodetune", "/tmp"}
    assert volumes[mounts["/tmp"]["name"]]["emptyDir"]["medium"] == "Memory"
    # every mount is explained in the manifest, one comment per volumeMount
    text = (MANIFESTS / "base/daemonset.yaml").read_text()
    block = text[text.index("volumeMounts:") : text.index("volumes:")]
    for name in (m["name"] for m in mounts.values()):
        before = block[: block.index(f"- name: {name}\n")].rstrip().splitlines()[-1].strip()
        assert before.startswith("#"), f"volumeMount {name} has no comment saying why"


def test_capabilities_only_drops_privileged() -> None:
    c = container(render("variants/capabilities-only"))
    sc = c["securityContext"]
    assert sc["privileged"] is False and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert sc["capabilities"]["add"] == component_capabilities() == ["SYS_ADMIN", "SYSLOG", "SYS_PTRACE"]
    # the rest of the pod is the base's
    assert c["volumeMounts"] == container(render())["volumeMounts"]


def test_prometheus_operator_objects() -> None:
    objs = render("variants/prometheus-operator")
    sm = one(objs, "ServiceMonitor")
    svc = one(objs, "Service")
    assert svc["spec"]["clusterIP"] == "None"
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    (endpoint,) = sm["spec"]["endpoints"]
    assert endpoint["port"] == svc["spec"]["ports"][0]["name"] == container(objs)["ports"][0]["name"]
    assert endpoint["honorLabels"] is True
    assert {"sourceLabels": ["__meta_kubernetes_pod_node_name"], "targetLabel": "node", "action": "replace"} in (
        endpoint["relabelings"]
    )
    assert svc["metadata"]["labels"][sm["spec"]["jobLabel"]] == "nodetune"  # job="nodetune"
    rule = one(objs, "PrometheusRule")
    plain = yaml.safe_load((MANIFESTS / "base/alerts/nodetune.rules.yml").read_text())
    assert rule["spec"]["groups"] == plain["groups"]


def test_web_config_tls_component() -> None:
    c = container(render("variants/web-config-tls"))
    assert c["args"][-1] == "--web-config-file=/etc/nodetune-web/web-config.yml"
    assert c["args"][:-1] == container(render())["args"]
    assert c["livenessProbe"]["httpGet"]["scheme"] == c["readinessProbe"]["httpGet"]["scheme"] == "HTTPS"
    spec = one(render("variants/web-config-tls"), "DaemonSet")["spec"]["template"]["spec"]
    (vol,) = [v for v in spec["volumes"] if v["name"] == "web-config"]
    assert vol["secret"]["secretName"] == "nodetune-web-config"
    example = yaml.safe_load((MANIFESTS / "components/web-config-tls/web-config.example.yml").read_text())
    assert example["tls_server_config"]["client_auth_type"] == "VerifyClientCertIfGiven"
    assert all(
        p.startswith("/etc/nodetune-web/") for k, p in example["tls_server_config"].items() if k.endswith("_file")
    )


def test_flow_control() -> None:
    objs = render()
    fs, plc = one(objs, "FlowSchema"), one(objs, "PriorityLevelConfiguration")
    assert fs["spec"]["priorityLevelConfiguration"]["name"] == plc["metadata"]["name"]
    (rule,) = fs["spec"]["rules"]
    assert rule["subjects"] == [
        {"kind": "ServiceAccount", "serviceAccount": {"name": "nodetune", "namespace": "nodetune"}}
    ]
    assert plc["spec"]["limited"]["lendablePercent"] == 0


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool missing: make test-deps installs it")
def test_plain_scrape_config(tmp_path: Path) -> None:
    text = (MANIFESTS / "prometheus/scrape-config.yml").read_text()
    (job,) = yaml.safe_load(text)["scrape_configs"]
    # Debian's Prometheus is built without Kubernetes discovery ("field kubernetes_sd_configs not
    # found"): promtool checks the rest of the job (relabelling included) with a static target.
    checked = {**job, "static_configs": [{"targets": ["127.0.0.1:9662"]}]}
    del checked["kubernetes_sd_configs"]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump({"scrape_configs": [checked]}))
    subprocess.run(["promtool", "check", "config", str(tmp_path / "prometheus.yml")], check=True, capture_output=True)
    assert job["job_name"] == "nodetune" and job["honor_labels"] is True
    assert job["kubernetes_sd_configs"] == [{"role": "pod", "namespaces": {"names": ["nodetune"]}}]
    assert {"source_labels": ["__meta_kubernetes_pod_node_name"], "target_label": "node"} in job["relabel_configs"]

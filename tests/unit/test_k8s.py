"""deploy/k8s proved offline: no cluster exists on these machines, so the manifests are
built by kustomize, validated against Kubernetes' own schemas (kubernetes-validate), and
their wiring (selectors, ports, probes, secrets, alert rules) is checked object by object.
(`kubectl create --dry-run=client` is no help offline: it asks a server for the API's
resource list before anything else and fails without one.)
The probes are also asked of a real served Bento in tests/integration/test_service.py."""

from __future__ import annotations

import copy
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from deploy.k8s import render

from ..conftest import ROOT, system_tool

K8S = ROOT / "deploy" / "k8s"
OVERLAYS = ("dev", "production")
KUBERNETES_VERSION = "1.32.0"  # the kubectl client on the machine image
OPERATOR_KINDS = {"ServiceMonitor", "PrometheusRule"}  # Prometheus Operator CRDs


def build(overlay: str) -> list[dict[str, Any]]:
    done = subprocess.run(
        [system_tool("kubectl"), "kustomize", str(K8S / "overlays" / overlay)],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    return [obj for obj in yaml.safe_load_all(done.stdout) if obj]


def by_kind(objects: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    kinds: dict[str, dict[str, Any]] = {}
    for obj in objects:
        assert obj["kind"] not in kinds, f"two {obj['kind']} objects"
        kinds[obj["kind"]] = obj
    return kinds


def matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def test_generated_manifests_equal_monitoring_sources() -> None:
    for path, text in render.rendered().items():
        assert path.read_text() == text, f"{path.name} is stale: run make k8s-manifests"
    rule = render.prometheus_rule()
    assert (
        rule["spec"]["groups"]
        == yaml.safe_load((ROOT / "monitoring/alerts.yml").read_text())["groups"]
    )


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_builds_and_passes_schema_validation(overlay: str) -> None:
    objects = build(overlay)
    kinds = {obj["kind"] for obj in objects}
    assert {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget",
            "ConfigMap", "Namespace", *OPERATOR_KINDS} <= kinds  # fmt: skip
    for obj in objects:
        if obj["kind"] in OPERATOR_KINDS:
            continue  # not in Kubernetes' schemas: checked for content below
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)


def test_schema_validation_catches_mistakes() -> None:
    """The validator is not a rubber stamp: a string port and an unknown field fail."""
    deployment = by_kind(build("dev"))["Deployment"]
    bad_port = copy.deepcopy(deployment)
    bad_port["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "http"
    typo = copy.deepcopy(deployment)
    typo["spec"]["template"]["spec"]["containers"][0]["livenesProbe"] = {}
    for broken in (bad_port, typo):
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_objects_are_wired_together(overlay: str) -> None:
    kinds = by_kind(build(overlay))
    deployment, service = kinds["Deployment"], kinds["Service"]
    pod = deployment["spec"]["template"]
    container = pod["spec"]["containers"][0]
    labels = pod["metadata"]["labels"]
    assert matches(deployment["spec"]["selector"]["matchLabels"], labels)
    assert matches(service["spec"]["selector"], labels)
    assert matches(kinds["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"], labels)
    assert (
        kinds["HorizontalPodAutoscaler"]["spec"]["scaleTargetRef"]["name"]
        == deployment["metadata"]["name"]
    )
    monitor = kinds["ServiceMonitor"]["spec"]
    assert matches(monitor["selector"]["matchLabels"], service["metadata"]["labels"])

    # One port, named http, everywhere it is referred to.
    (port,) = container["ports"]
    assert port == {"name": "http", "containerPort": 3000, "protocol": "TCP"}
    assert service["spec"]["ports"][0]["targetPort"] == "http"
    assert monitor["endpoints"][0]["port"] == "http"
    assert monitor["endpoints"][0]["path"] == "/metrics"
    for probe, path in (("startupProbe", "/readyz"), ("readinessProbe", "/readyz"),
                        ("livenessProbe", "/livez")):  # fmt: skip
        assert container[probe]["httpGet"] == {"path": path, "port": "http"}

    env = {e["name"]: e for e in container["env"]}
    assert env["BENTOML_HOST"]["value"] == "0.0.0.0"  # a pod must listen beyond loopback
    key = env["FRAUD_API_KEY"]["valueFrom"]["secretKeyRef"]
    if overlay == "dev":  # production expects the Secret made outside git
        secret = kinds["Secret"]
        assert secret["metadata"]["name"] == key["name"] and key["key"] in secret["data"]
    else:
        assert "Secret" not in kinds
        assert ":" in container["image"] and not container["image"].endswith(":latest")
    # The alerts select job="fraud-scoring": the Operator names the job after the Service.
    assert service["metadata"]["name"] == "fraud-scoring"
    namespaces = {obj["metadata"].get("namespace") for k, obj in kinds.items() if k != "Namespace"}
    assert namespaces == {kinds["Namespace"]["metadata"]["name"]}


def test_prometheus_rule_passes_promtool(tmp_path: Path) -> None:
    rules = tmp_path / "rules.yml"
    rules.write_text(yaml.safe_dump(by_kind(build("production"))["PrometheusRule"]["spec"]))
    done = subprocess.run(
        [system_tool("promtool"), "check", "rules", str(rules)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout + done.stderr

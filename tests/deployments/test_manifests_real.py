"""The manifests on a REAL API server (tests/plugins/kube.py, v1.24.0-alpha.1).

Every overlay (dev, staging, production, the in-cluster worker, monitoring) is applied
with server-side apply, and a second apply changes nothing. RBAC is proven with the
tokens of the ServiceAccounts the manifests create: the worker deploys and rolls back
with its own token (writing the namespace's registry pull secret) and is refused (403)
what its Role does not grant, other Secrets included; Prometheus's
discovery account reads pods and nodes and nothing more.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client, dynamic
from kubernetes.client.exceptions import ApiException

from blocks.config import PipelineConfig
from blocks.kubernetes_target import KubernetesTarget
from blocks.registry import OciRegistry
from core.records import ImageRef
from tasks.deploy.kubernetes import KubernetesDeployer
from tasks.deploy.manifests import kustomize, render_overlay
from tasks.deploy.pull_secret import PULL_NAME
from tests.plugins.kube import KubeCluster

DEPLOYMENTS = Path(__file__).resolve().parents[2] / "deployments"
MANAGER = "elice-tests"
ENV_NAMESPACES = ("elice-devops-dev", "elice-devops-stg", "elice-devops-prod")


def apply_all(kube: KubeCluster, objects: list[dict[str, Any]]) -> dict[tuple[str, ...], Any]:
    """Server-side apply `objects` (Namespaces first); each object's answer by key."""
    dyn = dynamic.DynamicClient(kube.admin)
    answers = {}
    for obj in sorted(objects, key=lambda o: o["kind"] != "Namespace"):
        resource = dyn.resources.get(api_version=obj["apiVersion"], kind=obj["kind"])
        meta = obj["metadata"]
        answers[_key(obj)] = dyn.server_side_apply(
            resource,
            body=obj,
            name=meta["name"],
            namespace=meta.get("namespace"),
            field_manager=MANAGER,
        )
    return answers


def _key(obj: dict[str, Any]) -> tuple[str, ...]:
    meta = obj["metadata"]
    return (obj["kind"], meta.get("namespace") or "", meta["name"])


def _version(answer: Any) -> tuple[Any, Any]:
    """The generation and when our manager last wrote: a no-op apply changes neither
    (controllers' status writes change the resourceVersion, not these)."""
    meta = answer.metadata
    times = [m.time for m in meta.managedFields or [] if m.manager == MANAGER]
    return meta.generation, times


def _rendered(name: str) -> list[dict[str, Any]]:
    """The overlay's objects, moved to a namespace of its own (`ovl-<name>`): the
    environments' namespaces belong to the deployer's tests on the same plane, and the
    monitoring overlays are alternatives for one namespace (their PVCs differ in size)."""
    if name == "worker":  # its Roles live in the environments' namespaces
        return _env_namespaces() + kustomize(DEPLOYMENTS / name)
    objects = render_overlay(name) if "/" not in name else kustomize(DEPLOYMENTS / name)
    old = next(o["metadata"]["name"] for o in objects if o["kind"] == "Namespace")
    new = "ovl-" + name.replace("/overlays/", "-")
    for obj in objects:
        if obj["kind"] == "Namespace":
            obj["metadata"]["name"] = new
        _move(obj, old, new)
    return objects


def _move(value: Any, old: str, new: str) -> None:
    """Every `namespace: old` in `value` (metadata, binding subjects) becomes `new`."""
    if isinstance(value, dict):
        for key, item in value.items():
            if key == "namespace" and item == old:
                value[key] = new
            else:
                _move(item, old, new)
    elif isinstance(value, list):
        for item in value:
            _move(item, old, new)


@pytest.mark.parametrize(
    "name",
    [
        "dev",
        "staging",
        "production",
        "worker",
        "monitoring/overlays/dev",
        "monitoring/overlays/staging",
        "monitoring/overlays/production",
    ],
)
def test_an_overlay_applies_and_a_second_apply_changes_nothing(
    kube: KubeCluster, name: str
) -> None:
    objects = _rendered(name)
    first = apply_all(kube, objects)
    assert len(first) == len(objects)
    time.sleep(1)  # let the controllers write their status (not ours to compare)
    dyn = dynamic.DynamicClient(kube.admin)
    changed = []
    for obj in objects:
        resource = dyn.resources.get(api_version=obj["apiVersion"], kind=obj["kind"])
        meta = obj["metadata"]
        before = resource.get(name=meta["name"], namespace=meta.get("namespace"))
        again = apply_all(kube, [obj])[_key(obj)]
        if _version(again) != _version(before):
            changed.append(_key(obj))
    assert changed == []


# --------------------------------------------------------------------------- RBAC


def token_for(kube: KubeCluster, namespace: str, account: str) -> str:
    """A token of the ServiceAccount (TokenRequest, as a projected volume gets one)."""
    request = {"spec": {"expirationSeconds": 3600}}
    answer = client.CoreV1Api(kube.admin).create_namespaced_service_account_token(
        account, namespace, request
    )
    return str(answer.status.token)


def api_as(kube: KubeCluster, token: str, tmp_path: Path) -> Any:
    from kubernetes import config  # noqa: PLC0415

    path = kube.token_kubeconfig(token, tmp_path / f"kubeconfig-{len(token)}-{time.time()}")
    return config.new_client_from_config(str(path))  # type: ignore[no-untyped-call]


def refused(call: Callable[..., Any], *args: Any, **kwargs: Any) -> int:
    try:
        call(*args, **kwargs)
    except ApiException as exc:
        return int(exc.status)
    return 200


def _env_namespaces() -> list[dict[str, Any]]:
    """The environments' namespaces (the overlays make them; the deployer applies them)."""
    return [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}}
        for namespace in ENV_NAMESPACES
    ]


@pytest.fixture(scope="module")
def worker_rbac(kube: KubeCluster) -> None:
    """The environments' namespaces and the worker's bundle."""
    apply_all(kube, _env_namespaces() + kustomize(DEPLOYMENTS / "worker"))


def _image(service: str, n: int) -> ImageRef:
    return ImageRef(
        service=service,
        repository=f"registry.example/elice/{service}",
        digest="sha256:" + f"{n:x}" * 64,
        tag=f"v{n}",
        version=f"1.{n}.0",
        commit=f"{n:x}" * 40,
    )


def test_the_worker_deploys_and_rolls_back_with_its_own_token(
    kube: KubeCluster, worker_rbac: None, config: PipelineConfig, tmp_path: Path
) -> None:
    token = token_for(kube, "elice-devops-ci", "elice-worker")
    kubeconfig = kube.token_kubeconfig(token, tmp_path / "worker")
    target = KubernetesTarget.from_kubeconfig(kubeconfig).model_copy(
        update={"poll_interval_s": 0.2, "retry_backoff_s": 0.1}
    )
    login = OciRegistry(address="registry.example", username="puller", password="pw-" + "w" * 20)
    deployer = KubernetesDeployer(target, registries=[login])
    env, service = config.environment("dev"), config.service("api-gateway")
    with contextlib.suppress(ApiException):  # the worker creates it, with `patch` alone
        client.CoreV1Api(kube.admin).delete_namespaced_secret(PULL_NAME, env.namespace)
    first = deployer.deploy(env, service, _image("api-gateway", 1), deadline_s=60)
    deployer.deploy(env, service, _image("api-gateway", 2), deadline_s=60)
    deployer.restore(env, service, first)  # the rollback
    live = deployer.live(env, service)
    assert live is not None
    assert live.image.digest == _image("api-gateway", 1).digest
    secret = client.CoreV1Api(kube.admin).read_namespaced_secret(PULL_NAME, env.namespace)
    assert secret.type == "kubernetes.io/dockerconfigjson"  # written with the worker's token


def test_the_worker_is_refused_what_its_role_does_not_grant(
    kube: KubeCluster, worker_rbac: None, tmp_path: Path
) -> None:
    api = api_as(kube, token_for(kube, "elice-devops-ci", "elice-worker"), tmp_path)
    core, rbac, apps = (
        client.CoreV1Api(api),
        client.RbacAuthorizationV1Api(api),
        client.AppsV1Api(api),
    )
    assert refused(core.list_namespaced_pod, "elice-devops-stg") == 200  # granted
    assert refused(core.list_namespaced_secret, "elice-devops-dev") == 403
    assert refused(core.read_namespaced_secret, "anything", "elice-devops-prod") == 403
    assert refused(core.list_namespaced_secret, "kube-system") == 403
    other = {"metadata": {"name": "other"}, "stringData": {"x": "y"}}
    assert refused(core.create_namespaced_secret, "elice-devops-dev", other) == 403
    assert refused(core.patch_namespaced_secret, "other", "elice-devops-dev", other) == 403
    assert refused(core.read_namespaced_secret, PULL_NAME, "elice-devops-ci") == 403
    assert refused(core.delete_namespaced_secret, PULL_NAME, "elice-devops-dev") == 403
    role = {
        "metadata": {"name": "more"},
        "rules": [{"apiGroups": ["*"], "resources": ["*"], "verbs": ["*"]}],
    }
    assert refused(rbac.create_namespaced_role, "elice-devops-dev", role) == 403
    binding = {
        "metadata": {"name": "more"},
        "roleRef": {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": "ClusterRole",
            "name": "admin",
        },
        "subjects": [
            {"kind": "ServiceAccount", "name": "elice-worker", "namespace": "elice-devops-ci"}
        ],
    }
    assert refused(rbac.create_namespaced_role_binding, "elice-devops-dev", binding) == 403
    assert refused(core.patch_namespace, "default", {"metadata": {"labels": {"x": "y"}}}) == 403
    assert (
        refused(core.patch_namespace, "elice-devops-ci", {"metadata": {"labels": {"x": "y"}}})
        == 403
    )
    assert refused(apps.list_namespaced_deployment, "elice-devops-ci") == 403
    assert refused(apps.list_namespaced_deployment, "kube-system") == 403
    assert refused(core.delete_namespace, "elice-devops-dev") == 403


def test_prometheus_discovers_and_reads_nothing_else(kube: KubeCluster, tmp_path: Path) -> None:
    apply_all(kube, kustomize(DEPLOYMENTS / "monitoring/overlays/dev"))
    api = api_as(kube, token_for(kube, "monitoring", "prometheus"), tmp_path)
    core = client.CoreV1Api(api)
    assert refused(core.list_pod_for_all_namespaces) == 200
    assert refused(core.list_node) == 200
    assert refused(core.list_service_for_all_namespaces) == 200
    assert refused(core.list_endpoints_for_all_namespaces) == 200
    assert refused(core.list_secret_for_all_namespaces) == 403
    assert refused(core.list_namespaced_config_map, "monitoring") == 403
    assert refused(core.delete_namespaced_pod, "x", "monitoring") == 403
    assert refused(client.AppsV1Api(api).list_deployment_for_all_namespaces) == 403

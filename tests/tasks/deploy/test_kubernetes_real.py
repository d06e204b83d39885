"""The kubernetes deploy target against a REAL control plane (tests/plugins/kube.py).

kube-apiserver, kube-controller-manager and kube-scheduler v1.24.0-alpha.1 on etcd,
with a stand-in kubelet: the real deployment, replicaset, HPA and garbage-collector
controllers act on what the deployer applies, and RBAC and server-side apply are the
server's own. No container runs, so traffic to pods (health checks through the service
proxy) stays with the simulator's tests (test_kubernetes.py).

Each test deploys its own service and environment pairs, so the session's one plane
needs no cleanup between tests; images are unique per test (the kubelet's `broken`
marks are by digest).
"""

from __future__ import annotations

import base64
import itertools
import json
import logging
import re
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from blocks.config import PipelineConfig
from blocks.kubernetes_target import KubernetesTarget
from blocks.registry import OciRegistry
from core.errors import ConfigError, DeployError, KubernetesApiError
from core.records import ImageRef, utcnow
from tasks.deploy.kubernetes import FIELD_MANAGER, KubernetesDeployer, drift
from tasks.deploy.pull_secret import EXPIRES_AT, PULL_NAME, WRITTEN_AT
from tests.plugins.kube import NODE, Authority, KubeCluster

DEADLINE_S = 60.0
_SERIAL = itertools.count(1)


def target_for(kubeconfig: Path, **overrides: Any) -> KubernetesTarget:
    settings: dict[str, Any] = {
        "poll_interval_s": 0.2,
        "retry_backoff_s": 0.1,
        "retry_backoff_max_s": 1.0,
        **overrides,
    }
    return KubernetesTarget.from_kubeconfig(kubeconfig).model_copy(update=settings)


def deployer_for(kube: KubeCluster, **overrides: Any) -> KubernetesDeployer:
    return KubernetesDeployer(target_for(kube.kubeconfig, **overrides))


def image(service: str) -> ImageRef:
    """A new digest each call (the kubelet marks images broken by digest)."""
    n = next(_SERIAL) + int(time.time()) % 100000 * 1000
    return ImageRef(
        service=service,
        repository=f"registry.example/elice/{service}",
        digest="sha256:" + f"{n:064x}",
        tag=f"v{n}",
        version=f"1.{n}.0",
        commit=f"{n:040x}",
    )


def apps(kube: KubeCluster) -> Any:
    return client.AppsV1Api(kube.admin)


def core(kube: KubeCluster) -> Any:
    return client.CoreV1Api(kube.admin)


def pod_images(kube: KubeCluster, namespace: str, service: str) -> list[str]:
    """Images of the service's pods that are not terminating."""
    pods = core(kube).list_namespaced_pod(
        namespace, label_selector=f"app.kubernetes.io/name={service}"
    )
    return sorted(
        p.spec.containers[0].image for p in pods.items if p.metadata.deletion_timestamp is None
    )


def bind_role(rbac: client.RbacAuthorizationV1Api, namespace: str, role: str, user: str) -> None:
    """`role` of `namespace` bound to `user` (a client certificate's name), the binding
    named after the user."""
    binding = {
        "metadata": {"name": user},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": role},
        "subjects": [{"kind": "User", "name": user}],
    }
    rbac.create_namespaced_role_binding(namespace, binding)


def exists(read: Any, *args: str) -> bool:
    try:
        read(*args)
    except ApiException as exc:
        if exc.status == 404:
            return False
        raise
    return True


# --------------------------------------------------------------------------- releases


def test_the_control_plane_is_real(kube: KubeCluster) -> None:
    """The real API server's version and the stand-in node it schedules on. How long the
    plane took to start is reported by the fixture (`kube.start_s`), not asserted: a timing
    is a benchmark's to judge, and a loaded machine would fail it."""
    version = client.VersionApi(kube.admin).get_code()
    assert (version.major, version.minor) == ("1", "24+")
    assert version.git_version.startswith("v1.24.0-alpha.1")
    node = core(kube).read_node(NODE)
    assert node.status.allocatable["cpu"] == "64"


def test_a_first_release_returns_once_the_hpa_minimum_is_available(
    kube: KubeCluster, config: PipelineConfig
) -> None:
    env, service = config.environment("staging"), config.service("auth")
    release = image("auth")

    deployed = deployer_for(kube).deploy(env, service, release, deadline_s=DEADLINE_S)

    assert deployed.image == release
    live = apps(kube).read_namespaced_deployment("auth", env.namespace)
    # the manifests set no replicas: the real HPA controller raised them to its minimum
    assert live.spec.replicas == 2
    assert live.status.available_replicas == live.status.updated_replicas == 2
    assert pod_images(kube, env.namespace, "auth") == [release.reference] * 2
    pods = core(kube).list_namespaced_pod(
        env.namespace, label_selector="app.kubernetes.io/name=auth"
    )
    assert {p.spec.node_name for p in pods.items} == {NODE}  # bound by the real scheduler
    managers = {(m.manager, m.operation) for m in live.metadata.managed_fields}
    assert (FIELD_MANAGER, "Apply") in managers
    for read in ("read_namespaced_service", "read_namespaced_config_map"):
        assert exists(getattr(core(kube), read), "auth", env.namespace)
    assert exists(
        client.AutoscalingV2Api(kube.admin).read_namespaced_horizontal_pod_autoscaler,
        "auth",
        env.namespace,
    )


def test_a_rolling_release_replaces_every_pod(kube: KubeCluster, config: PipelineConfig) -> None:
    env, service = config.environment("production"), config.service("course")
    deployer = deployer_for(kube)
    first, second = image("course"), image("course")
    deployer.deploy(env, service, first, deadline_s=DEADLINE_S)
    assert pod_images(kube, env.namespace, "course") == [first.reference] * 3

    deployer.deploy(env, service, second, deadline_s=DEADLINE_S)

    assert pod_images(kube, env.namespace, "course") == [second.reference] * 3
    live = deployer.live(env, service)
    assert live is not None
    assert live.image == second
    sets = apps(kube).list_namespaced_replica_set(
        env.namespace, label_selector="app.kubernetes.io/name=course"
    )
    replicas = sorted(
        (rs.spec.template.spec.containers[0].image, rs.spec.replicas) for rs in sets.items
    )
    assert replicas == sorted([(first.reference, 0), (second.reference, 3)])


@pytest.mark.parametrize(
    ("reason", "service"),
    [
        ("ImagePullBackOff", "user"),
        ("ErrImagePull", "payment"),
        ("CrashLoopBackOff", "media"),
        ("CreateContainerConfigError", "search"),
    ],
)
def test_a_failed_rollout_names_the_reason_and_restores_the_previous_release(
    kube: KubeCluster,
    kubelet_marks: dict[str, str],
    config: PipelineConfig,
    reason: str,
    service: str,
) -> None:
    env, spec = config.environment("dev"), config.service(service)
    deployer = deployer_for(kube)
    good, bad = image(service), image(service)
    deployer.deploy(env, spec, good, deadline_s=DEADLINE_S)
    kubelet_marks[bad.digest] = reason

    started = time.monotonic()
    with pytest.raises(DeployError) as caught:
        deployer.deploy(env, spec, bad, deadline_s=DEADLINE_S)

    message = str(caught.value)
    assert "new pods cannot start" in message
    assert reason in message
    assert f"restored {good.reference}" in message
    assert time.monotonic() - started < 30  # the pods' reason, not the 300 s deadline
    live = deployer.live(env, spec)
    assert live is not None
    assert live.image.digest == good.digest
    assert pod_images(kube, env.namespace, service) == [good.reference]


def test_a_failed_first_release_removes_the_service(
    kube: KubeCluster, kubelet_marks: dict[str, str], config: PipelineConfig
) -> None:
    env, spec = config.environment("staging"), config.service("media")
    bad = image("media")
    kubelet_marks[bad.digest] = "ImagePullBackOff"
    deployer = deployer_for(kube)
    with pytest.raises(DeployError, match=r"ImagePullBackOff.*removed it"):
        deployer.deploy(env, spec, bad, deadline_s=DEADLINE_S)
    assert deployer.live(env, spec) is None
    assert not exists(core(kube).read_namespaced_service, "media", env.namespace)
    assert pod_images(kube, env.namespace, "media") == []  # waited for graceful deletion


def test_the_rollout_deadline_setting_bounds_a_slow_rollout(
    kube: KubeCluster, kubelet_marks: dict[str, str], config: PipelineConfig
) -> None:
    env, spec = config.environment("dev"), config.service("enrollment")
    deployer = deployer_for(kube, rollout_deadline_s=3)
    good, slow = image("enrollment"), image("enrollment")
    deployer.deploy(env, spec, good, deadline_s=DEADLINE_S)
    kubelet_marks[slow.digest] = "NotReady"  # running, never ready: no reason to fail fast
    started = time.monotonic()
    with pytest.raises(DeployError) as caught:
        deployer.deploy(env, spec, slow, deadline_s=DEADLINE_S)
    message = str(caught.value)
    assert re.search(r"not ready \d+s after the apply", message), message
    assert f"restored {good.reference}" in message
    assert time.monotonic() - started < 20
    assert pod_images(kube, env.namespace, "enrollment") == [good.reference]


def test_wrong_credentials_are_refused(
    kube: KubeCluster, config: PipelineConfig, tmp_path: Path
) -> None:
    other = kube.client_kubeconfig(
        "admin", tmp_path / "other", orgs=("system:masters",), ca=Authority.create("other")
    )
    deployer = KubernetesDeployer(target_for(other))
    with pytest.raises(KubernetesApiError) as caught:
        deployer.live(config.environment("dev"), config.service("auth"))
    assert caught.value.status == 401


def test_an_unpinned_live_image_is_refused(kube: KubeCluster, config: PipelineConfig) -> None:
    env, spec = config.environment("production"), config.service("notification")
    deployer = deployer_for(kube)
    deployer.deploy(env, spec, image("notification"), deadline_s=DEADLINE_S)
    patch = {"spec": {"template": {"spec": {"containers": [{"name": "app", "image": "x:latest"}]}}}}
    apps(kube).patch_namespaced_deployment(
        "notification", env.namespace, patch, field_manager=FIELD_MANAGER
    )
    with pytest.raises(DeployError, match="not an image pinned by digest"):
        deployer.live(env, spec)


# --------------------------------------------------------------------------- the defects


def _foreign_deployment(name: str, digest: str) -> dict[str, Any]:
    labels = {"app.kubernetes.io/name": name, "team": "someone-else"}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {"containers": [{"name": "app", "image": f"elsewhere/{name}@{digest}"}]},
            },
        },
    }


def test_a_deployment_the_pipeline_does_not_own_is_refused_before_any_write(
    kube: KubeCluster, config: PipelineConfig
) -> None:
    env, spec = config.environment("dev"), config.service("analytics")
    namespace = {"metadata": {"name": env.namespace}}
    if not exists(core(kube).read_namespace, env.namespace):
        core(kube).create_namespace(namespace)
    foreign = _foreign_deployment("analytics", "sha256:" + "e" * 64)
    apps(kube).create_namespaced_deployment(env.namespace, foreign, field_manager="helm")
    before = apps(kube).read_namespaced_deployment("analytics", env.namespace)

    with pytest.raises(DeployError, match=r"not this pipeline's \(owned by field managers helm"):
        deployer_for(kube).deploy(env, spec, image("analytics"), deadline_s=DEADLINE_S)

    after = apps(kube).read_namespaced_deployment("analytics", env.namespace)
    assert after.metadata.generation == before.metadata.generation
    assert FIELD_MANAGER not in {m.manager for m in after.metadata.managed_fields}
    assert not exists(core(kube).read_namespaced_service, "analytics", env.namespace)
    assert not exists(core(kube).read_namespaced_service_account, "analytics", env.namespace)
    assert not exists(core(kube).read_namespaced_config_map, "analytics", env.namespace)


def test_a_failed_apply_removes_what_it_created(kube: KubeCluster, config: PipelineConfig) -> None:
    """Our own Deployment of an older selector: the new one is refused (immutable)
    after the ServiceAccount, ConfigMap and Service were created."""
    env, spec = config.environment("staging"), config.service("content")
    old = _foreign_deployment("content", "sha256:" + "c" * 64)
    old["metadata"]["namespace"] = env.namespace
    old["metadata"]["labels"]["app.kubernetes.io/managed-by"] = FIELD_MANAGER
    if not exists(core(kube).read_namespace, env.namespace):
        core(kube).create_namespace({"metadata": {"name": env.namespace}})
    apps(kube).patch_namespaced_deployment(
        "content",
        env.namespace,
        old,
        field_manager=FIELD_MANAGER,
        _content_type="application/apply-patch+yaml",
    )
    deployer = deployer_for(kube)
    assert deployer.live(env, spec) is not None  # ours: taken as the previous release

    with pytest.raises(DeployError) as caught:
        deployer.deploy(env, spec, image("content"), deadline_s=DEADLINE_S)

    message = str(caught.value)
    assert "422" in message
    assert "immutable" in message
    assert "removed the objects it created, the Deployment was not changed" in message
    assert "could NOT restore" not in message
    for read in ("read_namespaced_service", "read_namespaced_service_account"):
        assert not exists(getattr(core(kube), read), "content", env.namespace), read
    assert not exists(core(kube).read_namespaced_config_map, "content", env.namespace)
    live = apps(kube).read_namespaced_deployment("content", env.namespace)
    assert live.spec.template.spec.containers[0].image.endswith("c" * 64)


def test_drift_by_another_manager_is_reported_and_removed_by_the_next_deploy(
    kube: KubeCluster, config: PipelineConfig, caplog: pytest.LogCaptureFixture
) -> None:
    env, spec = config.environment("production"), config.service("search")
    deployer = deployer_for(kube)
    first, second = image("search"), image("search")
    deployer.deploy(env, spec, first, deadline_s=DEADLINE_S)
    # what `kubectl set image`, `kubectl label` and `kubectl set env` send
    container = {
        "name": "app",
        "image": "registry.example/other@sha256:" + "d" * 64,
        "env": [{"name": "DEBUG", "value": "1"}],
    }
    patch = {
        "metadata": {"labels": {"hotfix": "yes"}},
        "spec": {"template": {"spec": {"containers": [container]}}},
    }
    apps(kube).patch_namespaced_deployment(
        "search", env.namespace, patch, field_manager="kubectl-set"
    )
    # a server-side apply by that manager to our fields conflicts unless forced
    with pytest.raises(ApiException) as conflict:
        apps(kube).patch_namespaced_deployment(
            "search",
            env.namespace,
            {
                "apiVersion": "apps/v1",
                "kind": "Deployment",
                "metadata": {"name": "search"},
                "spec": {"revisionHistoryLimit": 1},
            },
            field_manager="other-applier",
            _content_type="application/apply-patch+yaml",
        )
    assert conflict.value.status == 409
    assert FIELD_MANAGER in str(conflict.value.body)

    with caplog.at_level(logging.WARNING, logger="elice"):
        deployer.live(env, spec)
    assert "kubectl-set" in caplog.text
    assert "/metadata/labels/hotfix" in caplog.text

    deployer.deploy(env, spec, second, deadline_s=DEADLINE_S)

    live = apps(kube).read_namespaced_deployment("search", env.namespace)
    assert "hotfix" not in live.metadata.labels
    container = live.spec.template.spec.containers[0]
    assert container.image == second.reference
    assert "DEBUG" not in {e.name for e in container.env}
    raw = client.ApiClient().sanitize_for_serialization(live)
    assert drift(raw) == []
    assert pod_images(kube, env.namespace, "search") == [second.reference] * 3


def test_drift_on_the_service_configmap_and_hpa_is_reported_and_removed(
    kube: KubeCluster, config: PipelineConfig, caplog: pytest.LogCaptureFixture
) -> None:
    env, spec = config.environment("staging"), config.service("user")
    deployer = deployer_for(kube)
    deployer.deploy(env, spec, image("user"), deadline_s=DEADLINE_S)
    hpas = client.AutoscalingV2Api(kube.admin)
    label = {"metadata": {"labels": {"hotfix": "yes"}}}
    # what `kubectl edit` / `kubectl label` send: each a merge patch by another manager
    core(kube).patch_namespaced_service(
        "user",
        env.namespace,
        {**label, "spec": {"sessionAffinity": "ClientIP"}},
        field_manager="kubectl-edit",
    )
    core(kube).patch_namespaced_config_map(
        "user", env.namespace, {"data": {"DEBUG": "1"}}, field_manager="kubectl-edit"
    )
    hpas.patch_namespaced_horizontal_pod_autoscaler(
        "user", env.namespace, label, field_manager="kubectl-label"
    )

    with caplog.at_level(logging.WARNING, logger="elice"):
        deployer.live(env, spec)
    assert "Service/user: kubectl-edit: /metadata/labels/hotfix, /spec/sessionAffinity" in (
        caplog.text
    )
    assert "ConfigMap/user: kubectl-edit: /data/DEBUG" in caplog.text
    assert "HorizontalPodAutoscaler/user: kubectl-label: /metadata/labels/hotfix" in caplog.text
    assert "Deployment/user" not in caplog.text  # untouched: nothing reported

    deployer.deploy(env, spec, image("user"), deadline_s=DEADLINE_S)

    service = core(kube).read_namespaced_service("user", env.namespace)
    assert "hotfix" not in service.metadata.labels
    assert service.spec.session_affinity == "None"  # the server's default again
    assert "DEBUG" not in core(kube).read_namespaced_config_map("user", env.namespace).data
    hpa = hpas.read_namespaced_horizontal_pod_autoscaler("user", env.namespace)
    assert "hotfix" not in hpa.metadata.labels
    raw = client.ApiClient().sanitize_for_serialization
    for obj in (service, hpa, core(kube).read_namespaced_config_map("user", env.namespace)):
        assert drift(raw(obj)) == [], obj.kind
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="elice"):
        deployer.live(env, spec)
    assert "drift" not in caplog.text


# --------------------------------------------------------------------------- pull secrets


def login(password: str) -> OciRegistry:
    """The login of the registry the tests' images name (registry.example)."""
    return OciRegistry(address="registry.example", username="puller", password=password)


def pull_secret(kube: KubeCluster, namespace: str) -> Any:
    return core(kube).read_namespaced_secret(PULL_NAME, namespace)


def pulled_with(secret: Any) -> dict[str, Any]:
    """The registry entries of the Secret's .dockerconfigjson."""
    auths: dict[str, Any] = json.loads(base64.b64decode(secret.data[".dockerconfigjson"]))["auths"]
    return auths


def test_a_deploy_writes_the_namespaces_pull_secret_and_its_pods_name_it(
    kube: KubeCluster, config: PipelineConfig, caplog: pytest.LogCaptureFixture
) -> None:
    env, spec = config.environment("dev"), config.service("course")
    password = "static-pw-" + "k" * 20
    deployer = KubernetesDeployer(target_for(kube.kubeconfig), registries=[login(password)])
    with caplog.at_level(logging.DEBUG, logger="elice"):
        deployer.deploy(env, spec, image("course"), deadline_s=DEADLINE_S)

    secret = pull_secret(kube, env.namespace)
    assert secret.type == "kubernetes.io/dockerconfigjson"
    entry = pulled_with(secret)["registry.example"]
    assert (entry["username"], entry["password"]) == ("puller", password)
    assert base64.b64decode(entry["auth"]).decode() == f"puller:{password}"
    assert EXPIRES_AT not in secret.metadata.annotations  # static credentials
    pods = core(kube).list_namespaced_pod(
        env.namespace, label_selector="app.kubernetes.io/name=course"
    )
    assert pods.items
    for pod in pods.items:
        assert [s.name for s in pod.spec.image_pull_secrets] == [PULL_NAME]
    assert f"pull secret {env.namespace}/{PULL_NAME} written" in caplog.text
    assert password not in caplog.text

    # the same login again: not rewritten; a changed password: rewritten at once
    version = secret.metadata.resource_version
    deployer.deploy(env, spec, image("course"), deadline_s=DEADLINE_S)
    assert pull_secret(kube, env.namespace).metadata.resource_version == version
    rotated = KubernetesDeployer(target_for(kube.kubeconfig), registries=[login(password + "2")])
    rotated.deploy(env, spec, image("course"), deadline_s=DEADLINE_S)
    entry = pulled_with(pull_secret(kube, env.namespace))["registry.example"]
    assert entry["password"] == password + "2"


def test_a_token_is_rewritten_when_stale_not_while_fresh(
    kube: KubeCluster, config: PipelineConfig, caplog: pytest.LogCaptureFixture
) -> None:
    """ECR's tokens: each run fetches a new one, valid 12 h."""
    env, spec = config.environment("staging"), config.service("analytics")

    def deployer(token: str) -> KubernetesDeployer:
        return KubernetesDeployer(
            target_for(kube.kubeconfig),
            registries=[login(token)],
            token_expires_at=utcnow() + timedelta(hours=12),
        )

    tokens = [f"ecr-token-{n}-" + "t" * 40 for n in range(3)]
    with caplog.at_level(logging.DEBUG, logger="elice"):
        deployer(tokens[0]).deploy(env, spec, image("analytics"), deadline_s=DEADLINE_S)
        written = pull_secret(kube, env.namespace)
        assert EXPIRES_AT in written.metadata.annotations

        deployer(tokens[1]).deploy(env, spec, image("analytics"), deadline_s=DEADLINE_S)
        fresh = pull_secret(kube, env.namespace)
        assert fresh.metadata.resource_version == written.metadata.resource_version
        assert pulled_with(fresh)["registry.example"]["password"] == tokens[0]

        # written seven hours ago (another manager rewinds the record)
        seven_hours_ago = (utcnow() - timedelta(hours=7)).isoformat()
        core(kube).patch_namespaced_secret(
            PULL_NAME, env.namespace, {"metadata": {"annotations": {WRITTEN_AT: seven_hours_ago}}}
        )
        deployer(tokens[2]).deploy(env, spec, image("analytics"), deadline_s=DEADLINE_S)
    refreshed = pull_secret(kube, env.namespace)
    assert pulled_with(refreshed)["registry.example"]["password"] == tokens[2]
    assert refreshed.metadata.annotations[WRITTEN_AT] > seven_hours_ago
    assert "written more than 6 h ago" in caplog.text
    for token in tokens:
        assert token not in caplog.text


def test_between_deploys_a_lapsing_token_is_renewed_by_the_refresh_alone(
    kube: KubeCluster, config: PipelineConfig
) -> None:
    """What the scheduled health check calls (`refresh_pull_credentials`): no deploy, no
    apply of anything else; a fresh secret is left alone, one whose token expires within
    2 h is rewritten, and the Deployment is not touched."""
    env, spec = config.environment("production"), config.service("assessment")

    def deployer(token: str, hours_left: float = 12) -> KubernetesDeployer:
        return KubernetesDeployer(
            target_for(kube.kubeconfig),
            registries=[login(token)],
            token_expires_at=utcnow() + timedelta(hours=hours_left),
        )

    tokens = [f"ecr-token-r{n}-" + "t" * 40 for n in range(3)]
    deployer(tokens[0]).deploy(env, spec, image("assessment"), deadline_s=DEADLINE_S)
    released = apps(kube).read_namespaced_deployment("assessment", env.namespace)
    written = pull_secret(kube, env.namespace)

    assert deployer(tokens[1]).refresh_pull_credentials(env) is None  # fresh: kept
    assert pull_secret(kube, env.namespace).metadata.resource_version == (
        written.metadata.resource_version
    )

    # the stored token expires in one hour (another manager rewinds the record)
    in_an_hour = (utcnow() + timedelta(hours=1)).isoformat()
    core(kube).patch_namespaced_secret(
        PULL_NAME, env.namespace, {"metadata": {"annotations": {EXPIRES_AT: in_an_hour}}}
    )
    reason = deployer(tokens[2]).refresh_pull_credentials(env)
    assert reason == "its token expires within 2 h"
    renewed = pull_secret(kube, env.namespace)
    assert pulled_with(renewed)["registry.example"]["password"] == tokens[2]
    assert renewed.metadata.annotations[EXPIRES_AT] > in_an_hour
    after = apps(kube).read_namespaced_deployment("assessment", env.namespace)
    assert after.metadata.generation == released.metadata.generation  # nothing redeployed

    # a registry without a login keeps nothing to renew
    anonymous = OciRegistry(address="registry.example")
    bare = KubernetesDeployer(target_for(kube.kubeconfig), registries=[anonymous])
    assert bare.refresh_pull_credentials(env) is None


def test_a_refused_pull_secret_stops_the_deploy_before_any_apply(
    kube: KubeCluster, config: PipelineConfig, tmp_path: Path
) -> None:
    """Credentials allowed to deploy but not to write the Secret (an access review
    grants the rest): the message names the refusal, never the login."""
    env, spec = config.environment("production"), config.service("media")
    rbac = client.RbacAuthorizationV1Api(kube.admin)
    if not exists(core(kube).read_namespace, env.namespace):
        core(kube).create_namespace({"metadata": {"name": env.namespace}})
    rules = [{"apiGroups": ["*"], "resources": ["deployments", "pods"], "verbs": ["*"]}]
    rbac.create_namespaced_role(env.namespace, {"metadata": {"name": "no-secrets"}, "rules": rules})
    bind_role(rbac, env.namespace, "no-secrets", "no-secrets")
    kubeconfig = kube.client_kubeconfig("no-secrets", tmp_path / "no-secrets")
    password = "never-shown-" + "p" * 20
    deployer = KubernetesDeployer(
        target_for(kubeconfig, retries=0), registries=[login(password)], retry_budget_s=0
    )
    with pytest.raises(DeployError) as caught:
        deployer.deploy(env, spec, image("media"), deadline_s=DEADLINE_S)
    message = str(caught.value)
    assert f"pull secret {env.namespace}/{PULL_NAME} could not be written" in message
    assert "403" in message
    assert "nothing applied" in message
    assert password not in message
    assert caught.value.__cause__ is None
    assert caught.value.__suppress_context__
    assert not exists(apps(kube).read_namespaced_deployment, "media", env.namespace)


# --------------------------------------------------------------------------- setup


def test_the_kubeconfig_is_checked_against_the_server(
    kube: KubeCluster, config: PipelineConfig, tmp_path: Path
) -> None:
    namespaces = ["elice-devops-dev", "elice-devops-prod"]
    assert deployer_for(kube).check(namespaces).startswith("v1.24.0-alpha.1")
    other_ca = kube.client_kubeconfig(
        "admin", tmp_path / "other-ca", orgs=("system:masters",), ca=Authority.create("other")
    )
    with pytest.raises(ConfigError, match=r"does not work with https://127\.0\.0\.1:\d+: .*401"):
        KubernetesDeployer(target_for(other_ca, retries=0), retry_budget_s=0).check(namespaces)
    nobody = kube.client_kubeconfig("nobody", tmp_path / "nobody")
    with pytest.raises(
        ConfigError, match=r"may not apply Deployments .* elice-devops-dev, elice-devops-prod"
    ):
        KubernetesDeployer(target_for(nobody)).check(namespaces)


def test_cicd_setup_refuses_a_kubeconfig_the_server_refuses_before_saving(
    kube: KubeCluster, tmp_path: Path
) -> None:
    from reconcile.setup import ensure_setup  # noqa: PLC0415

    other_ca = kube.client_kubeconfig(
        "admin", tmp_path / "other-ca", orgs=("system:masters",), ca=Authority.create("other")
    )
    # a Prefect API nobody answers on: the kubeconfig is refused before setup talks to it
    with pytest.raises(ConfigError, match="401") as caught:
        ensure_setup("http://127.0.0.1:9/api", kubeconfig=other_ca)
    assert "does not work with" in str(caught.value)
    assert "BEGIN" not in str(caught.value)  # no key material in the message


def test_a_deploy_survives_an_api_server_restart(
    kube: KubeCluster,
    kubelet_marks: dict[str, str],
    config: PipelineConfig,
    caplog: pytest.LogCaptureFixture,
) -> None:
    env, spec = config.environment("staging"), config.service("notification")
    deployer = deployer_for(kube)
    first, second = image("notification"), image("notification")
    deployer.deploy(env, spec, first, deadline_s=DEADLINE_S)
    kubelet_marks[second.digest] = "NotReady"  # the rollout waits until the restart is over
    downtime: list[float] = []

    def restart_mid_rollout() -> None:
        deadline = time.monotonic() + 30
        while second.reference not in pod_images(kube, env.namespace, "notification"):
            assert time.monotonic() < deadline, "the new release's pods never came"
            time.sleep(0.1)
        downtime.append(kube.restart_apiserver())
        kubelet_marks.pop(second.digest)

    restarter = threading.Thread(target=restart_mid_rollout)
    restarter.start()
    try:
        with caplog.at_level(logging.WARNING, logger="elice"):
            deployed = deployer.deploy(env, spec, second, deadline_s=DEADLINE_S)
    finally:
        restarter.join()
    assert downtime, "the API server was not restarted"
    assert "no answer" in caplog.text or ", retry " in caplog.text  # it retried through it
    assert deployed.image == second
    assert pod_images(kube, env.namespace, "notification") == [second.reference] * 2


def test_missing_binaries_are_named_with_the_paths_tried(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from tests.plugins import kube as plugin  # noqa: PLC0415

    monkeypatch.setenv("ELICE_K8S_DIR", str(tmp_path / "nowhere"))
    monkeypatch.setattr(plugin, "DEFAULT_SHARED", tmp_path / "not-here-either")
    monkeypatch.setattr(plugin, "REPO", tmp_path / "clone")
    with pytest.raises(FileNotFoundError) as caught:
        plugin.shared_dir()
    message = str(caught.value)
    assert "kube-apiserver.xz" in message
    assert str(tmp_path / "nowhere") in message
    assert str(tmp_path / "not-here-either") in message
    assert "ELICE_K8S_DIR" in message

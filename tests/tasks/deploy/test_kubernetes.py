"""The kubernetes deploy target against the API-server SIMULATOR (tests/k8s_sim), real client.

The official kubernetes client talks real HTTP to the simulator, configured through a
kubeconfig loaded into prefect-kubernetes' KubernetesClusterConfig/KubernetesCredentials.
The same releases, failures, restores and credentials run against a real control plane
in test_kubernetes_real.py; what stays here only is what a real server cannot show on
this machine or not on demand: traffic to pods (health checks through the service proxy,
no container runs there), injected 5xx/409 answers and timeouts, the controller's stale
ProgressDeadlineExceeded during a rollback, and the retry budget on a simulated clock.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException
from prefect_kubernetes.credentials import KubernetesClusterConfig, KubernetesCredentials

from blocks.config import PipelineConfig
from blocks.kubernetes_target import KubernetesTarget
from core.errors import DeployError, KubernetesApiError
from core.records import ImageRef
from tasks.deploy.kubernetes import (
    FIELD_MANAGER,
    KubernetesDeployer,
    describe_drift,
    drift,
    foreign_owner,
    minimum_replicas,
    progress_deadline_s,
    rollout_status,
)
from tasks.deploy.manifests import containers, render_overlay, service_objects
from tasks.health import probe_health
from tests.k8s_sim import CONFIG, CRASH, ERR_PULL, NOT_READY, PULL, KubeSimulator

DEADLINE_S = 60.0  # generous: the simulator finishes in a few simulated steps
ROLLOUT_DEADLINE_S = 400.0  # beyond the manifests' progressDeadlineSeconds (300)


@pytest.fixture
def sim() -> Iterator[KubeSimulator]:
    with KubeSimulator() as simulator:
        yield simulator


def _target(sim: KubeSimulator, tmp_path: Path, **overrides: Any) -> KubernetesTarget:
    kubeconfig = sim.kubeconfig(tmp_path / "kubeconfig")
    cluster = KubernetesClusterConfig.from_file(kubeconfig)
    settings: dict[str, Any] = {
        "poll_interval_s": 0.01,
        "retry_backoff_s": 0.01,
        "retry_backoff_max_s": 0.05,
        "rollout_deadline_s": ROLLOUT_DEADLINE_S,
        **overrides,
    }
    return KubernetesTarget(credentials=KubernetesCredentials(cluster_config=cluster), **settings)


@pytest.fixture
def deployer(sim: KubeSimulator, tmp_path: Path) -> KubernetesDeployer:
    """The deployer on the simulator's clock (simulated seconds, advanced by reads)."""
    return KubernetesDeployer(_target(sim, tmp_path), clock=lambda: sim.now)


def _image(service: str, n: int) -> ImageRef:
    return ImageRef(
        service=service,
        repository=f"127.0.0.1:5000/elice/{service}",
        digest="sha256:" + f"{n:x}" * 64,
        tag=f"v{n}",
        version=f"1.{n}.0",
        commit=f"{n:x}" * 40,
    )


def _pod_images(
    sim: KubeSimulator, namespace: str, service: str, *, terminating: bool = False
) -> list[str]:
    return [
        p["spec"]["containers"][0]["image"]
        for p in sim.list("pods", namespace)
        if p["metadata"]["labels"]["app.kubernetes.io/name"] == service
        and (terminating or "deletionTimestamp" not in p["metadata"])
    ]


def test_deploy_applies_and_waits_for_the_rollout(
    sim: KubeSimulator, deployer: KubernetesDeployer, config: PipelineConfig
) -> None:
    env, service = config.environment("staging"), config.service("auth")
    image = _image("auth", 1)

    deployed = deployer.deploy(env, service, image, deadline_s=DEADLINE_S)

    assert deployed.image == image
    assert deployed.target == "kubernetes"
    # outside the cluster: the API server's service proxy, on loopback
    assert deployed.address.startswith("http://127.0.0.1:")
    assert deployed.address.endswith("/api/v1/namespaces/elice-devops-stg/services/auth:8000/proxy")
    live = sim.get("deployments", "elice-devops-stg", "auth")
    assert live is not None
    assert live["spec"]["template"]["spec"]["containers"][0]["image"] == image.reference
    # the HPA's minimum (2 in staging) drives the replicas; all available, all updated
    assert live["status"]["availableReplicas"] == live["status"]["updatedReplicas"] == 2
    assert _pod_images(sim, "elice-devops-stg", "auth") == [image.reference] * 2
    for plural, name in [
        ("services", "auth"),
        ("serviceaccounts", "auth"),
        ("configmaps", "auth"),
        ("horizontalpodautoscalers", "auth"),
        ("poddisruptionbudgets", "auth"),
    ]:
        assert sim.get(plural, "elice-devops-stg", name) is not None, plural
    assert sim.get("namespaces", "", "elice-devops-stg") is not None
    assert sim.get("deployments", "elice-devops-stg", "user") is None  # only this service
    applies = [r for r in sim.requests if r[0] == "PATCH"]
    assert len(applies) == 8
    assert all(r[3] == "application/apply-patch+yaml" for r in applies)
    assert all(
        f"fieldManager={FIELD_MANAGER}" in r[1] and "force=true" in r[1].lower() for r in applies
    )


def test_live_reads_the_digest_from_the_deployment(
    deployer: KubernetesDeployer, config: PipelineConfig
) -> None:
    env, service = config.environment("dev"), config.service("payment")
    assert deployer.live(env, service) is None
    image = _image("payment", 7)
    deployer.deploy(env, service, image, deadline_s=DEADLINE_S)
    live = deployer.live(env, service)
    assert live is not None
    assert live.image == image
    assert live.environment == "dev"


@pytest.mark.parametrize("reason", [PULL, ERR_PULL, CRASH, CONFIG])
def test_failed_rollout_names_the_pod_reason_and_restores_the_previous_digest(
    sim: KubeSimulator, deployer: KubernetesDeployer, config: PipelineConfig, reason: str
) -> None:
    env, service = config.environment("production"), config.service("course")
    good, bad = _image("course", 1), _image("course", 2)
    deployer.deploy(env, service, good, deadline_s=DEADLINE_S)
    sim.bad_images[bad.digest] = reason

    started = sim.now
    with pytest.raises(DeployError) as caught:
        deployer.deploy(env, service, bad, deadline_s=DEADLINE_S)

    message = str(caught.value)
    # failed fast on the pods' reason: a few simulated steps, not the 300 s deadline
    assert "new pods cannot start" in message
    assert reason in message
    assert sim.now - started < 60
    assert f"restored {good.reference}" in message
    live = deployer.live(env, service)
    assert live is not None
    assert live.image.digest == good.digest
    assert _pod_images(sim, "elice-devops-prod", "course") == [good.reference] * 3


def test_a_rollout_that_stays_unready_fails_at_the_progress_deadline(
    sim: KubeSimulator, deployer: KubernetesDeployer, config: PipelineConfig
) -> None:
    env, service = config.environment("production"), config.service("course")
    good, bad = _image("course", 1), _image("course", 2)
    deployer.deploy(env, service, good, deadline_s=DEADLINE_S)
    sim.bad_images[bad.digest] = NOT_READY  # running, never ready: slow but alive
    with pytest.raises(DeployError) as caught:
        deployer.deploy(env, service, bad, deadline_s=DEADLINE_S)
    message = str(caught.value)
    assert "progress deadline" in message or "ProgressDeadlineExceeded" in message
    assert f"restored {good.reference}" in message
    assert _pod_images(sim, "elice-devops-prod", "course") == [good.reference] * 3
    # the rollback passed through the controller's stale ProgressDeadlineExceeded
    assert sim.stale_conditions_served == sim.rollback_stale_reads > 0


def test_a_stale_deadline_condition_during_a_rollback_is_not_a_failure(
    sim: KubeSimulator, tmp_path: Path, config: PipelineConfig
) -> None:
    env, service = config.environment("dev"), config.service("course")
    good, bad = _image("course", 1), _image("course", 2)
    sim.rollback_stale_reads = 4
    deployer = KubernetesDeployer(_target(sim, tmp_path), clock=lambda: sim.now)
    previous = deployer.deploy(env, service, good, deadline_s=DEADLINE_S)
    sim.bad_images[bad.digest] = NOT_READY
    with pytest.raises(DeployError, match=f"restored {re.escape(good.reference)}"):
        deployer.deploy(env, service, bad, deadline_s=DEADLINE_S)
    assert sim.stale_conditions_served == 4
    stale = [
        d
        for d in sim.deployment_reads
        if containers(d)[0]["image"] == good.reference
        and d["status"]["observedGeneration"] == d["metadata"]["generation"]
        and any(c["reason"] == "ProgressDeadlineExceeded" for c in d["status"]["conditions"])
    ]
    assert stale, "the simulator never showed the stale condition"
    # judged as a failure only once the deadline has passed since the apply
    assert rollout_status(stale[0], good.reference).failed
    assert not rollout_status(stale[0], good.reference, deadline_passed=False).failed
    deployer.restore(env, service, previous)  # and a plain restore says the same
    assert deployer.live(env, service) == previous.model_copy(
        update={"deployed_at": deployer.live(env, service).deployed_at}  # type: ignore[union-attr]
    )


def test_a_first_deploy_waits_for_the_hpa_minimum(
    sim: KubeSimulator, deployer: KubernetesDeployer, config: PipelineConfig
) -> None:
    env, service = config.environment("staging"), config.service("assessment")
    image = _image("assessment", 3)
    sim.hpa_sync_s = 40  # time enough for the first pod to be ready before the HPA syncs
    deployer.deploy(env, service, image, deadline_s=DEADLINE_S)
    reads = sim.deployment_reads
    assert reads[-1]["status"]["availableReplicas"] == 2
    # before the HPA's sync the Deployment looked finished at one replica
    early = [d for d in reads if d["spec"]["replicas"] == 1 and d["status"].get("replicas")]
    assert any(rollout_status(d, image.reference).done for d in early)
    assert not any(rollout_status(d, image.reference, min_available=2).done for d in early)


def test_deleted_pods_terminate_gracefully_and_removal_waits_for_them(
    sim: KubeSimulator, deployer: KubernetesDeployer, config: PipelineConfig, tmp_path: Path
) -> None:
    env, service = config.environment("dev"), config.service("media")
    image = _image("media", 4)
    deployer.deploy(env, service, image, deadline_s=DEADLINE_S)
    core = client.CoreV1Api(_target(sim, tmp_path).api_client())
    name = sim.list("pods", env.namespace)[0]["metadata"]["name"]
    core.delete_namespaced_pod(name, env.namespace)
    pod = core.read_namespaced_pod(name, env.namespace)
    assert pod.metadata.deletion_timestamp is not None
    assert not pod.status.container_statuses[0].ready
    sim.step(int(sim.termination_grace_s / sim.step_seconds) + 1)
    with pytest.raises(ApiException) as gone:
        core.read_namespaced_pod(name, env.namespace)
    assert gone.value.status == 404
    deployer.restore(env, service, None)
    assert _pod_images(sim, env.namespace, "media", terminating=True) == []


def test_survives_an_api_server_restart(
    sim: KubeSimulator, tmp_path: Path, config: PipelineConfig
) -> None:
    target = _target(sim, tmp_path, retry_backoff_s=0.5, retry_backoff_max_s=8.0)
    clock = _FastClock()
    # the block's default backoff (0.5 s doubling to 8 s), 40x faster than the wall clock
    deployer = KubernetesDeployer(target, sleep=clock.sleep, clock=clock.now)
    restart = sim.restart(down_s=1.5)  # 60 s of the deployer's time
    assert deployer.live(config.environment("dev"), config.service("auth")) is None
    restart.join()
    assert clock.t > 45
    impatient = KubernetesDeployer(target, sleep=clock.sleep, clock=clock.now, retry_budget_s=0)
    second = sim.restart(down_s=1.5)
    with pytest.raises(KubernetesApiError, match="no answer from the API server"):
        impatient.live(config.environment("dev"), config.service("auth"))
    second.join()


class _FastClock:
    """Monotonic seconds that run 40x faster than the wall clock while sleeping."""

    def __init__(self) -> None:
        self.t = 0.0

    def now(self) -> float:
        return self.t

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds / 40)
        self.t += seconds


def test_failed_first_deploy_removes_the_service(
    sim: KubeSimulator, deployer: KubernetesDeployer, config: PipelineConfig
) -> None:
    env, service = config.environment("dev"), config.service("media")
    bad = _image("media", 9)
    sim.bad_images[bad.reference] = PULL
    with pytest.raises(DeployError, match=r"ImagePullBackOff.*removed it"):
        deployer.deploy(env, service, bad, deadline_s=DEADLINE_S)
    assert deployer.live(env, service) is None
    assert sim.get("services", "elice-devops-dev", "media") is None
    assert _pod_images(sim, "elice-devops-dev", "media") == []


def test_restore_puts_the_previous_digest_back(
    sim: KubeSimulator, deployer: KubernetesDeployer, config: PipelineConfig
) -> None:
    env = config.environment("staging")
    services = [config.service("auth"), config.service("search")]
    previous = {}
    for service in services:
        previous[service.name] = deployer.deploy(
            env, service, _image(service.name, 1), deadline_s=DEADLINE_S
        )
        deployer.deploy(env, service, _image(service.name, 2), deadline_s=DEADLINE_S)
    for service in services:
        assert deployer.live(env, service).image.digest == _image(service.name, 2).digest  # type: ignore[union-attr]
        deployer.restore(env, service, previous[service.name])
        live = deployer.live(env, service)
        assert live is not None
        assert live.image == _image(service.name, 1)
        assert _pod_images(sim, env.namespace, service.name) == [live.image.reference] * 2
    deployer.restore(env, services[0], None)
    assert deployer.live(env, services[0]) is None
    assert deployer.live(env, services[1]) is not None


def test_retries_injected_500s(
    sim: KubeSimulator, deployer: KubernetesDeployer, config: PipelineConfig
) -> None:
    sim.fail_next(3, 500)
    deployed = deployer.deploy(
        config.environment("dev"), config.service("user"), _image("user", 4), deadline_s=DEADLINE_S
    )
    assert deployed.image.digest == _image("user", 4).digest
    assert [r[2] for r in sim.requests[:4]] == [500, 500, 500, 404]  # then the live read


def test_retries_injected_409s_on_apply(
    sim: KubeSimulator, deployer: KubernetesDeployer, config: PipelineConfig
) -> None:
    sim.fail_next(2, 409, method="PATCH", path_contains="/deployments/")
    deployer.deploy(
        config.environment("dev"), config.service("user"), _image("user", 5), deadline_s=DEADLINE_S
    )
    deployment_applies = [r[2] for r in sim.requests if r[0] == "PATCH" and "/deployments/" in r[1]]
    assert deployment_applies == [409, 409, 201]


def test_retries_a_timed_out_request(
    sim: KubeSimulator, tmp_path: Path, config: PipelineConfig
) -> None:
    deployer = KubernetesDeployer(_target(sim, tmp_path, request_timeout_s=0.5))
    sim.delay_next(1, 3.0, method="GET")
    assert deployer.live(config.environment("dev"), config.service("auth")) is None
    assert [method for method, _ in sim.arrivals] == ["GET", "GET"]


def test_gives_up_after_the_retries_with_a_clear_error(
    sim: KubeSimulator, tmp_path: Path, config: PipelineConfig
) -> None:
    deployer = KubernetesDeployer(_target(sim, tmp_path, retries=2), retry_budget_s=0)
    sim.fail_next(100, 503)
    with pytest.raises(KubernetesApiError, match=r"read Deployment elice-devops-dev/auth: .* 503"):
        deployer.deploy(
            config.environment("dev"), config.service("auth"), _image("auth", 1), deadline_s=5
        )
    assert len(sim.requests) == 3


def test_wrong_credentials_are_refused(
    sim: KubeSimulator, tmp_path: Path, config: PipelineConfig
) -> None:
    target = _target(sim, tmp_path)
    assert target.credentials is not None
    assert target.credentials.cluster_config is not None
    target.credentials.cluster_config.config["users"][0]["user"]["token"] = "wrong"
    with pytest.raises(KubernetesApiError, match="401") as caught:
        KubernetesDeployer(target).live(config.environment("dev"), config.service("auth"))
    assert caught.value.status == 401


def test_bad_arguments_fail_before_any_request(
    sim: KubeSimulator, deployer: KubernetesDeployer, config: PipelineConfig
) -> None:
    env, service = config.environment("dev"), config.service("auth")
    with pytest.raises(ValueError, match="is for 'user', not 'auth'"):
        deployer.deploy(env, service, _image("user", 1), deadline_s=DEADLINE_S)
    with pytest.raises(ValueError, match="deadline_s must be positive"):
        deployer.deploy(env, service, _image("auth", 1), deadline_s=0)
    assert sim.requests == []


def test_simulator_speaks_the_wire_protocol(sim: KubeSimulator, tmp_path: Path) -> None:
    api_client = _target(sim, tmp_path).api_client()
    core = client.CoreV1Api(api_client)
    assert client.VersionApi(api_client).get_code().minor == "31"
    core.create_namespace({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "ns"}})
    created = core.create_namespaced_config_map(
        "ns",
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}, "data": {"a": "1"}},
    )
    stale = created.metadata.resource_version
    core.patch_namespaced_config_map("c", "ns", {"data": {"a": "2"}})
    with pytest.raises(ApiException) as conflict:
        core.replace_namespaced_config_map(
            "c",
            "ns",
            {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {"name": "c", "resourceVersion": stale},
                "data": {"a": "3"},
            },
        )
    assert conflict.value.status == 409
    with pytest.raises(ApiException) as duplicate:
        core.create_namespaced_config_map("ns", {"metadata": {"name": "c"}})
    assert duplicate.value.status == 409
    assert core.read_namespaced_config_map("c", "ns").data == {"a": "2"}
    with pytest.raises(ApiException) as missing:
        client.AppsV1Api(api_client).read_namespaced_deployment("nope", "ns")
    assert missing.value.status == 404


def test_deadline_and_minimum_come_from_the_manifests() -> None:
    for env, minimum in (("dev", 1), ("staging", 2), ("production", 3)):
        objects = service_objects(render_overlay(env, {"auth": _image("auth", 1)}), "auth")
        assert minimum_replicas(objects, "auth") == minimum
        assert progress_deadline_s(objects) == 300
    assert progress_deadline_s([]) == 600


def test_bad_retry_budget_is_refused(sim: KubeSimulator, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="retry_budget_s"):
        KubernetesDeployer(_target(sim, tmp_path), retry_budget_s=-1)


def test_outside_the_cluster_health_checks_reach_the_pods_through_the_service_proxy(
    sim: KubeSimulator,
    deployer: KubernetesDeployer,
    config: PipelineConfig,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    env, service = config.environment("dev"), config.service("auth")
    image = _image("auth", 3)
    address = deployer.address(env, service)
    # nothing deployed yet: the API server's own answer comes back, not a connection error
    first = probe_health(address, service, deadline_s=0.2)
    assert not first.ok
    assert "/health: answered 404" in first.failures
    deployer.deploy(env, service, image, deadline_s=DEADLINE_S)
    result = probe_health(address, service, deadline_s=5, expect_digest=image.digest)
    assert result.ok, result.failures
    assert result.version["digest"] == image.digest
    assert ("elice-devops-dev", "auth", "/version") in sim.proxied
    # every forwarded request carried the cluster's token (the simulator refuses others)
    proxied = [r for r in sim.requests if "/proxy/" in r[1]]
    assert proxied
    assert {status for _, _, status, _ in proxied} == {404, 200}  # never 401
    # the loopback port forwards service-proxy GETs only, not the rest of the API
    base = address.split("/api/", 1)[0]
    before = len(sim.requests)
    refused = httpx.get(f"{base}/api/v1/namespaces/elice-devops-dev/configmaps", timeout=5)
    assert refused.status_code == 403
    assert len(sim.requests) == before
    # the same cluster and credentials share one forwarder
    again = KubernetesDeployer(deployer.target, clock=lambda: sim.now)
    assert again.address(env, service) == address


def test_inside_the_cluster_health_checks_use_cluster_dns(
    sim: KubeSimulator,
    deployer: KubernetesDeployer,
    config: PipelineConfig,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    env, service = config.environment("staging"), config.service("auth")
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.96.0.1")
    assert deployer.address(env, service) == "http://auth.elice-devops-stg.svc.cluster.local:8000"
    forced = KubernetesDeployer(deployer.target.model_copy(update={"health_via": "proxy"}))
    assert "/services/auth:8000/proxy" in forced.address(env, service)
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST")
    dns = KubernetesDeployer(deployer.target.model_copy(update={"health_via": "dns"}))
    assert dns.address(env, service).endswith(".svc.cluster.local:8000")


def _managed(manager: str, fields: dict[str, Any], operation: str = "Update") -> dict[str, Any]:
    return {"manager": manager, "operation": operation, "fieldsV1": fields}


def test_ownership_and_drift_are_read_from_the_managed_fields() -> None:
    """What a real server's managedFields say (shapes as v1.24 writes them)."""
    ours = {
        "f:metadata": {"f:labels": {"f:app": {}}},
        "f:spec": {
            "f:template": {
                "f:spec": {
                    "f:containers": {
                        'k:{"name":"app"}': {"f:env": {'k:{"name":"PORT"}': {".": {}}}}
                    }
                }
            }
        },
    }
    theirs = {
        "f:metadata": {"f:labels": {"f:hotfix": {}}},
        "f:spec": {
            "f:template": {
                "f:spec": {
                    "f:containers": {
                        'k:{"name":"app"}': {
                            "f:env": {'k:{"name":"DEBUG"}': {".": {}, "f:name": {}}}
                        }
                    }
                }
            }
        },
    }
    env = [{"name": "PORT", "value": "8000"}, {"name": "DEBUG", "value": "1"}]
    deployment: dict[str, Any] = {
        "metadata": {
            "labels": {"app": "a", "hotfix": "yes"},
            "managedFields": [
                _managed(FIELD_MANAGER, ours, "Apply"),
                _managed("kubectl-set", theirs),
                _managed("kube-controller-manager", {"f:metadata": {"f:annotations": {}}}),
                {**_managed("kube-controller-manager", {"f:status": {}}), "subresource": "status"},
            ],
        },
        "spec": {"template": {"spec": {"containers": [{"name": "app", "env": env}]}}},
    }
    assert foreign_owner(deployment) is None
    found = drift(deployment)
    assert found == [
        ("kubectl-set", ["metadata", "labels", "hotfix"]),
        ("kubectl-set", ["spec", "template", "spec", "containers", 0, "env", 1]),
    ]
    assert describe_drift(found) == (
        "kubectl-set: /metadata/labels/hotfix, /spec/template/spec/containers/0/env/1"
    )
    deployment["metadata"]["managedFields"] = [_managed("helm", ours)]
    assert foreign_owner(deployment) == "field managers helm"
    assert drift(deployment) == []  # nothing of ours to compare with
    deployment["metadata"]["managedFields"] = []  # a server without them: the label says
    assert foreign_owner(deployment) == "label managed-by=None"
    deployment["metadata"]["labels"]["app.kubernetes.io/managed-by"] = FIELD_MANAGER
    assert foreign_owner(deployment) is None

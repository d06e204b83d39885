"""The canary rollout (tasks/deploy/canary.py) against the REAL control plane
(tests/plugins/kube.py): the real Deployment, ReplicaSet and HPA controllers, RBAC and
server-side apply; its stand-in kubelet makes pods Ready or keeps an image broken.

No container runs there, so no traffic reaches the pods and no Prometheus scrapes them:
the analysis verdicts come from a real Prometheus configured like the stack's
(tests/prometheus.py), asked the policy's query for `<env>-canary`, which it has no data
for (inconclusive, never a pass), or a query it answers (the pass path).

Each test deploys its own production service (three stable replicas, the HPA's minimum);
no other module of the session's plane uses these pairs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import yaml
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from blocks.catalog import ServiceSpec
from blocks.config import PipelineConfig
from blocks.environments import EnvironmentSpec
from core.analysis import CANARY_SUFFIX, AnalysisCheck, AnalysisPolicy
from core.errors import AnalysisInconclusive
from core.records import DeployedService, ImageRef, PlannedChange, PromotionPlan
from tasks.analysis import AnalysisRun, initial_results, passed_verdicts, run_checks
from tasks.deploy.canary import (
    CanaryStopped,
    Verdicts,
    promote_canary,
    remove_stale_canaries,
)
from tasks.deploy.kubernetes import KubernetesDeployer
from tasks.deploy.target import DeployTarget
from tests.plugins.kube import KubeCluster
from tests.prometheus import running_prometheus
from tests.tasks.deploy.test_kubernetes_real import (
    DEADLINE_S,
    apps,
    bind_role,
    core,
    exists,
    image,
    target_for,
)

ENVIRONMENT = "production"
RBAC = Path(__file__).resolve().parents[3] / "deployments" / "worker" / "rbac.yaml"


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with running_prometheus(tmp_path_factory.mktemp("prometheus")) as url:
        yield url


def _target(kubeconfig: Path) -> DeployTarget:
    return DeployTarget(target="kubernetes", kubernetes=target_for(kubeconfig))


def _deployer(target: DeployTarget) -> KubernetesDeployer:
    deployer = target.deployer()
    assert isinstance(deployer, KubernetesDeployer)
    return deployer


def _plan(release: ImageRef, before: DeployedService) -> PromotionPlan:
    change = PlannedChange(
        service=release.service, current_digest=before.image.digest, image=release
    )
    return PromotionPlan(
        environment=ENVIRONMENT,
        source_environment="staging",
        release_id="r-canary",
        changes=[change],
        promoted_by="test",
    )


def _judge(
    prometheus: str, query: str, plan: PromotionPlan, seen: list[str]
) -> Callable[[list[ServiceSpec]], Verdicts]:
    """The policy's analysis of `<env>-canary` at the real Prometheus, as the promotion's
    judge runs it (without its load and artifact, which need a Prefect run)."""
    check = AnalysisCheck(name="canary", query=query, below=1)
    policy = AnalysisPolicy(checks=(check,), bake_s=0, interval_s=0.1, count=2)
    run = AnalysisRun(ENVIRONMENT, policy, prometheus, label=ENVIRONMENT + CANARY_SUFFIX)

    def judge(todo: list[ServiceSpec]) -> Verdicts:
        seen.extend(spec.name for spec in todo)
        digests = {spec.name: plan.change(spec.name).new_digest for spec in todo}
        return passed_verdicts(run, run_checks(run, initial_results(run, digests, {})))

    return judge


def _pods_behind_service(kube: KubeCluster, namespace: str, service: str) -> list[Any]:
    selector = core(kube).read_namespaced_service(service, namespace).spec.selector
    wanted = ",".join(f"{k}={v}" for k, v in sorted(selector.items()))
    pods = core(kube).list_namespaced_pod(namespace, label_selector=wanted).items
    return [p for p in pods if p.metadata.deletion_timestamp is None]


def _gone(kube: KubeCluster, namespace: str, service: str) -> bool:
    canary = service + CANARY_SUFFIX
    pods = core(kube).list_namespaced_pod(
        namespace, label_selector=f"app.kubernetes.io/name={service},track=canary"
    )
    return not exists(apps(kube).read_namespaced_deployment, canary, namespace) and not pods.items


def _generation(kube: KubeCluster, namespace: str, service: str) -> tuple[int, str, int]:
    """Stable's generation, image and replicas, as the server keeps them."""
    live = apps(kube).read_namespaced_deployment(service, namespace)
    return live.metadata.generation, live.spec.template.spec.containers[0].image, live.spec.replicas


class _Stable(NamedTuple):
    """A service's stable release, deployed in ENVIRONMENT, and the plan of its next one."""

    env: EnvironmentSpec
    spec: ServiceSpec
    target: DeployTarget
    deployer: KubernetesDeployer
    before: DeployedService
    generation: tuple[int, str, int]
    release: ImageRef
    plan: PromotionPlan


def _stable(kube: KubeCluster, config: PipelineConfig, service: str) -> _Stable:
    env, spec = config.environment(ENVIRONMENT), config.service(service)
    target = _target(kube.kubeconfig)
    deployer = _deployer(target)
    before = deployer.deploy(env, spec, image(service), deadline_s=DEADLINE_S)
    generation = _generation(kube, env.namespace, service)
    release = image(service)
    return _Stable(env, spec, target, deployer, before, generation, release, _plan(release, before))


def test_a_passing_canary_runs_under_the_service_then_stable_takes_its_digest(
    kube: KubeCluster, config: PipelineConfig, prometheus: str
) -> None:
    env, spec, target, deployer, before, stable_before, release, plan = _stable(
        kube, config, "payment"
    )
    judged: list[str] = []
    judge = _judge(prometheus, "vector(0)", plan, judged)

    def judge_and_look(todo: list[ServiceSpec]) -> Verdicts:
        canary = apps(kube).read_namespaced_deployment("payment-canary", env.namespace)
        assert canary.spec.replicas == 2
        assert canary.spec.template.metadata.labels["track"] == "canary"
        assert canary.status.available_replicas == 2
        behind = _pods_behind_service(kube, env.namespace, "payment")
        tracks = sorted(
            (p.metadata.labels.get("track", "stable"), p.spec.containers[0].image) for p in behind
        )
        assert (
            tracks == [("canary", release.reference)] * 2 + [("stable", before.image.reference)] * 3
        )
        assert _generation(kube, env.namespace, "payment") == stable_before
        return judge(todo)

    def deploy_stable(todo: list[ServiceSpec]) -> None:
        assert [s.name for s in todo] == ["payment"]
        deployer.deploy(env, spec, release, deadline_s=DEADLINE_S)

    verdicts = promote_canary(
        target, env, [spec], plan, {"payment": before}, (2,), (judge_and_look, deploy_stable)
    )

    assert judged == ["payment"]
    assert verdicts["payment"][0].startswith("passed at ")
    live = deployer.live(env, spec)
    assert live is not None
    assert live.image.digest == release.digest
    assert _gone(kube, env.namespace, "payment")
    assert {
        p.spec.containers[0].image for p in _pods_behind_service(kube, env.namespace, "payment")
    } == {release.reference}


def _canary_pods(kube: KubeCluster, namespace: str, service: str) -> list[str]:
    """The images of the Ready canary pods the Service selects."""
    return [
        p.spec.containers[0].image
        for p in _pods_behind_service(kube, namespace, service)
        if p.metadata.labels.get("track") == "canary"
        and any(c.type == "Ready" and c.status == "True" for c in p.status.conditions or [])
    ]


def test_a_canary_in_steps_is_judged_at_each_then_stable_takes_its_digest(
    kube: KubeCluster, config: PipelineConfig, prometheus: str
) -> None:
    """`canary_replicas: [1, 2]`: one canary pod beside stable's three, judged; then two,
    judged again; only then stable. Stable is never written before."""
    env, spec, target, deployer, before, stable_before, release, plan = _stable(
        kube, config, "assessment"
    )
    judged: list[str] = []
    judge = _judge(prometheus, "vector(0)", plan, judged)
    seen: list[list[str]] = []

    def judge_and_look(todo: list[ServiceSpec]) -> Verdicts:
        seen.append(_canary_pods(kube, env.namespace, "assessment"))
        assert _generation(kube, env.namespace, "assessment") == stable_before
        return judge(todo)

    def deploy_stable(todo: list[ServiceSpec]) -> None:
        deployer.deploy(env, spec, release, deadline_s=DEADLINE_S)

    steps = (judge_and_look, deploy_stable)
    promote_canary(target, env, [spec], plan, {"assessment": before}, (1, 2), steps)

    assert seen == [[release.reference], [release.reference] * 2]
    assert judged == ["assessment", "assessment"]
    live = deployer.live(env, spec)
    assert live is not None
    assert live.image.digest == release.digest
    assert _gone(kube, env.namespace, "assessment")


def test_a_canary_failing_at_its_second_step_is_removed_stable_untouched(
    kube: KubeCluster, config: PipelineConfig, prometheus: str
) -> None:
    """The first step passes, the second's analysis fails: the canary (two pods by then)
    goes, stable serves alone on its old image, never written."""
    env, spec, target, _, before, stable_before, _, plan = _stable(kube, config, "api-gateway")
    passing = _judge(prometheus, "vector(0)", plan, [])
    failing = _judge(prometheus, "vector(5)", plan, [])  # 5 is not below the limit of 1
    calls: list[int] = []

    def judge(todo: list[ServiceSpec]) -> Verdicts:
        calls.append(len(_canary_pods(kube, env.namespace, "api-gateway")))
        return (passing if len(calls) == 1 else failing)(todo)

    def deploy_stable(todo: list[ServiceSpec]) -> None:
        raise AssertionError(todo)

    with pytest.raises(CanaryStopped) as caught:
        promote_canary(
            target, env, [spec], plan, {"api-gateway": before}, (1, 2), (judge, deploy_stable)
        )

    assert calls == [1, 2]
    message = str(caught.value)
    assert "vector(5)" in message, message  # the failed check's query is named
    assert "canary removed, the stable release was never changed" in message
    assert _gone(kube, env.namespace, "api-gateway")
    assert _generation(kube, env.namespace, "api-gateway") == stable_before
    assert {
        p.spec.containers[0].image for p in _pods_behind_service(kube, env.namespace, "api-gateway")
    } == {before.image.reference}


def test_a_canary_without_data_is_inconclusive_and_removed_stable_untouched(
    kube: KubeCluster, config: PipelineConfig, prometheus: str
) -> None:
    env, spec, target, _, before, stable_before, _, plan = _stable(kube, config, "content")
    judged: list[str] = []
    query = 'up{environment="$environment",service="$service"}'  # nothing scrapes the canary
    judge = _judge(prometheus, query, plan, judged)

    def deploy_stable(todo: list[ServiceSpec]) -> None:
        raise AssertionError(todo)

    with pytest.raises(CanaryStopped) as caught:
        promote_canary(target, env, [spec], plan, {"content": before}, (1,), (judge, deploy_stable))

    assert judged == ["content"]
    assert isinstance(caught.value.__cause__, AnalysisInconclusive)
    message = str(caught.value)
    assert 'up{environment="production-canary",service="content"}' in message
    assert "never a pass" in message
    assert "canary removed, the stable release was never changed" in message
    assert _gone(kube, env.namespace, "content")
    assert _generation(kube, env.namespace, "content") == stable_before


def test_a_canary_that_cannot_start_is_removed_before_any_judgement(
    kube: KubeCluster, kubelet_marks: dict[str, str], config: PipelineConfig, prometheus: str
) -> None:
    env, spec, target, _, before, stable_before, bad, plan = _stable(kube, config, "enrollment")
    kubelet_marks[bad.digest] = "ImagePullBackOff"
    judged: list[str] = []

    def deploy_stable(todo: list[ServiceSpec]) -> None:
        raise AssertionError(todo)

    steps = (_judge(prometheus, "vector(0)", plan, judged), deploy_stable)
    with pytest.raises(CanaryStopped, match=r"new pods cannot start: .*ImagePullBackOff"):
        promote_canary(target, env, [spec], plan, {"enrollment": before}, (1,), steps)

    assert judged == []
    assert _gone(kube, env.namespace, "enrollment")
    assert _generation(kube, env.namespace, "enrollment") == stable_before
    assert {
        p.spec.containers[0].image for p in _pods_behind_service(kube, env.namespace, "enrollment")
    } == {before.image.reference}


def _worker_kubeconfig(kube: KubeCluster, namespace: str, folder: Path) -> Path:
    """Credentials bound to the worker's own Role (deployments/worker/rbac.yaml) in
    `namespace`, and nothing else."""
    rbac = client.RbacAuthorizationV1Api(kube.admin)
    (role,) = [
        doc
        for doc in yaml.safe_load_all(RBAC.read_text(encoding="utf-8"))
        if doc["kind"] == "Role" and doc["metadata"]["namespace"] == namespace
    ]
    try:
        rbac.create_namespaced_role(namespace, role)
    except ApiException as exc:
        if exc.status != 409:
            raise
    bind_role(rbac, namespace, "elice-deployer", "canary-worker")
    return kube.client_kubeconfig("canary-worker", folder / "canary-worker")


def test_a_canary_a_dead_run_left_is_no_drift_and_the_next_run_removes_it(
    kube: KubeCluster, config: PipelineConfig, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """With the worker's Role alone: the canary started, stable read without drift while
    it runs, and the stale canary found and removed."""
    env, spec = config.environment(ENVIRONMENT), config.service("user")
    before = _deployer(_target(kube.kubeconfig)).deploy(
        env, spec, image("user"), deadline_s=DEADLINE_S
    )
    target = _target(_worker_kubeconfig(kube, env.namespace, tmp_path))
    worker = _deployer(target)
    worker.start_canary(env, spec, image("user"), 1)  # the run dies here

    caplog.set_level(logging.WARNING)
    live = worker.live(env, spec)
    assert live is not None
    assert live.image.digest == before.image.digest
    assert "drift" not in caplog.text
    assert worker.canaries(env) == ["user"]

    catalog = {s.name: s for s in config.catalog.services}
    assert remove_stale_canaries(target, env, catalog) == ["user"]
    assert _gone(kube, env.namespace, "user")
    assert worker.canaries(env) == []
    assert remove_stale_canaries(target, env, catalog) == []

"""Promotion on the kubernetes target, end to end, from one configuration switch.

The same `promote` flow as on the docker target; the configuration says `target:
kubernetes` for both environments, and kd-stg keeps its images in its own registry (a
real docker-registry behind htpasswd): promotion copies them there by digest and the
cluster is given that reference. The cluster is the API-server SIMULATOR
(tests/k8s_sim: no real API server runs on these machines), reached with a kubeconfig
saved by `cicd setup`'s code as a secret block; health checks and baselines go through
its service proxy, on loopback with the kubeconfig's token. The images are real ones
in the local registry (promotion verifies their digests and labels there).

Own environments kd-dev -> kd-stg, rendered from a copy of deployments/ whose dev and
staging overlays carry those names (namespaces elice-devops-dev and -stg).
"""

from __future__ import annotations

import base64
import json
import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import docker
import pytest
import yaml
from prefect.client.orchestration import get_client
from prefect.states import State
from typer.testing import CliRunner

from blocks.config import PipelineConfig, load_config
from blocks.kubernetes_target import KubernetesTarget
from blocks.stack import StackInfo
from cicd.cli import app
from core.errors import PromotionError, PromotionRolledBack
from core.records import ImageRef
from flows.ci import ci, ci_outcome
from flows.health import health_check
from flows.promotion import promote, rollback
from tasks.deploy.kubernetes import KubernetesDeployer
from tasks.deploy.pull_secret import PULL_NAME
from tasks.deploy.target import KUBERNETES_TARGET_BLOCK, block_digest
from tests.flows.chain import derive, put_release, write_chain_config
from tests.k8s_sim import CRASH, KubeSimulator
from tests.ledgers import current_ledger
from tests.plugins.faults import Fault, FaultProxy
from tests.plugins.registries import AuthRegistry
from tests.tasks.ci_checkout import copy_monorepo, pinned

pytestmark = pytest.mark.stack

DEV, STG = "kd-dev", "kd-stg"
SERVICES = ["course", "auth"]
REPO = Path(__file__).resolve().parents[2]


@dataclass
class Cluster:
    sim: KubeSimulator
    cfg: PipelineConfig
    cfg_path: str
    target: KubernetesTarget
    d1: ImageRef
    d2: ImageRef
    stg_registry: AuthRegistry

    def in_stg(self, image: ImageRef, service: str) -> str:
        """`image` of `service` as kd-stg's registry holds it."""
        return f"{self.stg_registry.block.repository(service)}@{image.digest}"

    def image(self, env: str, service: str) -> str | None:
        namespace = self.cfg.environment(env).namespace
        deployment = self.sim.get("deployments", namespace, service)
        if deployment is None:
            return None
        image: str = deployment["spec"]["template"]["spec"]["containers"][0]["image"]
        return image


STG_REGISTRY = "test-registry-kd-stg"


def simulated_target(
    sim: KubeSimulator, folder: Path, context: str, envs: tuple[str, str]
) -> KubernetesTarget:
    """The simulator's target, saved as the block: the repository's deployments copied to
    `folder` with the dev and staging overlays named after `envs`, health via the proxy."""
    tree = folder / "deployments"
    shutil.copytree(REPO / "deployments", tree)
    (tree / "overlays" / "dev").rename(tree / "overlays" / envs[0])
    (tree / "overlays" / "staging").rename(tree / "overlays" / envs[1])
    kubeconfig = sim.kubeconfig(folder / "kubeconfig", context=context)
    target = KubernetesTarget.from_kubeconfig(kubeconfig).model_copy(
        update={"deployments_dir": str(tree), "poll_interval_s": 0.05, "health_via": "proxy"}
    )
    target.save(KUBERNETES_TARGET_BLOCK, overwrite=True)
    return target


def _config(path: Path) -> str:
    extra = {
        DEV: {"namespace": "elice-devops-dev", "target": "kubernetes"},
        STG: {
            "namespace": "elice-devops-stg",
            "target": "kubernetes",
            "replicas": {"min": 2, "max": 5},
            "registry": {"kind": "oci", "block": STG_REGISTRY},
        },
    }
    return write_chain_config(
        path, [(DEV, 37100), (STG, 37600)], [("course", 8004), ("auth", 8002)], **extra
    )


@pytest.fixture
def cluster(
    tmp_path: Path,
    stack: StackInfo,
    docker_client: docker.DockerClient,
    pushed_image: ImageRef,
    basic_registry: AuthRegistry,
) -> Iterator[Cluster]:
    """kd-dev runs a verified D1 of both services in the simulated cluster."""
    basic_registry.block.save(STG_REGISTRY, overwrite=True)
    with KubeSimulator() as sim:
        target = simulated_target(sim, tmp_path, "kd", (DEV, STG))
        cfg_path = _config(tmp_path / "pipeline.yaml")
        cfg = load_config(cfg_path)
        d1 = pushed_image
        d2 = derive(docker_client, pushed_image, "kubernetes")
        deployer = KubernetesDeployer(target)
        for service in SERVICES:
            put_release(deployer, cfg, DEV, service, d1, release_id=f"seed-{d1.short}")
        try:
            yield Cluster(sim, cfg, cfg_path, target, d1, d2, basic_registry)
        finally:
            with get_client(sync_client=True) as client:
                for name, slug in (
                    (KUBERNETES_TARGET_BLOCK, "elice-kubernetes-target"),
                    (STG_REGISTRY, "elice-oci-registry"),
                ):
                    document = client.read_block_document_by_name(name, slug)
                    client.delete_block_document(document.id)


def _promote(c: Cluster) -> State[Any]:
    return promote(
        environment=STG,
        config_source=c.cfg_path,
        promoted_by="ci",
        health_deadline_s=30,
        return_state=True,
    )


def test_promotion_ships_to_kubernetes_and_a_failed_release_rolls_back(cluster: Cluster) -> None:
    c = cluster
    # D1 into kd-stg: applied in the cluster, checked through the service proxy
    state = _promote(c)
    assert state.is_completed(), state.message
    for service in SERVICES:
        # copied into kd-stg's own registry, and the cluster runs it from there
        assert c.image(STG, service) == c.in_stg(c.d1, service)
        record = current_ledger().current(STG).services[service]
        assert record.image.digest == c.d1.digest
        assert record.image.reference == c.in_stg(c.d1, service)
        # the source was smoke-tested and the target verified, both through the proxy
        assert ("elice-devops-dev", service, "/version") in c.sim.proxied
        assert ("elice-devops-stg", service, "/version") in c.sim.proxied
        # pulled with kd-stg's registry login: the namespace's pull secret, named by the pods
        pod = c.sim.get("deployments", "elice-devops-stg", service)["spec"]["template"]["spec"]
        assert pod["imagePullSecrets"] == [{"name": PULL_NAME}]
    secret = c.sim.get("secrets", "elice-devops-stg", PULL_NAME)
    assert secret is not None
    auths = json.loads(base64.b64decode(secret["data"][".dockerconfigjson"]))["auths"]
    assert auths[c.stg_registry.address]["password"] == c.stg_registry.password
    recorded = current_ledger().current(STG)

    # D2 runs in kd-dev; in kd-stg its pods crash: the deploy fails on their reason and
    # every service of the release is back on D1
    deployer = KubernetesDeployer(c.target)
    for service in SERVICES:
        put_release(deployer, c.cfg, DEV, service, c.d2, release_id=f"seed-{c.d2.short}")
    c.sim.bad_images[c.d2.digest] = CRASH  # the pods already ready in kd-dev keep running
    failed = _promote(c)
    error = failed.result(raise_on_failure=False)
    assert isinstance(error, PromotionRolledBack), error
    assert "CrashLoopBackOff" in str(error)
    for service in SERVICES:
        assert c.image(STG, service) == c.in_stg(c.d1, service)
    # the attempt is on record (begun, rolled back); what serves is recorded unchanged
    after = current_ledger().current(STG)
    assert after.revision == recorded.revision + 2
    assert after.in_progress is None
    assert after.services == recorded.services


def test_ci_delivers_to_kubernetes_through_the_same_target(
    cluster: Cluster, tmp_path: Path
) -> None:
    repo = copy_monorepo(tmp_path / "repo", ["auth"])
    saved = KubernetesTarget.load(KUBERNETES_TARGET_BLOCK)  # the host pins the target it uses
    pin = {KUBERNETES_TARGET_BLOCK: block_digest(saved)}
    with pinned(repo, blocks=pin):  # its commit pushed to the pinned repository: it ships
        state = ci(
            services=["auth"],
            repo=str(repo),
            deliver=True,
            environment=DEV,
            config_source=cluster.cfg_path,
            return_state=True,
        )
    outcome = ci_outcome(state)
    assert outcome is not None, state.message
    stages = {r.stage: r for r in outcome.results if r.service == "auth"}
    for stage in ("image", "deploy", "health", "record"):
        assert stages[stage].status == "passed", (stage, stages[stage].summary)
    record = current_ledger().current(DEV).services["auth"]
    assert record.commit == outcome.commit
    # applied in the cluster, pinned by digest, and checked through the service proxy
    assert cluster.image(DEV, "auth") == record.image.reference
    assert ("elice-devops-dev", "auth", "/version") in cluster.sim.proxied


def _proxied_target(
    c: Cluster, fault_proxy: type[FaultProxy], folder: Path, **settings: float
) -> FaultProxy:
    """The saved kubernetes target reaches the cluster's API through a fault proxy (with
    `settings` of the target's changed); the proxy."""
    proxy = fault_proxy(c.sim.url.removeprefix("http://"))
    kubeconfig = c.sim.kubeconfig(folder / "proxied-kubeconfig", context="kd")
    document = yaml.safe_load(kubeconfig.read_text(encoding="utf-8"))
    document["clusters"][0]["cluster"]["server"] = f"http://{proxy.address}"
    kubeconfig.write_text(yaml.safe_dump(document), encoding="utf-8")
    proxied = KubernetesTarget.from_kubeconfig(kubeconfig).model_copy(
        update={
            "deployments_dir": c.target.deployments_dir,
            "poll_interval_s": 0.05,
            "health_via": "proxy",
            **settings,
        }
    )
    proxied.save(KUBERNETES_TARGET_BLOCK, overwrite=True)
    return proxy


def test_a_kubernetes_api_outage_during_the_deploy_is_waited_out(
    cluster: Cluster, fault_proxy: type[FaultProxy], tmp_path: Path
) -> None:
    """The cluster's API behind the fault proxy for a whole promotion: 503s on the first
    applies of kd-stg's Deployments, then, once they got through, every connection
    refused for 6 s (an API server restarting). The deployer waits both out within its
    retry budget (120 s): the release ships, nothing is rolled back, and the ledger
    records it once."""
    c = cluster
    proxy = _proxied_target(c, fault_proxy, tmp_path)
    stg_deployments = r"/apis/apps/v1/namespaces/elice-devops-stg/deployments/"
    burst = proxy.inject(Fault("status", path=stg_deployments, method="PATCH", times=2))
    outages: list[Fault] = []

    def restart_once_applying() -> None:
        """The API server goes away once the applies got through the 503s."""
        deadline = time.monotonic() + 300
        while burst.fired < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        outages.append(proxy.inject(Fault("refuse", times=None, window=6.0)))

    threading.Thread(target=restart_once_applying, daemon=True).start()
    before = current_ledger().current(STG)

    state = _promote(c)

    assert state.is_completed(), state.message
    assert burst.fired == 2, proxy.requests[-20:]
    assert outages, "the outage never started"
    assert outages[0].fired > 0, proxy.requests[-20:]
    for service in SERVICES:
        assert c.image(STG, service) == c.in_stg(c.d1, service)
    after = current_ledger().current(STG)
    assert after.in_progress is None
    assert after.revision == before.revision + 2  # the intent, then the release
    assert {s: r.image.digest for s, r in after.services.items()} == dict.fromkeys(
        SERVICES, c.d1.digest
    )


def test_a_kubernetes_api_outage_longer_than_the_retry_budget_is_undone_by_the_next_run(
    cluster: Cluster, fault_proxy: type[FaultProxy], tmp_path: Path
) -> None:
    """kd-stg runs D1; D2 is promoted while the API server refuses every connection from
    the first apply of a Deployment on, for longer than the deployer's retry budget. The
    budget is the target's `api_retry_budget_s`, lowered here to 1 s (production: 120 s,
    longer than an API server restart): the deploy fails, its rollback cannot reach the
    API either, and the promotion fails saying so, the ledger keeping the release under
    way. The API back, the next `rollback` run finds that intent and puts D1 back."""
    c = cluster
    deployer = KubernetesDeployer(c.target)
    for service in SERVICES:
        put_release(deployer, c.cfg, STG, service, c.d1, release_id=f"seed-{c.d1.short}")
        put_release(deployer, c.cfg, DEV, service, c.d2, release_id=f"seed-{c.d2.short}")
    before = current_ledger().current(STG)
    settings = {"api_retry_budget_s": 1.0, "retries": 1, "retry_backoff_s": 0.05}
    proxy = _proxied_target(c, fault_proxy, tmp_path, **settings)
    applied = proxy.inject(
        Fault("delay", path=r"/namespaces/elice-devops-stg/deployments/", method="PATCH")
    )
    outage = Fault("refuse", times=None, window=20.0)

    def down_once_applying() -> None:
        deadline = time.monotonic() + 300
        while applied.fired < 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        proxy.inject(outage)

    threading.Thread(target=down_once_applying, daemon=True).start()

    failed = _promote(c)

    error = failed.result(raise_on_failure=False)
    assert failed.is_failed(), failed.message
    assert isinstance(error, PromotionError), repr(error)
    assert not isinstance(error, PromotionRolledBack), error
    assert outage.fired > 0, proxy.requests[-20:]
    assert outage.started is not None
    assert time.monotonic() < outage.started + outage.window  # failed within the outage
    assert "no answer from the API server" in str(error), error
    assert "under way" in str(error), error
    pending = current_ledger().current(STG)
    assert pending.in_progress is not None  # the intent stays for the next run
    assert pending.services == before.services
    time.sleep(max(outage.started + outage.window - time.monotonic(), 0) + 0.5)

    restored = rollback(environment=STG, config_source=c.cfg_path, return_state=True)

    assert restored.is_completed(), restored.message
    assert restored.result() == dict.fromkeys(SERVICES, c.d1.digest)
    for service in SERVICES:
        assert str(c.image(STG, service)).endswith(f"@{c.d1.digest}")
    after = current_ledger().current(STG)
    assert after.in_progress is None
    assert after.services == before.services


def _secret_writes(sim: KubeSimulator) -> list[tuple[str, str]]:
    """Every request that wrote a Secret (created, replaced, patched or deleted it)."""
    return [
        (method, path)
        for method, path in sim.arrivals
        if "/secrets" in path and method in {"POST", "PUT", "PATCH", "DELETE"}
    ]


def test_cicd_health_run_by_hand_never_writes_the_pull_secret(cluster: Cluster) -> None:
    """Only the scheduled health check (prefect.yaml's health-check deployment sets
    `refresh_pull_secret: true`) renews the namespace's pull secret: `cicd health`,
    typed by someone holding other credentials, only reads. kd-stg's registry has a
    login and its namespace no pull secret yet, so a health check that refreshes it
    writes one (checked last, so this test can fail)."""
    c = cluster
    deployer = KubernetesDeployer(c.target)  # no registry login: it writes no Secret
    for service in SERVICES:
        put_release(deployer, c.cfg, STG, service, c.d1, release_id=f"seed-{c.d1.short}")
    namespace = c.cfg.environment(STG).namespace
    assert c.sim.get("secrets", namespace, PULL_NAME) is None

    by_hand = CliRunner().invoke(app, ["health", STG, "--config", c.cfg_path])

    assert by_hand.exit_code == 0, by_hand.output
    assert f"{STG}: {len(SERVICES)} services healthy" in by_hand.output
    assert _secret_writes(c.sim) == []
    assert c.sim.get("secrets", namespace, PULL_NAME) is None

    scheduled = health_check(
        environment=STG, config_source=c.cfg_path, refresh_pull_secret=True, return_state=True
    )
    assert scheduled.is_completed(), scheduled.message
    assert _secret_writes(c.sim) != []
    assert c.sim.get("secrets", namespace, PULL_NAME) is not None

"""A canary promotion on the kubernetes target, end to end: the `promote` and `rollback`
flows on the real stack (Prefect server, registry, images), a pinned policy repository
whose `config/approvals.yaml` gives kc-stg's analysis `rollout: canary`, and the
Kubernetes API-server SIMULATOR (tests/k8s_sim).

The simulator's service proxy answers from the pods of the Deployment named like the
Service, and no Prometheus scrapes its pods: a canary's share of traffic and its analysis
cannot be shown here (the real control plane's tests, tests/tasks/deploy/
test_canary_real.py, judge canaries with a real Prometheus). What this shows is the flows'
path: a first release takes no canary, a canary that cannot start stops the release
(audited `canary_stopped`, stable never written, no canary left), and a dead run's canary
is removed by the next run under the deploy lock.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import docker
import pytest

from blocks.config import PipelineConfig, load_config
from blocks.stack import StackInfo
from blocks.storage import ledger_filesystem
from core.errors import PromotionRefused, PromotionRolledBack
from core.records import ImageRef
from core.settings import Settings
from flows.promotion import promote, rollback
from tasks.audit import read_audit
from tasks.deploy.kubernetes import KubernetesDeployer
from tasks.deploy.target import KUBERNETES_TARGET_BLOCK, block_digest
from tests.approvers import Approvers
from tests.flows.chain import as_service, derive, put_release, write_chain_config
from tests.flows.test_analysis_promotion import ANALYSIS
from tests.flows.test_kubernetes_promotion import simulated_target
from tests.k8s_sim import CRASH, KubeSimulator
from tests.ledgers import current_ledger
from tests.trust import pin_repository

pytestmark = pytest.mark.stack

DEV, STG = "kc-dev", "kc-stg"
SERVICE = "course"
STG_NAMESPACE = "elice-devops-stg"


@dataclass
class Canary:
    sim: KubeSimulator
    cfg: PipelineConfig
    cfg_path: str
    deployer: KubernetesDeployer
    d1: ImageRef
    d2: ImageRef

    def stable(self) -> tuple[str, int]:
        """kc-stg's stable Deployment: its image and generation."""
        deployment = self.sim.get("deployments", STG_NAMESPACE, SERVICE)
        assert deployment is not None
        image = deployment["spec"]["template"]["spec"]["containers"][0]["image"]
        return str(image), int(deployment["metadata"]["generation"])

    def canary_left(self) -> bool:
        return self.sim.get("deployments", STG_NAMESPACE, SERVICE + "-canary") is not None


@pytest.fixture
def canary(
    tmp_path: Path,
    stack: StackInfo,  # the stack's registry and Prefect server
    docker_client: docker.DockerClient,
    pushed_image: ImageRef,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[Canary]:
    """kc-dev runs a verified D1 in the simulated cluster; kc-stg's policy is a canary."""
    with KubeSimulator() as sim:
        target = simulated_target(sim, tmp_path, "kc", (DEV, STG))
        people = Approvers(tmp_path, ["alice"])
        people.set_policy({}, analysis={STG: ANALYSIS | {"rollout": "canary"}})
        blocks = {KUBERNETES_TARGET_BLOCK: block_digest(target)}
        pin_repository(monkeypatch, tmp_path, people.bare, environments=(DEV, STG), blocks=blocks)
        extra = {
            DEV: {"namespace": "elice-devops-dev", "target": "kubernetes"},
            STG: {"namespace": STG_NAMESPACE, "target": "kubernetes"},
        }
        cfg_path = write_chain_config(
            tmp_path / "pipeline.yaml", [(DEV, 14100), (STG, 14600)], [(SERVICE, 8004)], **extra
        )
        cfg = load_config(cfg_path)
        deployer = KubernetesDeployer(target)
        d2 = derive(docker_client, pushed_image, "canary")
        put_release(deployer, cfg, DEV, SERVICE, pushed_image, release_id="seed-d1")
        yield Canary(sim, cfg, cfg_path, deployer, pushed_image, d2)


def test_a_canary_that_cannot_start_stops_the_release_and_a_dead_runs_canary_goes(
    canary: Canary,
) -> None:
    c = canary
    # a first release has no stable to run a canary beside: it deploys, then is verified
    first = promote(environment=STG, config_source=c.cfg_path, promoted_by="ci", return_state=True)
    assert first.is_completed(), first.message
    image, generation = c.stable()
    assert image.endswith(c.d1.digest)
    assert not c.canary_left()
    recorded = current_ledger().current(STG)

    # D2 crashes in kc-stg: its canary never becomes Ready and stable is never written
    put_release(c.deployer, c.cfg, DEV, SERVICE, c.d2, release_id="seed-d2")
    c.sim.bad_images[c.d2.digest] = CRASH
    failed = promote(environment=STG, config_source=c.cfg_path, promoted_by="ci", return_state=True)
    error = failed.result(raise_on_failure=False)
    assert isinstance(error, PromotionRolledBack), error
    assert "canary stopped in kc-stg" in str(error)
    assert "CrashLoopBackOff" in str(error)
    assert c.stable() == (image, generation)
    assert not c.canary_left()
    after = current_ledger().current(STG)
    assert after.services == recorded.services
    assert after.in_progress is None
    store = ledger_filesystem(Settings.from_environ())
    entries = read_audit(store, STG)
    assert [e.kind for e in entries[-2:]] == ["switched", "canary_stopped"], entries
    assert entries[-2].detail == "no stable release to run a canary beside"
    assert "CrashLoopBackOff" in entries[-1].detail

    # a run died at its canary step: the next run of kc-stg (here a rollback) removes it
    env, spec = c.cfg.environment(STG), c.cfg.service(SERVICE)
    c.sim.bad_images.clear()
    c.deployer.start_canary(env, spec, as_service(c.d2, SERVICE), 1)
    assert c.canary_left()
    back = rollback(environment=STG, config_source=c.cfg_path, return_state=True)
    assert isinstance(back.result(raise_on_failure=False), PromotionRefused)  # nothing before
    assert not c.canary_left()
    assert c.stable() == (image, generation)

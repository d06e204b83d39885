"""Faults at the engine during a promotion's deploys, injected by a proxy in front of the
real Docker API: whatever the engine does (refuse, drop a connection mid-answer, answer
500), every service of the release goes back, the previous release serves, and the
ledger says what happened. Own environments (fd-dev -> fd-stg, host ports 40xxx).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import docker
import httpx
import pytest

from blocks.config import PipelineConfig, load_config
from blocks.stack import StackInfo
from core.errors import PromotionRolledBack
from core.records import ImageRef
from flows.promotion import promote, rollback
from tasks.deploy.docker import DockerDeployer
from tasks.health import probe_health
from tests.flows.chain import SERVICES, derive, put_verified, remove_containers, write_chain_config
from tests.ledgers import current_ledger
from tests.plugins.faults import Fault, FaultProxy

pytestmark = pytest.mark.stack

DEV, STG = "fd-dev", "fd-stg"


@pytest.fixture
def releases(
    tmp_path: Path,
    stack: StackInfo,
    docker_client: docker.DockerClient,
    pushed_image: ImageRef,
    fault_proxy: type[FaultProxy],
) -> Iterator[tuple[PipelineConfig, str, ImageRef, FaultProxy]]:
    """fd-stg serves D1 of both services; fd-dev holds a verified D2; the pipeline reaches
    the engine only through the proxy."""
    assert stack.docker_host.startswith("unix://"), stack.docker_host
    proxy = fault_proxy(stack.docker_host.removeprefix("unix://"))
    mp = pytest.MonkeyPatch()
    mp.setenv("DOCKER_HOST", f"tcp://{proxy.address}")
    cfg_path = write_chain_config(tmp_path / "pipeline.yaml", [(DEV, 32100), (STG, 32600)])
    cfg = load_config(cfg_path)
    remove_containers(docker_client, [DEV, STG])
    d2 = derive(docker_client, pushed_image, "engine-fault")
    for service in SERVICES:
        put_verified(cfg, STG, service, pushed_image)
        put_verified(cfg, DEV, service, d2)
    yield cfg, cfg_path, pushed_image, proxy
    remove_containers(docker_client, [DEV, STG])
    mp.undo()


def _serving(cfg: PipelineConfig, env: str) -> dict[str, str | None]:
    deployer = DockerDeployer()
    out: dict[str, str | None] = {}
    for name in SERVICES:
        spec = cfg.service(name)
        address = deployer.address(cfg.environment(env), spec)
        ok = probe_health(address, spec, deadline_s=10).ok
        out[name] = httpx.get(f"{address}/version", timeout=10).json()["digest"] if ok else None
    return out


@pytest.mark.parametrize(
    "fault",
    [
        pytest.param(Fault("refuse", method="POST", path=r"/containers/create"), id="refused"),
        pytest.param(
            Fault("drop", method="POST", path=r"/containers/[^/]+/start", after_bytes=0),
            id="dropped-mid-start",
        ),
        pytest.param(
            Fault("status", method="POST", path=r"/containers/create", status=500), id="500"
        ),
    ],
)
def test_an_engine_fault_mid_deploy_rolls_back_every_service(
    releases: tuple[PipelineConfig, str, ImageRef, FaultProxy], fault: Fault
) -> None:
    cfg, cfg_path, d1, proxy = releases
    recorded = current_ledger().current(STG)
    # The second service's container is hit: the first may already serve the new release.
    proxy.inject(dataclasses.replace(fault, first=2))
    state = promote(
        environment=STG,
        config_source=cfg_path,
        promoted_by="ci",
        health_deadline_s=30,
        return_state=True,
    )
    assert state.is_failed(), state.message
    error = state.result(raise_on_failure=False)
    assert isinstance(error, PromotionRolledBack), repr(error)
    assert proxy.faults[0].fired == 1
    assert error.restored == dict.fromkeys(SERVICES, d1.digest)
    assert "serving again" in str(error)
    assert _serving(cfg, STG) == dict.fromkeys(SERVICES, d1.digest)
    after = current_ledger().current(STG)
    assert after.in_progress is None
    assert "rolled back" in after.change
    assert after.services == recorded.services


def test_an_engine_fault_mid_rollback_puts_back_what_served(
    releases: tuple[PipelineConfig, str, ImageRef, FaultProxy],
) -> None:
    """A rollback writes its intent first and is all or nothing too: the second service's
    restore refused, the first goes back to what served before the rollback, the ledger
    is unchanged but for the note; the next rollback, unhindered, returns both."""
    cfg, cfg_path, d1, proxy = releases
    shipped = promote(
        environment=STG, config_source=cfg_path, promoted_by="ci", health_deadline_s=30
    )
    d2 = shipped.plan.changes[0].image.digest
    assert _serving(cfg, STG) == dict.fromkeys(SERVICES, d2)
    recorded = current_ledger().current(STG)
    proxy.inject(Fault("refuse", method="POST", path=r"/containers/create", first=2))
    state = rollback(environment=STG, config_source=cfg_path, return_state=True)
    assert state.is_failed(), state.message
    error = state.result(raise_on_failure=False)
    assert isinstance(error, PromotionRolledBack), repr(error)
    assert proxy.faults[0].fired == 1
    assert error.restored == dict.fromkeys(SERVICES, d2)
    assert _serving(cfg, STG) == dict.fromkeys(SERVICES, d2)
    after = current_ledger().current(STG)
    assert after.in_progress is None
    assert "the rollback failed" in after.change
    assert after.services == recorded.services
    assert after.previous == recorded.previous
    back = rollback(environment=STG, config_source=cfg_path, requested_by="oncall")
    assert back == dict.fromkeys(SERVICES, d1.digest)
    assert _serving(cfg, STG) == dict.fromkeys(SERVICES, d1.digest)
    final = current_ledger().current(STG)
    assert final.in_progress is None
    assert "rolled back to their previous releases by oncall" in final.change

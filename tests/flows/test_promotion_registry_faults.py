"""Faults at the registry during a promotion: fr-dev's registry is the stack's registry
reached through the fault proxy (an OciRegistry block of its own), so the image check
(HEAD and GET of the manifest, the config blob) and skopeo's copy into fr-stg's registry
(the stack's, directly) both read through it.

A blip (5xx, a refused or dropped connection, a slow answer, an answer later than the
registry block's `timeout_s`) is retried and the promotion goes through; a refusal (403)
is not retried, and the promotion stops before anything deploys: the previous release
serves and the ledger records nothing. Own environments (fr-dev -> fr-stg, host ports
336xx/388xx).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import docker
import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import State

from blocks.config import PipelineConfig, load_config
from blocks.registry import OciRegistry
from blocks.stack import StackInfo
from core.errors import RegistryError
from core.records import ImageRef, PromotionOutcome
from flows.promotion import promote
from tasks.releases import EnvironmentState
from tests.flows.chain import SERVICES, derive, put_verified, remove_containers, write_chain_config
from tests.flows.test_promotion_faults import serving
from tests.ledgers import current_ledger
from tests.plugins.faults import Fault, FaultProxy

pytestmark = pytest.mark.stack

DEV, STG = "fr-dev", "fr-stg"
DEV_REGISTRY = "test-registry-fr-dev"
# both services run the image of course's repository: after the image check's two GETs
# of its manifest, skopeo's reads of it (one per copy)
STALL_TIMEOUT_S = 5
"""fr-dev's registry block's timeout: a request answered later is cut and retried."""
COPY_READ = {"method": "GET", "path": r"/elice/course/manifests/sha256:", "first": 3}


@pytest.fixture
def releases(
    tmp_path: Path,
    stack: StackInfo,
    docker_client: docker.DockerClient,
    pushed_image: ImageRef,
    fault_proxy: type[FaultProxy],
) -> Iterator[tuple[PipelineConfig, str, ImageRef, ImageRef, FaultProxy]]:
    """fr-stg serves D1; fr-dev holds a verified D2 (both services run the image of
    course's repository), recorded where fr-dev's registry (the proxy) serves it."""
    proxy = fault_proxy(stack.registry)
    mp = pytest.MonkeyPatch()
    mp.setenv("DOCKER_HOST", stack.docker_host)
    OciRegistry(address=proxy.address, insecure=True, timeout_s=STALL_TIMEOUT_S).save(
        DEV_REGISTRY, overwrite=True
    )
    cfg_path = write_chain_config(
        tmp_path / "pipeline.yaml",
        [(DEV, 25600), (STG, 30800)],
        None,
        **{DEV: {"registry": {"kind": "oci", "block": DEV_REGISTRY}}},
    )
    cfg = load_config(cfg_path)
    remove_containers(docker_client, [DEV, STG])
    d2 = derive(docker_client, pushed_image, "registry-fault")
    for service in SERVICES:
        put_verified(cfg, STG, service, pushed_image)
        put_verified(cfg, DEV, service, d2)
    ledger = current_ledger()

    def through_proxy(state: EnvironmentState) -> EnvironmentState:
        services = {
            name: record.model_copy(
                update={
                    "image": record.image.model_copy(
                        update={
                            "repository": record.image.repository.replace(
                                stack.registry, proxy.address, 1
                            )
                        }
                    )
                }
            )
            for name, record in state.services.items()
        }
        return state.model_copy(update={"services": services})

    ledger.update(DEV, through_proxy)
    try:
        yield cfg, cfg_path, pushed_image, d2, proxy
    finally:
        proxy.clear()
        remove_containers(docker_client, [DEV, STG])
        with get_client(sync_client=True) as client:
            document = client.read_block_document_by_name(DEV_REGISTRY, "elice-oci-registry")
            client.delete_block_document(document.id)
        mp.undo()


def _promote(cfg_path: str) -> State[PromotionOutcome]:
    return promote(
        environment=STG,
        config_source=cfg_path,
        promoted_by="ci",
        health_deadline_s=30,
        return_state=True,
    )


def _recorded(state: EnvironmentState) -> dict[str, str]:
    return {name: record.image.digest for name, record in state.services.items()}


@pytest.mark.parametrize(
    "fault",
    [
        pytest.param(
            Fault("status", status=503, method="HEAD", path=r"/elice/course/manifests/"),
            id="check-503",
        ),
        pytest.param(
            Fault("refuse", method="GET", path=r"/elice/course/blobs/", times=2),
            id="check-refused",
        ),
        pytest.param(  # longer than the block's timeout_s (STALL_TIMEOUT_S): cut, retried
            Fault("delay", seconds=12, method="HEAD", path=r"/elice/course/manifests/"),
            id="check-stalled",
        ),
        pytest.param(Fault("status", status=503, **COPY_READ), id="copy-503"),  # type: ignore[arg-type]
        pytest.param(Fault("refuse", **COPY_READ), id="copy-refused"),  # type: ignore[arg-type]
        pytest.param(Fault("drop", after_bytes=200, **COPY_READ), id="copy-dropped"),  # type: ignore[arg-type]
        pytest.param(Fault("delay", seconds=3, **COPY_READ), id="copy-slow"),  # type: ignore[arg-type]
    ],
)
def test_a_registry_blip_during_a_promotion_is_retried(
    releases: tuple[PipelineConfig, str, ImageRef, ImageRef, FaultProxy], fault: Fault
) -> None:
    cfg, cfg_path, _, d2, proxy = releases
    proxy.inject(dataclasses.replace(fault))
    state = _promote(cfg_path)
    assert state.is_completed(), state.message
    assert proxy.faults[0].fired == fault.times
    recorded = current_ledger().current(STG)
    assert _recorded(recorded) == dict.fromkeys(SERVICES, d2.digest)
    assert recorded.in_progress is None
    assert serving(cfg, STG) == dict.fromkeys(SERVICES, d2.digest)


def test_a_registry_that_refuses_the_copy_stops_the_promotion_before_any_deploy(
    releases: tuple[PipelineConfig, str, ImageRef, ImageRef, FaultProxy],
) -> None:
    """403 is an answer: neither copy is retried, nothing deploys, nothing is recorded."""
    cfg, cfg_path, d1, _, proxy = releases
    before = current_ledger().current(STG)
    proxy.inject(Fault("status", status=403, times=None, **COPY_READ))  # type: ignore[arg-type]
    state = _promote(cfg_path)
    assert state.is_failed(), state.message
    error = state.result(raise_on_failure=False)
    assert isinstance(error, RegistryError), repr(error)
    assert f"copying {proxy.address}/elice/course@" in str(error)
    assert proxy.faults[0].fired == 2  # one read per service's copy
    assert serving(cfg, STG) == dict.fromkeys(SERVICES, d1.digest)
    after = current_ledger().current(STG)
    assert after.revision == before.revision
    assert after.in_progress is None

"""Each environment's own registry, against real registries.

rg-dev uses the CI registry (the stack's, anonymous on loopback); rg-stg names its own:
a docker-registry behind htpasswd Basic auth, saved as an OciRegistry block. Promotion
copies each image into rg-stg's registry by digest before deploying, the ledger names
the image there, and the deploy reads its manifest with that registry's login.
Host ports 441xx and 446xx.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import docker
import pytest
from prefect.client.orchestration import get_client

from blocks.config import PipelineConfig, load_config
from blocks.registry import OciRegistry
from blocks.stack import StackInfo
from core.errors import PromotionRefused, RegistryError
from core.records import ImageRef
from flows.promotion import promote
from tasks.deploy.docker import DockerDeployer
from tasks.health import probe_health
from tasks.registry import image_exists
from tests.flows.chain import SERVICES, put_verified, remove_containers, write_chain_config
from tests.ledgers import current_ledger
from tests.plugins.registries import AuthRegistry

pytestmark = pytest.mark.stack

DEV, STG = "rg-dev", "rg-stg"
STG_REGISTRY = "test-registry-rg-stg"


def _delete_block(name: str) -> None:
    with get_client(sync_client=True) as client:
        document = client.read_block_document_by_name(name, "elice-oci-registry")
        client.delete_block_document(document.id)


@pytest.fixture
def chain(
    tmp_path: Path,
    stack: StackInfo,
    docker_client: docker.DockerClient,
    pushed_image: ImageRef,
    basic_registry: AuthRegistry,
) -> Iterator[tuple[PipelineConfig, str]]:
    """rg-dev serves a verified release of both services; rg-stg has its own registry."""
    mp = pytest.MonkeyPatch()
    mp.setenv("DOCKER_HOST", stack.docker_host)
    basic_registry.block.save(STG_REGISTRY, overwrite=True)
    cfg_path = write_chain_config(
        tmp_path / "pipeline.yaml",
        [(DEV, 36100), (STG, 36600)],
        **{STG: {"registry": {"kind": "oci", "block": STG_REGISTRY}}},
    )
    cfg = load_config(cfg_path)
    remove_containers(docker_client, [DEV, STG])
    for service in SERVICES:
        put_verified(cfg, DEV, service, pushed_image)
    yield cfg, cfg_path
    remove_containers(docker_client, [DEV, STG])
    _delete_block(STG_REGISTRY)
    mp.undo()


def test_promotion_copies_each_image_into_the_environments_own_registry(
    chain: tuple[PipelineConfig, str],
    pushed_image: ImageRef,
    basic_registry: AuthRegistry,
) -> None:
    cfg, cfg_path = chain
    state = promote(
        environment=STG,
        config_source=cfg_path,
        promoted_by="ci",
        health_deadline_s=30,
        return_state=True,
    )
    assert state.is_completed(), state.message
    records = current_ledger().current(STG).services
    for service in SERVICES:
        image = records[service].image
        # recorded where rg-stg pulls it from, with the digest rg-dev verified
        assert image.repository == basic_registry.block.repository(service)
        assert image.digest == pushed_image.digest
        # the registry holds it, and shows it only to its login
        assert image_exists(image.repository, image.digest, basic_registry.block)
        with pytest.raises(RegistryError):
            image_exists(image.repository, image.digest, basic_registry.anonymous())
        # what serves is that digest: the engine built it, so it runs its own copy of the
        # image rg-stg's manifest names (read with rg-stg's login); an engine without it
        # pulls with that login (tests/tasks/deploy/test_docker.py)
        live = DockerDeployer().live(cfg.environment(STG), cfg.service(service))
        assert live is not None
        assert live.image.repository == image.repository
        health = probe_health(
            live.address, cfg.service(service), deadline_s=10, expect_digest=image.digest
        )
        assert health.ok, health.failures
    # the source environment still names the CI registry's image
    source = current_ledger().current(DEV).services["course"]
    assert source.image.repository == pushed_image.repository


def test_an_unsaved_registry_block_is_refused_before_anything_changes(
    chain: tuple[PipelineConfig, str], tmp_path: Path
) -> None:
    cfg_path = write_chain_config(
        tmp_path / "missing.yaml",
        [(DEV, 36100), (STG, 36600)],
        **{STG: {"registry": {"kind": "oci", "block": "test-registry-never-saved"}}},
    )
    before = current_ledger().current(STG)
    state = promote(environment=STG, config_source=cfg_path, promoted_by="ci", return_state=True)
    error = state.result(raise_on_failure=False)
    assert isinstance(error, PromotionRefused), error
    assert "its registry block 'test-registry-never-saved' (oci) is not saved" in str(error)
    assert current_ledger().current(STG).revision == before.revision
    assert (
        DockerDeployer().live(load_config(cfg_path).environment(STG), chain[0].service("course"))
        is None
    )


def test_a_target_other_than_the_configured_one_is_refused(
    chain: tuple[PipelineConfig, str],
) -> None:
    _, cfg_path = chain
    before = current_ledger().current(STG)
    state = promote(
        environment=STG,
        config_source=cfg_path,
        promoted_by="ci",
        target="kubernetes",
        return_state=True,
    )
    error = state.result(raise_on_failure=False)
    assert isinstance(error, PromotionRefused), error
    assert "rg-stg deploys to its configured target 'docker', not 'kubernetes'" in str(error)
    assert current_ledger().current(STG).revision == before.revision


def test_a_saved_block_of_another_kind_is_not_taken_for_the_named_one(
    chain: tuple[PipelineConfig, str], tmp_path: Path
) -> None:
    # the block exists, but as an OCI registry: an `ecr` choice does not load it
    cfg_path = write_chain_config(
        tmp_path / "kind.yaml",
        [(DEV, 36100), (STG, 36600)],
        **{STG: {"registry": {"kind": "ecr", "block": STG_REGISTRY}}},
    )
    state = promote(environment=STG, config_source=cfg_path, promoted_by="ci", return_state=True)
    error = state.result(raise_on_failure=False)
    assert isinstance(error, PromotionRefused), error
    assert f"its registry block {STG_REGISTRY!r} (ecr) is not saved" in str(error)
    assert isinstance(OciRegistry.load(STG_REGISTRY), OciRegistry)

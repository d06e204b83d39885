"""An environment's own registry: the block its configuration names, and the copy of a
promotion's images into it (ECR's API on moto; its registry endpoint a real
docker-registry that accepts exactly the login moto hands out)."""

from __future__ import annotations

import contextlib
import uuid
from typing import Any

import pytest
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.exceptions import ObjectNotFound
from prefect_aws import AwsCredentials

from blocks.environments import EnvironmentSpec, RegistryChoice, Replicas
from blocks.registry import EcrRegistry, OciRegistry
from core.errors import ConfigError
from core.records import ImageRef, PlannedChange, PromotionPlan
from core.trust import TrustRoots
from tasks.ecr import combine_verdicts, ecr_client, ecr_registry_access, judge_ecr_findings
from tasks.images import (
    REGISTRY_BLOCK,
    EnvironmentRegistry,
    environment_registry,
    pipeline_registry,
    place_images,
    with_ecr_scans,
)
from tasks.registry import image_exists, read_labels
from tests.plugins.registries import AuthRegistry

pytestmark = pytest.mark.stack


def _env(choice: RegistryChoice | None) -> EnvironmentSpec:
    return EnvironmentSpec(
        name="er-stg",
        namespace="er-stg",
        replicas=Replicas(min=1, max=1),
        log_level="INFO",
        storage="minio",
        local_port_offset=34100,
        registry=choice,
    )


def _forget(name: str, slug: str) -> None:
    with get_client(sync_client=True) as client:
        client.delete_block_document(client.read_block_document_by_name(name, slug).id)


def _plan(image: ImageRef, services: list[str]) -> PromotionPlan:
    return PromotionPlan(
        environment="er-stg",
        source_environment="er-dev",
        release_id="r-test",
        promoted_by="ci",
        changes=[
            PlannedChange(
                service=s, current_digest=None, image=image.model_copy(update={"service": s})
            )
            for s in services
        ],
    )


@flow
def _place(plan: PromotionPlan, source: EnvironmentRegistry, target: EnvironmentRegistry) -> Any:
    return place_images(plan, source, target)


def test_an_oci_block_named_by_the_environment_is_its_registry_with_its_login(
    basic_registry: AuthRegistry,
) -> None:
    name = f"test-er-{uuid.uuid4().hex[:6]}"
    basic_registry.block.save(name)
    try:
        chosen = environment_registry(_env(RegistryChoice(kind="oci", block=name)), None)
    finally:
        _forget(name, "elice-oci-registry")
    assert chosen.ecr is None
    assert chosen.expires_at is None  # static: a pull secret is rewritten when it changes
    assert chosen.access.address == basic_registry.address
    assert chosen.access.password is not None
    assert chosen.access.password.get_secret_value() == basic_registry.password
    assert chosen.repository("course") == f"{basic_registry.address}/elice/course"


def test_an_unsaved_block_is_a_config_error_naming_it_and_its_kind() -> None:
    with pytest.raises(ConfigError) as caught:
        environment_registry(_env(RegistryChoice(kind="ecr", block="test-er-never")), None)
    assert "er-stg: its registry block 'test-er-never' (ecr) is not saved" in str(caught.value)
    assert "EcrRegistry" in str(caught.value)


def test_promotion_places_images_in_the_environments_ecr_registry(
    moto_endpoint: str,
    aws_credentials: AwsCredentials,
    ecr_image_registry: AuthRegistry,
    oci_registry: OciRegistry,
    pushed_image: ImageRef,
) -> None:
    ecr = EcrRegistry(
        aws_credentials=aws_credentials,
        endpoint_url=moto_endpoint,
        registry_endpoint=f"http://{ecr_image_registry.address}",
        namespace=f"er-{uuid.uuid4().hex[:6]}",
    )
    name = f"test-er-ecr-{uuid.uuid4().hex[:6]}"
    ecr.save(name)
    try:
        target = environment_registry(_env(RegistryChoice(kind="ecr", block=name)), None)
    finally:
        _forget(name, "elice-ecr-registry")
    # the login is ECR's own token (GetAuthorizationToken), not a stored password
    assert target.ecr is not None
    assert target.access.address == ecr_image_registry.address
    assert target.access.username is not None
    assert target.access.username.get_secret_value() == "AWS"
    # a token's: a pull secret holding it is refreshed by its age (moto: a fixed 2015 date)
    assert target.expires_at is not None

    services = ["course", "course-b"]
    placed = _place(_plan(pushed_image, services), EnvironmentRegistry(access=oci_registry), target)
    listed = ecr_client(ecr).describe_repositories()["repositories"]
    names = {r["repositoryName"] for r in listed}
    access = ecr_registry_access(ecr)
    for change in placed.changes:
        # ECR got a repository per service; the image landed there by digest, labels intact
        assert f"{ecr.namespace}/{change.service}" in names
        assert (
            change.image.repository
            == f"{ecr_image_registry.address}/{ecr.namespace}/{change.service}"
        )
        assert change.image.digest == pushed_image.digest
        assert image_exists(change.image.repository, change.image.digest, access)
        labels = read_labels(change.image.repository, change.image.digest, access)
        assert labels["org.opencontainers.image.revision"] == pushed_image.commit
    # placed again: already there, nothing copied, the same plan back
    again = _place(placed, target, target)
    assert again == placed

    # ECR's scan joins the verdict: no scan yet is "unknown", even after a clean pip-audit
    clean = placed.model_copy(
        update={"changes": [c.model_copy(update={"scan": "clean"}) for c in placed.changes]}
    )
    assert {c.scan for c in _scans(clean, ecr).changes} == {"unknown"}
    client = ecr_client(ecr)
    for change in placed.changes:  # moto's scan reports one HIGH finding, CVE-9999-9999
        client.start_image_scan(
            repositoryName=ecr.repository_name(change.service),
            imageId={"imageDigest": change.image.digest},
        )
    assert {c.scan for c in _scans(clean, ecr).changes} == {"vulnerable"}


@flow
def _scans(plan: PromotionPlan, ecr: EcrRegistry) -> Any:
    return with_ecr_scans(plan, ecr)


@pytest.mark.parametrize(
    ("response", "verdict"),
    [
        ({"imageScanStatus": {"status": "IN_PROGRESS"}}, "unknown"),
        ({"imageScanStatus": {"status": "FAILED", "description": "unsupported"}}, "unknown"),
        ({"imageScanStatus": {"status": "COMPLETE"}, "imageScanFindings": {}}, "clean"),
        (
            {
                "imageScanStatus": {"status": "COMPLETE"},
                "imageScanFindings": {
                    "findingSeverityCounts": {"MEDIUM": 2, "LOW": 1},
                    "findings": [{"name": "CVE-1", "severity": "MEDIUM"}],
                },
            },
            "clean",
        ),
        (
            {
                "imageScanStatus": {"status": "COMPLETE"},
                "imageScanFindings": {"findingSeverityCounts": {"CRITICAL": 1}},
            },
            "vulnerable",
        ),
    ],
)
def test_ecr_findings_block_only_on_high_and_critical(response: Any, verdict: str) -> None:
    assert judge_ecr_findings(response)[0] == verdict


@pytest.mark.parametrize(
    ("scans", "combined"),
    [
        (("clean", "clean"), "clean"),
        (("clean", "unknown"), "unknown"),
        ((None, "clean"), "unknown"),
        (("unknown", "vulnerable"), "vulnerable"),
        (("clean", "vulnerable"), "vulnerable"),
    ],
)
def test_unknown_is_never_clean_and_vulnerable_always_wins(
    scans: tuple[str | None, str], combined: str
) -> None:
    assert combine_verdicts(*scans) == combined


def test_a_registry_block_at_another_address_breaks_the_run() -> None:
    """With trust roots (a worker), a registry block saved through the API at an address
    other than the one the host pins is refused: it breaks the run, never moves images."""
    env = _env(RegistryChoice(kind="oci", block="test-trusted-staging"))
    pinned = TrustRoots(
        repository="/srv/r",
        environments=("er-stg",),
        registries={"test-trusted-staging": "registry.internal:5000", REGISTRY_BLOCK: "ci:5000"},
    )
    OciRegistry(address="attacker.example:5000").save("test-trusted-staging", overwrite=True)
    OciRegistry(address="ci:5000").save(REGISTRY_BLOCK, overwrite=True)
    try:
        with pytest.raises(ConfigError) as refused:
            environment_registry(env, pinned)
        assert str(refused.value) == (
            "registry block 'test-trusted-staging' names 'attacker.example:5000'; "
            "the trust file pins 'registry.internal:5000'"
        )
        unpinned = pinned.model_copy(update={"registries": {}})
        with pytest.raises(ConfigError, match="'elice-registry' is not pinned"):
            pipeline_registry(unpinned)
        assert pipeline_registry(pinned).address == "ci:5000"
        OciRegistry(address="registry.internal:5000").save("test-trusted-staging", overwrite=True)
        assert environment_registry(env, pinned).access.address == "registry.internal:5000"
        assert environment_registry(env, None).access.address == "registry.internal:5000"
    finally:
        for name in ("test-trusted-staging", REGISTRY_BLOCK):
            with contextlib.suppress(ValueError, ObjectNotFound):
                OciRegistry.delete(name)

"""ECR repository management against a real moto server; manifests from the real registry."""

from __future__ import annotations

import json
import uuid
from datetime import timedelta

import docker
import httpx
import pytest
from prefect_aws import AwsCredentials
from pydantic import SecretStr

from blocks.registry import EcrRegistry, OciRegistry
from core.errors import ImageError, RegistryError
from core.records import ImageRef
from tasks.ecr import (
    ecr_client,
    ecr_credentials,
    ecr_login,
    ecr_registry_access,
    ecr_retag,
    ensure_ecr_repository,
    lifecycle_policy,
    mirror_to_ecr,
    put_lifecycle_policy,
)
from tasks.registry import fetch_manifest, image_exists, verify_release_image
from tests.plugins.registries import AuthRegistry


@pytest.fixture
def ecr(moto_endpoint: str, aws_credentials: AwsCredentials) -> EcrRegistry:
    """An ECR block on moto with a namespace of its own per test."""
    return EcrRegistry(
        aws_credentials=aws_credentials,
        endpoint_url=moto_endpoint,
        namespace=f"elice-{uuid.uuid4().hex[:6]}",
        keep_last_releases=7,
    )


def test_repository_settings_land_as_configured(ecr: EcrRegistry) -> None:
    uri = ensure_ecr_repository.fn(ecr, "course")
    assert uri.endswith(f"/{ecr.namespace}/course")
    assert ensure_ecr_repository.fn(ecr, "course") == uri  # idempotent
    repo = ecr_client(ecr).describe_repositories(repositoryNames=[f"{ecr.namespace}/course"])
    settings = repo["repositories"][0]
    assert settings["imageTagMutability"] == "IMMUTABLE"
    assert settings["imageScanningConfiguration"]["scanOnPush"] is True


def test_lifecycle_policy_lands(ecr: EcrRegistry) -> None:
    ensure_ecr_repository.fn(ecr, "course")
    put_lifecycle_policy.fn(ecr, "course")
    stored = ecr_client(ecr).get_lifecycle_policy(repositoryName=f"{ecr.namespace}/course")
    policy = json.loads(stored["lifecyclePolicyText"])
    assert policy == lifecycle_policy(7)
    untagged, tagged = policy["rules"]
    assert untagged["selection"]["tagStatus"] == "untagged"
    assert untagged["selection"]["countNumber"] == 1
    assert tagged["selection"]["countType"] == "imageCountMoreThan"
    assert tagged["selection"]["countNumber"] == 7


@pytest.fixture
def ecr_with_endpoint(ecr: EcrRegistry, ecr_image_registry: AuthRegistry) -> EcrRegistry:
    """The ECR block with its registry endpoint on the test registry moto's login opens."""
    return ecr.model_copy(update={"registry_endpoint": f"http://{ecr_image_registry.address}"})


def test_mirror_pushes_blobs_and_manifest_then_retags(
    ecr_with_endpoint: EcrRegistry,
    ecr_image_registry: AuthRegistry,
    pushed_image: ImageRef,
    oci_registry: OciRegistry,
    clean_engine: docker.DockerClient,
) -> None:
    ecr = ecr_with_endpoint
    ensure_ecr_repository.fn(ecr, pushed_image.service)
    mirrored = mirror_to_ecr.fn(pushed_image, ecr, oci_registry)
    assert mirrored.digest == pushed_image.digest
    assert mirrored.repository == f"{ecr_image_registry.address}/{ecr.namespace}/course"
    # the registry endpoint holds every blob, so a node can pull it (anonymous cannot)
    access = ecr_registry_access(ecr)
    manifest = fetch_manifest(mirrored.repository, mirrored.digest, access).json()
    _, path = mirrored.repository.split("/", 1)
    for blob in [manifest["config"], *manifest["layers"]]:
        answer = httpx.head(
            f"http://{ecr_image_registry.address}/v2/{path}/blobs/{blob['digest']}",
            auth=(ecr_image_registry.username, ecr_image_registry.password),
            timeout=10,
        )
        assert answer.status_code == 200, blob
    with pytest.raises(RegistryError, match="anonymous"):
        image_exists(mirrored.repository, mirrored.digest)
    login = ecr_credentials(ecr)
    pulled = clean_engine.images.pull(
        mirrored.repository,
        tag=mirrored.digest,
        auth_config={"username": login.username, "password": login.password.get_secret_value()},
    )
    assert f"{mirrored.repository}@{mirrored.digest}" in pulled.attrs["RepoDigests"]
    assert verify_release_image.fn(mirrored, access) == mirrored
    # the control plane knows the tag too; retags keep the digest, tags are immutable
    client = ecr_client(ecr)
    name = ecr.repository_name(pushed_image.service)
    described = client.describe_images(repositoryName=name)["imageDetails"]
    assert [d["imageDigest"] for d in described] == [pushed_image.digest]
    assert ecr_retag.fn(ecr, pushed_image.service, pushed_image.digest, "prod-1") == (
        pushed_image.digest
    )
    found = client.batch_get_image(repositoryName=name, imageIds=[{"imageTag": "prod-1"}])
    assert found["images"][0]["imageId"]["imageDigest"] == pushed_image.digest
    ecr_retag.fn(ecr, pushed_image.service, pushed_image.digest, "prod-1")
    with pytest.raises(ImageError, match="not in ECR"):
        ecr_retag.fn(ecr, pushed_image.service, "sha256:" + "1" * 64, "prod-2")


def test_mirror_refuses_a_source_block_of_another_registry(
    ecr_with_endpoint: EcrRegistry, pushed_image: ImageRef, ecr_image_registry: AuthRegistry
) -> None:
    with pytest.raises(ValueError, match="source registry block is for"):
        mirror_to_ecr.fn(pushed_image, ecr_with_endpoint, ecr_image_registry.block)


def test_registry_endpoint_is_checked() -> None:
    creds = AwsCredentials(aws_access_key_id="a", aws_secret_access_key="b")
    with pytest.raises(ValueError, match="http:// only on loopback"):
        EcrRegistry(aws_credentials=creds, registry_endpoint="http://registry.example.com")
    with pytest.raises(ValueError, match="https://host"):
        EcrRegistry(aws_credentials=creds, registry_endpoint="https://host/path")
    block = EcrRegistry(aws_credentials=creds, registry_endpoint="https://vpce.example.com/")
    assert block.registry_endpoint == "https://vpce.example.com"


def test_login_returns_a_secret(ecr: EcrRegistry) -> None:
    login = ecr_login.fn(ecr)
    assert isinstance(login.password, SecretStr)
    assert login.username == "AWS"
    assert login.password.get_secret_value()
    assert login.password.get_secret_value() not in repr(login)
    assert login.endpoint.startswith("https://")
    access = ecr_registry_access(ecr)
    assert access.address == login.endpoint.removeprefix("https://")
    assert not access.insecure
    assert login.password.get_secret_value() not in repr(access)


def test_the_token_is_reused_then_refreshed_before_it_expires(ecr: EcrRegistry) -> None:
    # credentials of their own: a login cache entry no other test touched
    creds = AwsCredentials(
        aws_access_key_id=f"key-{uuid.uuid4().hex[:8]}",
        aws_secret_access_key="testing",
        region_name="us-east-1",
    )
    block = ecr.model_copy(update={"aws_credentials": creds})
    expires = ecr_credentials(ecr).expires_at  # moto's fixed expiry
    long_before = expires - timedelta(hours=11)
    first = ecr_credentials(block, now=long_before)
    assert first.fetched_at == long_before
    assert ecr_credentials(block, now=long_before + timedelta(hours=9)) is first
    near_expiry = expires - timedelta(minutes=30)
    refreshed = ecr_credentials(block, now=near_expiry)
    assert refreshed is not first
    assert refreshed.fetched_at == near_expiry
    assert ecr_credentials(block).fetched_at > near_expiry  # long expired by now

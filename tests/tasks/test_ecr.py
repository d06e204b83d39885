"""ECR repository management against a real moto server; manifests from the real registry."""

from __future__ import annotations

import json
import uuid

import pytest
from prefect_aws import AwsCredentials
from pydantic import SecretStr

from blocks.registry import EcrRegistry
from tasks.ecr import (
    ecr_client,
    ecr_login,
    ecr_retag,
    ensure_ecr_repository,
    lifecycle_policy,
    mirror_to_ecr,
    put_lifecycle_policy,
)
from tasks.exceptions import ImageError
from tasks.models import ImageRef


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


def test_mirror_and_retag_keep_the_digest(ecr: EcrRegistry, pushed_image: ImageRef) -> None:
    ensure_ecr_repository.fn(ecr, pushed_image.service)
    mirrored = mirror_to_ecr.fn(pushed_image, ecr)
    assert mirrored.digest == pushed_image.digest
    assert mirrored.repository.endswith(f"/{ecr.namespace}/{pushed_image.service}")
    assert ecr_retag.fn(ecr, pushed_image.service, pushed_image.digest, "prod-1") == (
        pushed_image.digest
    )
    client = ecr_client(ecr)
    name = ecr.repository_name(pushed_image.service)
    found = client.batch_get_image(repositoryName=name, imageIds=[{"imageTag": "prod-1"}])
    assert found["images"][0]["imageId"]["imageDigest"] == pushed_image.digest
    # immutable tags: the same tag again for the same digest is fine, another digest is not
    ecr_retag.fn(ecr, pushed_image.service, pushed_image.digest, "prod-1")
    with pytest.raises(ImageError, match="not in ECR"):
        ecr_retag.fn(ecr, pushed_image.service, "sha256:" + "1" * 64, "prod-2")


def test_login_returns_a_secret(ecr: EcrRegistry) -> None:
    login = ecr_login.fn(ecr)
    assert isinstance(login.password, SecretStr)
    assert login.username == "AWS"
    assert login.password.get_secret_value()
    assert login.password.get_secret_value() not in repr(login)
    assert login.endpoint.startswith("https://")

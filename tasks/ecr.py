"""Amazon ECR: repositories, lifecycle policies, logins, retags and the mirror by digest."""

from __future__ import annotations

import base64
import hashlib
import json
from typing import TYPE_CHECKING, Any, Literal

from botocore.exceptions import BotoCoreError, ClientError
from prefect import task
from pydantic import BaseModel, ConfigDict, SecretStr

from blocks.registry import EcrRegistry, OciRegistry
from tasks.exceptions import RegistryError, ToolError
from tasks.models import ImageRef
from tasks.registry import DOCKER_MANIFEST, OCI_MANIFEST, fetch_manifest

if TYPE_CHECKING:
    from mypy_boto3_ecr import ECRClient
    from mypy_boto3_ecr.type_defs import ImageScanningConfigurationTypeDef


class RegistryLogin(BaseModel):
    """Credentials for `docker login` to a registry."""

    model_config = ConfigDict(frozen=True)

    username: str
    password: SecretStr
    endpoint: str


def ecr_client(registry: EcrRegistry) -> ECRClient:
    """A boto3 ECR client from the block's credentials, region and endpoint."""
    session = registry.aws_credentials.get_boto3_session()
    client: ECRClient = session.client(
        "ecr", region_name=registry.region, endpoint_url=registry.endpoint_url
    )
    return client


def _aws_error(action: str, exc: Exception) -> ToolError:
    code = exc.response.get("Error", {}).get("Code", "") if isinstance(exc, ClientError) else ""
    return ToolError(f"ECR {action} failed: {code or type(exc).__name__}: {exc}")


def lifecycle_policy(keep_last: int) -> dict[str, Any]:
    """Expire untagged images after a day; keep the last `keep_last` tagged ones."""
    return {
        "rules": [
            {
                "rulePriority": 1,
                "description": "Expire untagged images after 1 day",
                "selection": {
                    "tagStatus": "untagged",
                    "countType": "sinceImagePushed",
                    "countUnit": "days",
                    "countNumber": 1,
                },
                "action": {"type": "expire"},
            },
            {
                "rulePriority": 2,
                "description": f"Keep the last {keep_last} tagged images",
                "selection": {
                    "tagStatus": "tagged",
                    "tagPatternList": ["*"],
                    "countType": "imageCountMoreThan",
                    "countNumber": keep_last,
                },
                "action": {"type": "expire"},
            },
        ]
    }


@task(retries=2, retry_delay_seconds=2)
def ensure_ecr_repository(registry: EcrRegistry, service: str) -> str:
    """Create (or bring in line) the service's ECR repository; returns its URI."""
    ecr = ecr_client(registry)
    name = registry.repository_name(service)
    mutability: Literal["IMMUTABLE", "MUTABLE"] = (
        "IMMUTABLE" if registry.immutable_tags else "MUTABLE"
    )
    scanning: ImageScanningConfigurationTypeDef = {"scanOnPush": registry.scan_on_push}
    try:
        try:
            repo = ecr.create_repository(
                repositoryName=name,
                imageScanningConfiguration=scanning,
                imageTagMutability=mutability,
            )["repository"]
        except ecr.exceptions.RepositoryAlreadyExistsException:
            ecr.put_image_scanning_configuration(
                repositoryName=name, imageScanningConfiguration=scanning
            )
            ecr.put_image_tag_mutability(repositoryName=name, imageTagMutability=mutability)
            repo = ecr.describe_repositories(repositoryNames=[name])["repositories"][0]
    except (ClientError, BotoCoreError) as exc:
        raise _aws_error(f"repository {name}", exc) from exc
    return str(repo["repositoryUri"])


@task(retries=2, retry_delay_seconds=2)
def put_lifecycle_policy(registry: EcrRegistry, service: str) -> dict[str, Any]:
    """Apply `lifecycle_policy(registry.keep_last_releases)` to the service's repository."""
    policy = lifecycle_policy(registry.keep_last_releases)
    name = registry.repository_name(service)
    try:
        ecr_client(registry).put_lifecycle_policy(
            repositoryName=name, lifecyclePolicyText=json.dumps(policy)
        )
    except (ClientError, BotoCoreError) as exc:
        raise _aws_error(f"lifecycle policy of {name}", exc) from exc
    return policy


@task(retries=2, retry_delay_seconds=2)
def ecr_login(registry: EcrRegistry) -> RegistryLogin:
    """A registry login from get_authorization_token; the password stays a SecretStr."""
    try:
        data = ecr_client(registry).get_authorization_token()["authorizationData"][0]
    except (ClientError, BotoCoreError) as exc:
        raise _aws_error("get_authorization_token", exc) from exc
    user, _, password = base64.b64decode(data["authorizationToken"]).decode().partition(":")
    return RegistryLogin(
        username=user, password=SecretStr(password), endpoint=data["proxyEndpoint"]
    )


def _put_manifest(
    ecr: ECRClient, name: str, manifest: str, media_type: str, digest: str, tag: str
) -> None:
    """put_image; an immutable tag that already names this digest is fine."""
    try:
        ecr.put_image(
            repositoryName=name,
            imageManifest=manifest,
            imageManifestMediaType=media_type,
            imageTag=tag,
            imageDigest=digest,
        )
    except ecr.exceptions.ImageAlreadyExistsException:
        return
    except ecr.exceptions.ImageTagAlreadyExistsException as exc:
        found = ecr.batch_get_image(repositoryName=name, imageIds=[{"imageTag": tag}])["images"]
        if found and found[0]["imageId"].get("imageDigest") == digest:
            return
        msg = f"{name}:{tag} already names another image and tags are immutable"
        raise RegistryError(msg) from exc


@task(retries=2, retry_delay_seconds=2)
def ecr_retag(registry: EcrRegistry, service: str, digest: str, new_tag: str) -> str:
    """Add `new_tag` to the image `digest` by copying its manifest (batch_get + put_image).

    Raises:
        RegistryError: the digest is not in the repository, or the tag names another image.
    """
    ecr = ecr_client(registry)
    name = registry.repository_name(service)
    try:
        found = ecr.batch_get_image(
            repositoryName=name,
            imageIds=[{"imageDigest": digest}],
            acceptedMediaTypes=[DOCKER_MANIFEST, OCI_MANIFEST],
        )["images"]
        if not found:
            msg = f"{name}@{digest}: not in ECR"
            raise RegistryError(msg)
        image = found[0]
        media_type = image.get("imageManifestMediaType", DOCKER_MANIFEST)
        _put_manifest(ecr, name, image["imageManifest"], media_type, digest, new_tag)
    except (ClientError, BotoCoreError) as exc:
        raise _aws_error(f"retag {name}@{digest}", exc) from exc
    return digest


@task(retries=2, retry_delay_seconds=2)
def mirror_to_ecr(
    image: ImageRef, registry: EcrRegistry, source: OciRegistry | None = None
) -> ImageRef:
    """Register the image's manifest in ECR under its real digest and tag.

    Blobs stay in the OCI registry (moto has no registry protocol); the manifest bytes,
    hence the digest, are the same in both.

    Raises:
        RegistryError: the manifest's bytes do not hash to `image.digest`.
    """
    manifest = fetch_manifest(image.repository, image.digest, source)
    if "sha256:" + hashlib.sha256(manifest.content).hexdigest() != image.digest:
        msg = f"{image.reference}: manifest bytes do not match the digest"
        raise RegistryError(msg)
    ecr = ecr_client(registry)
    name = registry.repository_name(image.service)
    media_type = manifest.headers.get("Content-Type", DOCKER_MANIFEST).split(";")[0]
    tag = image.tag or f"sha-{image.commit[:12]}"
    try:
        _put_manifest(ecr, name, manifest.text, media_type, image.digest, tag)
        uri = ecr.describe_repositories(repositoryNames=[name])["repositories"][0]["repositoryUri"]
    except (ClientError, BotoCoreError) as exc:
        raise _aws_error(f"mirror {image.reference}", exc) from exc
    return image.model_copy(update={"repository": uri, "tag": tag})

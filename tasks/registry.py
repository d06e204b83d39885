"""Registries: push and inspect images over the OCI distribution API; manage Amazon ECR."""

from __future__ import annotations

import base64
import hashlib
import json
from typing import TYPE_CHECKING, Any, Literal

import httpx
from botocore.exceptions import BotoCoreError, ClientError
from docker.errors import DockerException
from prefect import task
from prefect.tasks import exponential_backoff
from pydantic import BaseModel, ConfigDict, SecretStr

from blocks.registry import EcrRegistry, OciRegistry
from tasks.exceptions import ImageError, ToolError
from tasks.images import BuiltImage, engine_client
from tasks.models import ImageRef
from tasks.process import retry_on_tool_error, run_logger

if TYPE_CHECKING:
    from mypy_boto3_ecr import ECRClient
    from mypy_boto3_ecr.type_defs import ImageScanningConfigurationTypeDef

DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MANIFEST_ACCEPT = ", ".join(
    [
        DOCKER_MANIFEST,
        OCI_MANIFEST,
        "application/vnd.docker.distribution.manifest.list.v2+json",
        "application/vnd.oci.image.index.v1+json",
    ]
)
LOOPBACK = ("127.", "localhost", "[::1]")


# --- OCI distribution API --------------------------------------------------------------


def split_repository(repository: str) -> tuple[str, str]:
    """'127.0.0.1:5000/elice/course' -> ('127.0.0.1:5000', 'elice/course').

    Raises:
        ValueError: no registry host or no path.
    """
    host, _, path = repository.partition("/")
    if not host or not path or "://" in repository:
        msg = f"repository {repository!r} must look like host[:port]/path"
        raise ValueError(msg)
    return host, path


def _client(host: str, registry: OciRegistry | None) -> httpx.Client:
    insecure = registry.insecure if registry else host.startswith(LOOPBACK)
    auth = None
    if registry and registry.username and registry.password:
        auth = (registry.username.get_secret_value(), registry.password.get_secret_value())
    base = f"{'http' if insecure else 'https'}://{host}"
    return httpx.Client(base_url=base, auth=auth, timeout=60, trust_env=not insecure)


def _request(
    repository: str,
    method: str,
    what: str,
    registry: OciRegistry | None = None,
    **kwargs: Any,
) -> httpx.Response:
    host, path = split_repository(repository)
    try:
        with _client(host, registry) as client:
            return client.request(method, f"/v2/{path}/{what}", **kwargs)
    except httpx.HTTPError as exc:
        msg = f"registry {host} unreachable for {method} {path}/{what}: {exc}"
        raise ToolError(msg) from None


def _fetch_manifest(
    repository: str, reference: str, registry: OciRegistry | None = None
) -> httpx.Response:
    answer = _request(
        repository, "GET", f"manifests/{reference}", registry, headers={"Accept": MANIFEST_ACCEPT}
    )
    if answer.status_code != 200:
        msg = f"{repository}:{reference}: manifest not found (HTTP {answer.status_code})"
        raise ImageError(msg)
    return answer


def manifest_digest(repository: str, tag: str, registry: OciRegistry | None = None) -> str:
    """The digest `repository:tag` points at (HEAD with the manifest Accept header).

    Raises:
        ImageError: the tag does not exist.
    """
    answer = _request(
        repository, "HEAD", f"manifests/{tag}", registry, headers={"Accept": MANIFEST_ACCEPT}
    )
    digest = str(answer.headers.get("Docker-Content-Digest", ""))
    if answer.status_code != 200 or not digest.startswith("sha256:"):
        msg = f"{repository}:{tag}: no manifest digest (HTTP {answer.status_code})"
        raise ImageError(msg)
    return digest


def image_exists(repository: str, digest: str, registry: OciRegistry | None = None) -> bool:
    """True when the registry holds a manifest with this digest."""
    answer = _request(
        repository, "HEAD", f"manifests/{digest}", registry, headers={"Accept": MANIFEST_ACCEPT}
    )
    if answer.status_code in (200, 404):
        return answer.status_code == 200
    msg = f"{repository}@{digest}: registry answered HTTP {answer.status_code}"
    raise ToolError(msg)


def image_config(
    repository: str, digest: str, registry: OciRegistry | None = None
) -> dict[str, Any]:
    """The image configuration blob (the `config` of `docker inspect`, plus history)."""
    manifest = _fetch_manifest(repository, digest, registry).json()
    config_digest = manifest.get("config", {}).get("digest")
    if not config_digest:
        msg = f"{repository}@{digest}: manifest has no config (an index?)"
        raise ImageError(msg)
    blob = _request(repository, "GET", f"blobs/{config_digest}", registry, follow_redirects=True)
    if blob.status_code != 200:
        msg = f"{repository}@{digest}: config blob missing (HTTP {blob.status_code})"
        raise ImageError(msg)
    config: dict[str, Any] = blob.json()
    return config


def read_labels(
    repository: str, digest: str, registry: OciRegistry | None = None
) -> dict[str, str]:
    """The labels of the image at `repository@digest`, read from its config blob."""
    labels = image_config(repository, digest, registry).get("config", {}).get("Labels") or {}
    return {str(k): str(v) for k, v in labels.items()}


@task(retries=3, retry_delay_seconds=exponential_backoff(backoff_factor=2))
def copy_tag(
    repository: str, digest: str, new_tag: str, registry: OciRegistry | None = None
) -> str:
    """Point `new_tag` at the manifest `digest` (same bytes: the digest is unchanged).

    Raises:
        ImageError: the digest is unknown or the registry changed it.
    """
    manifest = _fetch_manifest(repository, digest, registry)
    media_type = manifest.headers.get("Content-Type", DOCKER_MANIFEST).split(";")[0]
    answer = _request(
        repository,
        "PUT",
        f"manifests/{new_tag}",
        registry,
        content=manifest.content,
        headers={"Content-Type": media_type},
    )
    stored = answer.headers.get("Docker-Content-Digest", "")
    if answer.status_code != 201 or stored != digest:
        msg = f"{repository}:{new_tag}: tag copy failed (HTTP {answer.status_code}, {stored!r})"
        raise ImageError(msg)
    run_logger().info("tagged %s@%s as %s", repository, digest[:19], new_tag)
    return digest


@task(
    retries=3,
    retry_delay_seconds=exponential_backoff(backoff_factor=2),
    retry_jitter_factor=0.5,
    retry_condition_fn=retry_on_tool_error,
)
def push_image(
    image: BuiltImage, *, docker_host: str, registry: OciRegistry | None = None
) -> ImageRef:
    """Push every tag of `image` through the engine; read the digest back from the registry.

    Raises:
        ToolError: engine or registry unreachable (retried).
        ImageError: the registry refused the push, or tags disagree on the digest.
    """
    auth = None
    if registry and registry.username and registry.password:
        auth = {
            "username": registry.username.get_secret_value(),
            "password": registry.password.get_secret_value(),
        }
    client = engine_client(docker_host)
    try:
        for tag in image.tags:
            for chunk in client.api.push(
                image.repository, tag=tag, stream=True, decode=True, auth_config=auth
            ):
                if "error" in chunk:
                    msg = f"{image.repository}:{tag}: push refused: {chunk['error']}"
                    raise ImageError(msg)
    except DockerException as exc:
        msg = f"{image.repository}: push failed in the engine: {exc}"
        raise ToolError(msg) from None
    finally:
        client.close()
    digests = {manifest_digest(image.repository, tag, registry) for tag in image.tags}
    if len(digests) != 1:
        msg = f"{image.repository}: tags {image.tags} point at different digests {digests}"
        raise ImageError(msg)
    digest = digests.pop()
    run_logger().info("pushed %s@%s", image.repository, digest)
    return ImageRef(
        service=image.service,
        repository=image.repository,
        digest=digest,
        tag=image.tags[0],
        version=image.version,
        commit=image.commit,
    )


# --- Amazon ECR ------------------------------------------------------------------------


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
        raise _aws_error(f"repository {name}", exc) from None
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
        raise _aws_error(f"lifecycle policy of {name}", exc) from None
    return policy


@task(retries=2, retry_delay_seconds=2)
def ecr_login(registry: EcrRegistry) -> RegistryLogin:
    """A registry login from get_authorization_token; the password stays a SecretStr."""
    try:
        data = ecr_client(registry).get_authorization_token()["authorizationData"][0]
    except (ClientError, BotoCoreError) as exc:
        raise _aws_error("get_authorization_token", exc) from None
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
    except ecr.exceptions.ImageTagAlreadyExistsException:
        found = ecr.batch_get_image(repositoryName=name, imageIds=[{"imageTag": tag}])["images"]
        if found and found[0]["imageId"].get("imageDigest") == digest:
            return
        msg = f"{name}:{tag} already names another image and tags are immutable"
        raise ImageError(msg) from None


@task(retries=2, retry_delay_seconds=2)
def ecr_retag(registry: EcrRegistry, service: str, digest: str, new_tag: str) -> str:
    """Add `new_tag` to the image `digest` by copying its manifest (batch_get + put_image).

    Raises:
        ImageError: the digest is not in the repository, or the tag names another image.
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
            raise ImageError(msg)
        image = found[0]
        media_type = image.get("imageManifestMediaType", DOCKER_MANIFEST)
        _put_manifest(ecr, name, image["imageManifest"], media_type, digest, new_tag)
    except (ClientError, BotoCoreError) as exc:
        raise _aws_error(f"retag {name}@{digest}", exc) from None
    return digest


@task(retries=2, retry_delay_seconds=2)
def mirror_to_ecr(
    image: ImageRef, registry: EcrRegistry, source: OciRegistry | None = None
) -> ImageRef:
    """Register the image's manifest in ECR under its real digest and tag.

    Blobs stay in the OCI registry (moto has no registry protocol); the manifest bytes,
    hence the digest, are the same in both.

    Raises:
        ImageError: the manifest's bytes do not hash to `image.digest`.
    """
    manifest = _fetch_manifest(image.repository, image.digest, source)
    if "sha256:" + hashlib.sha256(manifest.content).hexdigest() != image.digest:
        msg = f"{image.reference}: manifest bytes do not match the digest"
        raise ImageError(msg)
    ecr = ecr_client(registry)
    name = registry.repository_name(image.service)
    media_type = manifest.headers.get("Content-Type", DOCKER_MANIFEST).split(";")[0]
    tag = image.tag or f"sha-{image.commit[:12]}"
    try:
        _put_manifest(ecr, name, manifest.text, media_type, image.digest, tag)
        uri = ecr.describe_repositories(repositoryNames=[name])["repositories"][0]["repositoryUri"]
    except (ClientError, BotoCoreError) as exc:
        raise _aws_error(f"mirror {image.reference}", exc) from None
    return image.model_copy(update={"repository": uri, "tag": tag})

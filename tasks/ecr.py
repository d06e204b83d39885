"""Amazon ECR: repositories, lifecycle policies, logins, retags and the mirror by digest.

The control plane (repositories, policies, tokens, tags) goes through boto3; images go
through ECR's registry endpoint like any OCI registry: `mirror_to_ecr` copies blobs and
manifests there with skopeo (`tasks.registry.copy_image_by_digest`), authenticated with
the GetAuthorizationToken credentials, which are cached and fetched again an hour
before their 12-hour expiry.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Literal, cast

from botocore.exceptions import BotoCoreError, ClientError
from prefect import task
from pydantic import BaseModel, ConfigDict, SecretStr

from blocks.registry import EcrRegistry, OciRegistry
from core.errors import RegistryError, ToolError
from core.records import ImageRef
from tasks.masking import mask
from tasks.process import run_logger
from tasks.registry import (
    DOCKER_MANIFEST,
    OCI_MANIFEST,
    copy_image_by_digest,
    fetch_manifest,
    split_repository,
)

if TYPE_CHECKING:
    from mypy_boto3_ecr import ECRClient
    from mypy_boto3_ecr.type_defs import ImageScanningConfigurationTypeDef


class RegistryLogin(BaseModel):
    """Credentials for `docker login` to a registry."""

    model_config = ConfigDict(frozen=True)

    username: str
    password: SecretStr
    endpoint: str
    expires_at: datetime
    fetched_at: datetime


TOKEN_REFRESH_MARGIN = timedelta(hours=1)
_logins: dict[tuple[str | None, ...], RegistryLogin] = {}
_logins_lock = threading.Lock()


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


def _login_key(registry: EcrRegistry) -> tuple[str | None, ...]:
    creds = registry.aws_credentials
    return (
        registry.region,
        registry.endpoint_url,
        creds.profile_name,
        creds.aws_access_key_id,
        hashlib.sha256(
            (
                creds.aws_secret_access_key.get_secret_value()
                if creds.aws_secret_access_key
                else ""
            ).encode()
        ).hexdigest(),
    )


def ecr_credentials(registry: EcrRegistry, *, now: datetime | None = None) -> RegistryLogin:
    """The registry login from GetAuthorizationToken, reused until an hour before it expires.

    Raises:
        ToolError: the ECR API refused or is unreachable.
    """
    now = now or datetime.now(UTC)
    key = _login_key(registry)
    with _logins_lock:
        cached = _logins.get(key)
        if cached is not None and cached.expires_at - now > TOKEN_REFRESH_MARGIN:
            return cached
        try:
            data = ecr_client(registry).get_authorization_token()["authorizationData"][0]
        except (ClientError, BotoCoreError) as exc:
            raise _aws_error("get_authorization_token", exc) from exc
        user, _, password = base64.b64decode(data["authorizationToken"]).decode().partition(":")
        mask(password, data["authorizationToken"])
        expires = data["expiresAt"]
        login = RegistryLogin(
            username=user,
            password=SecretStr(password),
            endpoint=data["proxyEndpoint"],
            expires_at=expires if expires.tzinfo else expires.replace(tzinfo=UTC),
            fetched_at=now,
        )
        _logins[key] = login
    return login


@task(retries=2, retry_delay_seconds=2)
def ecr_login(registry: EcrRegistry) -> RegistryLogin:
    """A registry login from get_authorization_token; the password stays a SecretStr."""
    return ecr_credentials(registry)


def ecr_registry_access(registry: EcrRegistry, *, now: datetime | None = None) -> OciRegistry:
    """ECR's registry endpoint as an OCI registry block, with a fresh token as its login.

    Pass it to `tasks.registry` reads (`verify_release_image`, `read_labels`) and copies.
    """
    login = ecr_credentials(registry, now=now)
    endpoint = registry.registry_endpoint or login.endpoint
    scheme, _, host = endpoint.partition("://")
    return OciRegistry(
        address=host.rstrip("/"),
        namespace=registry.namespace,
        insecure=scheme == "http",
        username=SecretStr(login.username),
        password=login.password,
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
    """Copy the image into ECR by digest: layers and config, then the manifest and tag.

    The copy goes to the registry endpoint with the GetAuthorizationToken login (what
    real ECR needs: it refuses a manifest whose layers were never uploaded); the tag is
    then recorded through the API as well (idempotent: ECR already has it after a push).

    Args:
        source: the block of the image's registry, for its credentials.

    Returns:
        The image at the ECR endpoint (the reference nodes pull).

    Raises:
        ValueError: `source` is another registry's block (before anything is copied).
        RegistryError: the manifest's bytes do not hash to `image.digest`, or a registry
            refused the copy.
    """
    host, _ = split_repository(image.repository)
    if source is not None and source.address != host:
        msg = f"the source registry block is for {source.address}, the image is on {host}"
        raise ValueError(msg)
    manifest = fetch_manifest(image.repository, image.digest, source)
    if "sha256:" + hashlib.sha256(manifest.content).hexdigest() != image.digest:
        msg = f"{image.reference}: manifest bytes do not match the digest"
        raise RegistryError(msg)
    tag = image.tag or f"sha-{image.commit[:12]}"
    access = ecr_registry_access(registry)
    name = registry.repository_name(image.service)
    copied = copy_image_by_digest(
        image, f"{access.address}/{name}", [tag], source=source, target=access
    )
    ecr = ecr_client(registry)
    media_type = manifest.headers.get("Content-Type", DOCKER_MANIFEST).split(";")[0]
    try:
        _put_manifest(ecr, name, manifest.text, media_type, image.digest, tag)
    except (ClientError, BotoCoreError) as exc:
        raise _aws_error(f"mirror {image.reference}", exc) from exc
    run_logger().info("mirrored %s to %s", image.reference, copied.reference)
    return copied


# --- scan-on-push findings ------------------------------------------------------------

BLOCKING_SEVERITIES = ("CRITICAL", "HIGH")


def judge_ecr_findings(response: Mapping[str, Any]) -> tuple[str, str]:
    """(verdict, reason) of a DescribeImageScanFindings answer.

    clean: a completed scan without CRITICAL or HIGH findings; vulnerable: one with them;
    unknown: a scan not (yet) completed. Lower severities are reported, not blocking.
    """
    status = (response.get("imageScanStatus") or {}).get("status", "")
    if status != "COMPLETE":
        detail = (response.get("imageScanStatus") or {}).get("description", "")
        return "unknown", f"ECR scan {status.lower() or 'missing'}{f': {detail}' if detail else ''}"
    findings = response.get("imageScanFindings") or {}
    counts = {str(k): int(v) for k, v in (findings.get("findingSeverityCounts") or {}).items()}
    blocking = [
        f"{f.get('name')} ({f.get('severity')})"
        for f in findings.get("findings") or []
        if f.get("severity") in BLOCKING_SEVERITIES
    ]
    if blocking or any(counts.get(s) for s in BLOCKING_SEVERITIES):
        return "vulnerable", f"ECR scan: {', '.join(blocking) or counts}"
    shown = ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "no findings"
    return "clean", f"ECR scan: {shown}"


def combine_verdicts(*verdicts: str | None) -> str:
    """One verdict from several scans: any vulnerable wins; clean only if all are clean."""
    found = [v or "unknown" for v in verdicts]
    if "vulnerable" in found:
        return "vulnerable"
    return "clean" if found and all(v == "clean" for v in found) else "unknown"


@task(task_run_name="ecr_scan_verdict-{image.service}", retries=2)
def ecr_scan_verdict(registry: EcrRegistry, image: ImageRef) -> tuple[str, str]:
    """ECR's scan-on-push verdict for `image` in `registry` (see `judge_ecr_findings`).

    No scan recorded for the image (scan on push off, or not run yet) is "unknown".

    Raises:
        ToolError: the ECR API failed otherwise (retried).
    """
    try:
        response = ecr_client(registry).describe_image_scan_findings(
            repositoryName=registry.repository_name(image.service),
            imageId={"imageDigest": image.digest},
        )
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "")
        if code in ("ScanNotFoundException", "ImageNotFoundException"):
            return "unknown", f"ECR has no scan of {image.short} ({code})"
        raise _aws_error("describe_image_scan_findings", exc) from exc
    except BotoCoreError as exc:
        raise _aws_error("describe_image_scan_findings", exc) from exc
    verdict, reason = judge_ecr_findings(cast("Mapping[str, Any]", response))
    run_logger().info("%s %s: %s", image.service, image.short, reason)
    return verdict, reason

"""OCI registries: inspect, tag and verify images over the distribution API."""

from __future__ import annotations

from typing import Any

import httpx
from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.tasks import exponential_backoff

from blocks.catalog import ServiceSpec
from blocks.registry import OciRegistry
from tasks.exceptions import ImageError, PromotionRefused, RegistryError, ToolError
from tasks.models import ImageRef
from tasks.process import retry_on_tool_error, run_logger

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
        raise ToolError(msg) from exc


def fetch_manifest(
    repository: str, reference: str, registry: OciRegistry | None = None
) -> httpx.Response:
    answer = _request(
        repository, "GET", f"manifests/{reference}", registry, headers={"Accept": MANIFEST_ACCEPT}
    )
    if answer.status_code != 200:
        msg = f"{repository}:{reference}: manifest not found (HTTP {answer.status_code})"
        raise RegistryError(msg)
    return answer


def manifest_digest(repository: str, tag: str, registry: OciRegistry | None = None) -> str:
    """The digest `repository:tag` points at (HEAD with the manifest Accept header).

    Raises:
        RegistryError: the tag does not exist.
    """
    answer = _request(
        repository, "HEAD", f"manifests/{tag}", registry, headers={"Accept": MANIFEST_ACCEPT}
    )
    digest = str(answer.headers.get("Docker-Content-Digest", ""))
    if answer.status_code != 200 or not digest.startswith("sha256:"):
        msg = f"{repository}:{tag}: no manifest digest (HTTP {answer.status_code})"
        raise RegistryError(msg)
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
    manifest = fetch_manifest(repository, digest, registry).json()
    config_digest = manifest.get("config", {}).get("digest")
    if not config_digest:
        msg = f"{repository}@{digest}: manifest has no config (an index?)"
        raise RegistryError(msg)
    blob = _request(repository, "GET", f"blobs/{config_digest}", registry, follow_redirects=True)
    if blob.status_code != 200:
        msg = f"{repository}@{digest}: config blob missing (HTTP {blob.status_code})"
        raise RegistryError(msg)
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
        RegistryError: the digest is unknown or the registry changed it.
    """
    manifest = fetch_manifest(repository, digest, registry)
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
        raise RegistryError(msg)
    run_logger().info("tagged %s@%s as %s", repository, digest[:19], new_tag)
    return digest


@task(name="find-published-image", task_run_name="find-published-image-{service.name}")
def find_published_image(
    service: ServiceSpec, version: str, commit: str, registry: OciRegistry
) -> ImageRef | None:
    """The image already pushed for this exact version, or None (then it is built)."""
    repository = registry.repository(service.name)
    try:
        digest = manifest_digest(repository, version, registry)
    except ImageError:
        return None
    run_logger().info("%s %s is already published as %s", service.name, version, digest[:19])
    return ImageRef(
        service=service.name,
        repository=repository,
        digest=digest,
        tag=version,
        version=version,
        commit=commit,
    )


@task(
    name="verify-release-image",
    task_run_name="verify-release-image-{image.service}",
    cache_policy=NO_CACHE,
    retries=2,
    retry_delay_seconds=2,
    retry_condition_fn=retry_on_tool_error,
)
def verify_release_image(image: ImageRef) -> ImageRef:
    """The digest is in the registry and its revision label is the recorded commit.

    Raises:
        PromotionRefused: the image is gone, or was built from another commit.
        ToolError: the registry is unreachable (retried).
    """
    if not image_exists(image.repository, image.digest):
        msg = f"{image.service}: {image.reference} is not in the registry"
        raise PromotionRefused(msg)
    try:
        labels = read_labels(image.repository, image.digest)
    except ImageError as exc:
        msg = f"{image.service}: cannot read the labels of {image.reference}: {exc}"
        raise PromotionRefused(msg) from exc
    revision = labels.get("org.opencontainers.image.revision", "")
    if image.commit and revision != image.commit:
        msg = (
            f"{image.service}: {image.short} was built from {revision or '(no revision label)'}, "
            f"but the ledger records commit {image.commit}"
        )
        raise PromotionRefused(msg)
    run_logger().info(
        "%s: %s verified in the registry (commit %s)", image.service, image.short, revision
    )
    return image

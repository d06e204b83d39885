"""Delivery of one service: the image it is published as, its deploy, its ledger entry.

The build, push, scan and health tasks live beside their systems (images, registry,
security, health); this module holds the steps that join them to an environment.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path

from prefect import task
from prefect.runtime import flow_run
from pydantic import BaseModel, ConfigDict, Field

from blocks.catalog import ServiceSpec
from blocks.config import load_config
from blocks.registry import EcrRegistry, OciRegistry
from tasks.deploy import make_deployer
from tasks.exceptions import ImageError
from tasks.health import HealthResult, check_service_health, probe_health
from tasks.images import build_image, local_ca_bundle
from tasks.models import DeployOutcome, ImageRef, PublishedImage
from tasks.process import run_logger
from tasks.registry import (
    ensure_ecr_repository,
    manifest_digest,
    mirror_to_ecr,
    push_image,
    put_lifecycle_policy,
)
from tasks.releases import Ledger, ReleaseRecord
from tasks.security import ScanReport

REGISTRY_BLOCK = "elice-registry"
ECR_BLOCK_ENV = "ELICE_ECR_BLOCK"


class DeliverySettings(BaseModel):
    """Where images are built, pushed and deployed."""

    model_config = ConfigDict(arbitrary_types_allowed=True, frozen=True)

    docker_host: str = Field(description="Docker API engine that builds the images")
    registry: OciRegistry = Field(description="The registry images are pushed to")
    base_image: str | None = Field(default=None, description="BASE_IMAGE build argument")
    ecr: EcrRegistry | None = Field(default=None, description="ECR mirror, when configured")


def delivery_settings() -> DeliverySettings:
    """Settings from the saved blocks, else the local stack's environment variables.

    Raises:
        ValueError: no engine or no registry is configured.
    """
    docker_host = os.environ.get("DOCKER_HOST")
    if not docker_host:
        msg = "no Docker engine: DOCKER_HOST is not set (run `cicd stack up`)"
        raise ValueError(msg)
    try:
        registry = OciRegistry.load(REGISTRY_BLOCK)
    except ValueError:
        address = os.environ.get("ELICE_REGISTRY")
        if not address:
            msg = f"no registry: save an OciRegistry block {REGISTRY_BLOCK!r} or set ELICE_REGISTRY"
            raise ValueError(msg) from None
        registry = OciRegistry(address=address, insecure=address.startswith(("127.", "localhost")))
    ecr_block = os.environ.get(ECR_BLOCK_ENV)
    return DeliverySettings(
        docker_host=docker_host,
        registry=registry,
        base_image=os.environ.get("ELICE_BASE_IMAGE") or None,
        ecr=EcrRegistry.load(ecr_block) if ecr_block else None,
    )


def image_version(repo: str | Path, service: ServiceSpec, fingerprint: str) -> str:
    """The image version: the service's package version plus its source fingerprint.

    Equal fingerprints give equal versions, so an unchanged service finds its image.
    """
    project = tomllib.loads((Path(repo) / service.path / "pyproject.toml").read_text("utf-8"))
    version = str(project.get("project", {}).get("version", "0.0.0"))
    return f"{version}-{fingerprint[:12]}"


@task(name="find-published-image", task_run_name="find-published-image-{service.name}")
def find_published_image(
    service: ServiceSpec, version: str, commit: str, settings: DeliverySettings
) -> ImageRef | None:
    """The image already pushed for this exact version, or None (then it is built)."""
    repository = settings.registry.repository(service.name)
    try:
        digest = manifest_digest(repository, version, settings.registry)
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


@task(name="publish-image", task_run_name="publish-image-{service.name}")
def publish_image(
    service: ServiceSpec,
    repo: str,
    version: str,
    commit: str,
    settings: DeliverySettings,
    *,
    rebuild: bool = False,
) -> PublishedImage:
    """The service's image in the registry: found by its version, else built and pushed.

    With an ECR block configured, the image is mirrored into ECR by digest as well.
    """
    found = None if rebuild else find_published_image(service, version, commit, settings)
    if found is not None:
        return PublishedImage(image=found, reused=True)
    built = build_image(
        service,
        docker_host=settings.docker_host,
        repository=settings.registry.repository(service.name),
        version=version,
        commit=commit,
        base_image=settings.base_image,
        extra_ca=local_ca_bundle(),
        root=Path(repo),
    )
    image = push_image(built, docker_host=settings.docker_host, registry=settings.registry)
    if settings.ecr is not None:
        ensure_ecr_repository(settings.ecr, service.name)
        put_lifecycle_policy(settings.ecr, service.name)
        mirror_to_ecr(image, settings.ecr, settings.registry)
    return PublishedImage(image=image, reused=False)


@task(name="verify-deployment", task_run_name="verify-{service.name}")
def verify_deployment(
    outcome: DeployOutcome, service: ServiceSpec, deadline_s: float = 30.0
) -> HealthResult:
    """The deployed service answers /health and /ready and reports the deployed digest."""
    deployed = outcome.deployed
    return check_service_health(
        deployed.address, service, deadline_s=deadline_s, expect_digest=deployed.image.digest
    )


@task(name="deploy-service", task_run_name="deploy-{service.name}-to-{environment}")
def deploy_service(
    environment: str,
    service: ServiceSpec,
    published: PublishedImage,
    *,
    config_source: str | None = None,
    target: str = "docker",
    deadline_s: float = 90.0,
) -> DeployOutcome:
    """Deploy the image unless exactly that digest already serves there."""
    image = published.image
    env = load_config(config_source).environment(environment)
    deployer = make_deployer(target)
    live = deployer.live(env, service)
    if live is not None and live.image.digest == image.digest:
        probe = probe_health(live.address, service, deadline_s=5, expect_digest=image.digest)
        if probe.ok:
            run_logger().info("%s %s already serves in %s", service.name, image.short, environment)
            return DeployOutcome(deployed=live, changed=False)
        run_logger().warning(
            "%s %s should serve in %s but does not answer (%s): deploying it again",
            service.name,
            image.short,
            environment,
            "; ".join(probe.failures),
        )
    deployed = deployer.deploy(env, service, image, deadline_s=deadline_s)
    run_logger().info(
        "%s %s deployed to %s at %s", service.name, image.short, env.name, deployed.address
    )
    return DeployOutcome(deployed=deployed, changed=True)


class LedgerEntry(BaseModel):
    """The ledger revision a CI deploy was recorded in."""

    environment: str
    revision: int
    changed: bool

    def summary_line(self) -> str:
        """One line for the CI report."""
        how = "recorded" if self.changed else "already recorded"
        return f"{how} in the {self.environment} ledger (revision {self.revision})"

    def report_details(self) -> dict[str, int]:
        """Columns for the CI report."""
        return {"revision": self.revision}


@task(name="record-release", task_run_name="record-{outcome.deployed.service}")
def record_release(outcome: DeployOutcome, scan: ScanReport | None) -> LedgerEntry:
    """Record the deployed, health-checked release in the environment's ledger."""
    deployed = outcome.deployed
    run_id = flow_run.get_id()
    record = ReleaseRecord(
        service=deployed.service,
        environment=deployed.environment,
        image=deployed.image,
        release_id=f"ci-{deployed.image.version}",
        deployed_at=deployed.deployed_at,
        flow_run_id=run_id,
        verified=True,
        scan=scan.verdict if scan else None,
    )
    ledger = Ledger()
    state = ledger.current(deployed.environment)
    current = state.services.get(deployed.service)
    if current is not None and current.image.digest == record.image.digest and current.verified:
        return LedgerEntry(environment=state.environment, revision=state.revision, changed=False)
    state = ledger.record_deploy(deployed.environment, record)
    return LedgerEntry(environment=state.environment, revision=state.revision, changed=True)

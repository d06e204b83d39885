"""The deploy-target interface the flows drive, and the target resolved once per flow run."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from datetime import datetime
from typing import Protocol, cast

from prefect.blocks.core import Block
from pydantic import BaseModel, ConfigDict, Field

from blocks.catalog import ServiceSpec
from blocks.docker_target import DockerTarget
from blocks.environments import EnvironmentSpec, TargetKind
from blocks.kubernetes_target import KubernetesTarget
from blocks.registry import OciRegistry
from core.catalog import DOCKER_TARGET_BLOCK, check_target
from core.errors import ConfigError
from core.records import DeployedService, ImageRef
from core.trust import TrustRoots

KUBERNETES_TARGET_BLOCK = "elice-kubernetes"
TARGETS: tuple[TargetKind, ...] = ("docker", "kubernetes")


class Deployer(Protocol):
    """A place services run: local containers (docker) or a cluster (kubernetes)."""

    name: str

    def deploy(
        self, env: EnvironmentSpec, service: ServiceSpec, image: ImageRef, *, deadline_s: float
    ) -> DeployedService:
        """Roll `image` out and wait until it is healthy and serving `image.digest`.

        Raises:
            DeployError: the new release did not become healthy; the previous one
                still serves (the target restored it before raising).
        """
        ...

    def live(self, env: EnvironmentSpec, service: ServiceSpec) -> DeployedService | None:
        """What serves `service` in `env` now, or None when nothing is deployed."""
        ...

    def restore(
        self, env: EnvironmentSpec, service: ServiceSpec, previous: DeployedService | None
    ) -> None:
        """Put `previous` back (None: remove the service), waiting until it is healthy."""
        ...

    def address(self, env: EnvironmentSpec, service: ServiceSpec) -> str:
        """Base URL where `service` answers in `env`."""
        ...

    def refresh_pull_credentials(self, env: EnvironmentSpec) -> str | None:
        """Renew the pull credentials `env` keeps for its images, if they no longer
        serve; why they were written, or None (still serving, or none kept)."""
        ...


class DeployTarget(BaseModel):
    """A deploy target with its configuration already loaded: plain data, passed to tasks.

    Rollback hooks rebuild the deployer from it without reading configuration again.
    `drill_env` maps an image digest to extra container variables (docker target only),
    e.g. `{digest: {"FAULT_HEALTH": "1"}}`: a rollback drill with a real image.
    """

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    target: TargetKind = "docker"
    docker: DockerTarget | None = Field(default=None, description="docker: its settings")
    kubernetes: KubernetesTarget | None = Field(default=None, description="kubernetes: cluster")
    drill_env: dict[str, dict[str, str]] = Field(default_factory=dict)
    registries: tuple[OciRegistry, ...] = Field(
        default=(),
        description=(
            "Registries pulled from with their logins: docker, the engine logs in; "
            "kubernetes, the namespace's pull secret holds the login"
        ),
    )
    registry_expires_at: datetime | None = Field(
        default=None, description="When the registries' login expires (ECR's token); None: static"
    )

    def deployer(self) -> Deployer:
        """The deployer of this target, with the drill variables applied."""
        if self.target == "kubernetes":
            from tasks.deploy.kubernetes import KubernetesDeployer  # noqa: PLC0415 - heavy client

            return KubernetesDeployer(
                self.kubernetes,
                registries=self.registries,
                token_expires_at=self.registry_expires_at,
            )
        from tasks.deploy.docker import DockerDeployer  # noqa: PLC0415 - keeps docker-py lazy

        return DockerDeployer.from_block(
            self.docker or DockerTarget(), self.drill_env, self.registries
        )


def block_digest(block: Block) -> str:
    """sha256 of `block`'s whole content, secrets included: what a trust file pins."""
    data = block.model_dump(mode="json", context={"include_secrets": True})
    text = json.dumps(data, sort_keys=True, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


def _pinned(block: Block, name: str, roots: TrustRoots | None) -> None:
    if roots is not None:
        roots.check_block(name, block_digest(block))


def resolve_deploy_target(
    target: str = "docker",
    drill_env: dict[str, dict[str, str]] | None = None,
    docker_host: str | None = None,
    *,
    roots: TrustRoots | None,
) -> DeployTarget:
    """Load `target`'s saved block once (docker: the defaults when none is saved).

    `docker_host` (the user setting DOCKER_HOST) is the docker target's engine where its
    block names none. With trust roots (a worker), a saved block must be the one they pin
    (its content's digest): a block rewritten through the API breaks the run.

    Raises:
        ConfigError: an unknown target, drill variables for kubernetes, no saved
            `elice-kubernetes` block for the kubernetes target, or a block not pinned.
    """
    if target not in TARGETS:
        msg = f"unknown deploy target {target!r}; choose one of {', '.join(TARGETS)}"
        raise ConfigError(msg)
    if target == "kubernetes":
        if drill_env:
            msg = "drill variables (drill_env) need the docker target, not kubernetes"
            raise ConfigError(msg)
        try:
            cluster = cast("KubernetesTarget", KubernetesTarget.load(KUBERNETES_TARGET_BLOCK))
        except ValueError as exc:
            msg = f"the kubernetes target needs a saved block {KUBERNETES_TARGET_BLOCK!r}: {exc}"
            raise ConfigError(msg) from exc
        _pinned(cluster, KUBERNETES_TARGET_BLOCK, roots)
        return DeployTarget(target="kubernetes", kubernetes=cluster)
    try:
        block = cast("DockerTarget", DockerTarget.load(DOCKER_TARGET_BLOCK))
    except ValueError:  # none saved: the local defaults
        block = DockerTarget()
    else:
        _pinned(block, DOCKER_TARGET_BLOCK, roots)
    if block.docker_host is None and docker_host:
        block = block.model_copy(update={"docker_host": docker_host})
    return DeployTarget(target="docker", docker=block, drill_env=drill_env or {})


def environment_target(
    env: EnvironmentSpec,
    requested: str | None = None,
    drill_env: dict[str, dict[str, str]] | None = None,
    registries: Sequence[OciRegistry | None] = (),
    docker_host: str | None = None,
    *,
    roots: TrustRoots | None,
    expires_at: datetime | None = None,
) -> DeployTarget:
    """The target `env`'s configuration names, loaded; `registries` to pull from (their
    login expiring at `expires_at`, an ECR token's; None: static credentials);
    `docker_host` the engine where the docker target's block names none (DOCKER_HOST).

    `requested` (a caller's `--target`) may only repeat the configured target: where an
    environment runs is configuration, not a choice made per run.

    Raises:
        ConfigError: `requested` differs from the configured target, or the target
            cannot be loaded (see `resolve_deploy_target`).
    """
    check_target(env, requested)
    loaded = resolve_deploy_target(env.target, drill_env, docker_host, roots=roots)
    pull: dict[str, OciRegistry] = {}
    for registry in registries:
        if registry is not None:
            pull.setdefault(registry.address, registry)
    return loaded.model_copy(
        update={"registries": tuple(pull.values()), "registry_expires_at": expires_at}
    )

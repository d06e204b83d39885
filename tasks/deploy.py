"""The deploy-target interface the flows drive, whichever target is configured."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol, cast

from blocks.catalog import ServiceSpec
from blocks.environments import EnvironmentSpec
from tasks.models import DeployedService, ImageRef


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


DOCKER_TARGET_BLOCK = "elice-docker"
KUBERNETES_TARGET_BLOCK = "elice-kubernetes"
TARGETS = ("docker", "kubernetes")


def make_deployer(
    target: str = "docker", *, extra_env: Mapping[str, Mapping[str, str]] | None = None
) -> Deployer:
    """The configured deployer for `target`: its saved block, else the local defaults.

    Args:
        extra_env: image digest -> variables added to that release's containers (the
            drill hook for deliberately broken releases; docker target only).

    Raises:
        ValueError: `target` is not a known deploy target, or extra_env on kubernetes.
    """
    if target not in TARGETS:
        msg = f"unknown deploy target {target!r}; choose one of {', '.join(TARGETS)}"
        raise ValueError(msg)
    if target == "kubernetes":
        if extra_env:
            msg = "drill variables (extra_env) need the docker target, not kubernetes"
            raise ValueError(msg)
        from blocks.kubernetes_target import KubernetesTarget  # noqa: PLC0415
        from tasks.kubernetes import KubernetesDeployer  # noqa: PLC0415

        cluster = cast("KubernetesTarget", KubernetesTarget.load(KUBERNETES_TARGET_BLOCK))
        return KubernetesDeployer(cluster)

    from blocks.docker_target import DockerTarget  # noqa: PLC0415
    from tasks.containers import DockerDeployer  # noqa: PLC0415

    try:
        block = cast("DockerTarget", DockerTarget.load(DOCKER_TARGET_BLOCK))
    except ValueError:
        block = DockerTarget()
    return DockerDeployer.from_block(block, extra_env)

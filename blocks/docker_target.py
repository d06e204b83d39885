"""The `docker` deploy target: services as containers on this machine's engine."""

from __future__ import annotations

from prefect.blocks.core import Block
from pydantic import Field

from blocks.catalog import Name


class DockerTarget(Block):
    """Where and how the docker deploy target runs containers."""

    _block_type_name = "Elice Docker Target"
    _description = "Runs each environment's services as containers on loopback ports."

    docker_host: str | None = Field(
        default=None,
        description="Docker API URL, e.g. unix:///run/podman.sock; None: DOCKER_HOST",
    )
    name_prefix: Name = Field(default="elice", description="Containers are <prefix>-<env>-<svc>")
    health_deadline_s: float = Field(
        default=60.0, gt=0, le=3600, description="How long a new container may take to be healthy"
    )
    environment_env: dict[str, dict[str, str]] = Field(
        default_factory=dict,
        description="Extra variables for every container of an environment, by environment name",
    )

"""Deployment environments: dev, staging, production."""

from __future__ import annotations

from typing import Any, Literal

from prefect.blocks.core import Block
from pydantic import BaseModel, ConfigDict, Field, model_validator

from blocks.catalog import Name, find_named
from core.errors import ConfigError


class Replicas(BaseModel):
    """Autoscaling bounds."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    min: int = Field(ge=1, description="Minimum replicas")
    max: int = Field(ge=1, description="Maximum replicas")

    @model_validator(mode="after")
    def _ordered(self) -> Replicas:
        if self.max < self.min:
            msg = f"max ({self.max}) is below min ({self.min})"
            raise ValueError(msg)
        return self


# Failures in these environments page someone, whatever their configuration says.
PAGED_BY_NAME = ("production",)
# The seed's names (health-check.sh dev|stg|prod) for the environments of the default.
SEED_ALIASES = {"dev": "dev", "stg": "staging", "prod": "production"}


TargetKind = Literal["docker", "kubernetes"]


class RegistryChoice(BaseModel):
    """An environment's own image registry: the name of a saved registry block.

    The block holds the address and the credentials (secrets); the configuration file,
    which is committed, only names it.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["oci", "ecr"] = Field(description="oci: an OciRegistry block; ecr: EcrRegistry")
    block: Name = Field(description="The saved block's name, e.g. elice-registry-production")


_POLICY_KEYS = (
    "approval_required",
    "approvers",
    "approval_timeout_s",
    "approvals_required",
    "analysis",
)


class EnvironmentSpec(BaseModel):
    """One environment the pipeline deploys to."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Name = Field(description="dev, staging or production")
    namespace: Name = Field(description="Kubernetes namespace")
    replicas: Replicas = Field(description="Autoscaling bounds per service")
    log_level: Literal["DEBUG", "INFO", "WARN", "ERROR"] = Field(description="Services' LOG_LEVEL")
    storage: Literal["minio", "s3"] = Field(description="Object storage kind")
    promotes_from: str | None = Field(default=None, description="Releases come from here")
    local_port_offset: int = Field(
        ge=0, le=40000, description="Docker target: service port + offset on 127.0.0.1"
    )
    target: TargetKind = Field(
        default="docker", description="Where its services run: docker (local) or kubernetes"
    )
    registry: RegistryChoice | None = Field(
        default=None,
        description="Its own registry (images are copied in by digest); none: the CI registry",
    )
    prometheus_url: str | None = Field(
        default=None,
        pattern=r"^https?://[^\s/?#]+(/[^\s?#]*)?$",
        description="The Prometheus its analysis queries; none: the local stack's",
    )

    @model_validator(mode="before")
    @classmethod
    def _no_approval_policy(cls, data: Any) -> Any:
        if isinstance(data, dict):
            named = sorted(k for k in _POLICY_KEYS if k in data)
            if named:
                msg = (
                    f"{', '.join(named)}: the approval policy is not part of the pipeline "
                    "configuration; it is read from config/approvals.yaml on the protected "
                    "branch, so a caller cannot choose it"
                )
                raise ValueError(msg)
        return data

    @property
    def paged(self) -> bool:
        """Failures here page someone by name (production); gated environments page too,
        which only the approval policy can tell."""
        return self.name in PAGED_BY_NAME

    def host_port(self, service_port: int) -> int:
        """The loopback port a service of this environment listens on (docker target)."""
        return service_port + self.local_port_offset


class EnvironmentCatalog(Block):
    """The ordered environments of the promotion path."""

    _block_type_name = "Elice Environments"
    _description = "dev -> staging -> production: namespaces, replicas, log levels, approvers."

    environments: list[EnvironmentSpec] = Field(description="Environments, lowest first")

    @model_validator(mode="after")
    def _check(self) -> EnvironmentCatalog:
        names = [e.name for e in self.environments]
        if len(set(names)) != len(names):
            msg = f"environments: duplicate names in {names}"
            raise ValueError(msg)
        for env in self.environments:
            if env.promotes_from is not None and env.promotes_from not in names:
                msg = f"{env.name}: promotes_from {env.promotes_from!r} is not an environment"
                raise ValueError(msg)
        offsets = [e.local_port_offset for e in self.environments]
        if len(set(offsets)) != len(offsets):
            msg = f"environments: local_port_offset values must differ, got {offsets}"
            raise ValueError(msg)
        return self

    def names(self) -> list[str]:
        """Environment names, lowest first."""
        return [e.name for e in self.environments]

    def get(self, name: str) -> EnvironmentSpec:
        """The environment called `name`.

        Raises:
            ConfigError: no such environment; the message lists the known ones.
        """
        return find_named(self.environments, name, "environment", "known")

    def resolve(self, name: str) -> EnvironmentSpec:
        """The environment called `name`, or the one a seed alias stands for (`stg`, `prod`).

        An environment's own name always wins over an alias.

        Raises:
            ConfigError: neither; the message lists the known names and the aliases.
        """
        known = self.names()
        if name not in known and SEED_ALIASES.get(name) in known:
            name = SEED_ALIASES[name]
        if name not in known:
            aliases = [f"{a} = {t}" for a, t in SEED_ALIASES.items() if a != t and t in known]
            also = f" (aliases: {', '.join(aliases)})" if aliases else ""
            msg = f"unknown environment {name!r}; known: {', '.join(known)}{also}"
            raise ConfigError(msg)
        return self.get(name)

"""The configuration's plain data: services and libs, environments; no Prefect.

The blocks (`blocks.catalog.ServiceCatalog`, `blocks.environments.EnvironmentCatalog`)
are these models saved on a Prefect server; the read commands use them as they are, so
reading a configuration file costs no Prefect import. The bottom layer.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Annotated, Any, Literal, Protocol, TypeVar

from pydantic import BaseModel, ConfigDict, Field, model_validator

from core.errors import ConfigError


class _Named(Protocol):
    @property
    def name(self) -> str: ...


_N = TypeVar("_N", bound=_Named)


def find_named(items: Sequence[_N], name: str, what: str, known: str) -> _N:
    """The item called `name` (a service, an environment).

    Raises:
        ConfigError: none is; the message names `what` and lists the `known` ones.
    """
    for item in items:
        if item.name == name:
            return item
    msg = f"unknown {what} {name!r}; {known}: {', '.join(i.name for i in items)}"
    raise ConfigError(msg)


_NAME = r"^[a-z][a-z0-9-]{0,38}[a-z0-9]$"
Name = Annotated[str, Field(pattern=_NAME, description="A DNS-1123 label")]


class LibSpec(BaseModel):
    """A shared library under `libs/`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Name = Field(description="Library name, also its directory under libs/")
    path: str = Field(default="", description="Path from the repository root; libs/<name>")
    libs: tuple[str, ...] = Field(default=(), description="Other libs this lib depends on")

    @model_validator(mode="after")
    def _default_path(self) -> LibSpec:
        if not self.path:
            object.__setattr__(self, "path", f"libs/{self.name}")
        return self


class ServiceSpec(BaseModel):
    """One microservice of the monorepo."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Name = Field(description="Service name, also its directory under services/")
    path: str = Field(default="", description="Path from the repository root; services/<name>")
    port: int = Field(ge=1024, le=65535 - 40000, description="The service's own port")
    health_path: str = Field(default="/health", description="Liveness endpoint")
    ready_path: str = Field(default="/ready", description="Readiness endpoint")
    libs: tuple[str, ...] = Field(default=(), description="Libs this service depends on")
    coverage_threshold: int = Field(default=85, ge=0, le=100, description="pytest-cov floor")

    @model_validator(mode="after")
    def _default_path(self) -> ServiceSpec:
        if not self.path:
            object.__setattr__(self, "path", f"services/{self.name}")
        return self

    @property
    def package(self) -> str:
        """The Python package name of the service (`api-gateway` -> `api_gateway`)."""
        return re.sub(r"-", "_", self.name)


class Catalog(BaseModel):
    """The typed catalog of the monorepo's services and shared libraries (plain data)."""

    services: list[ServiceSpec] = Field(description="Every service the pipeline builds")
    libs: list[LibSpec] = Field(default_factory=list, description="Shared libraries under libs/")

    @model_validator(mode="after")
    def _check_references(self) -> Catalog:
        names = [s.name for s in self.services]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            msg = f"services: duplicate names {dupes}"
            raise ValueError(msg)
        ports = [s.port for s in self.services]
        dup_ports = sorted({p for p in ports if ports.count(p) > 1})
        if dup_ports:
            msg = f"services: duplicate ports {dup_ports}"
            raise ValueError(msg)
        known = {lib.name for lib in self.libs}
        owners: list[ServiceSpec | LibSpec] = [*self.services, *self.libs]
        for owner in owners:
            unknown = sorted(set(owner.libs) - known)
            if unknown:
                msg = f"{owner.name}: depends on unknown libs {unknown} (known: {sorted(known)})"
                raise ValueError(msg)
        return self

    def names(self) -> list[str]:
        """Service names in catalog order."""
        return [s.name for s in self.services]

    def get(self, name: str) -> ServiceSpec:
        """The service called `name`.

        Raises:
            ConfigError: no such service; the message lists the known ones.
        """
        return find_named(self.services, name, "service", "known services")

    def select(self, names: list[str]) -> list[ServiceSpec]:
        """The named services in catalog order; every name must exist.

        Raises:
            ConfigError: unknown names; the message lists the known ones.
        """
        unknown = sorted(set(names) - set(self.names()))
        if unknown:
            msg = f"unknown services {unknown}; known services: {', '.join(self.names())}"
            raise ConfigError(msg)
        return [s for s in self.services if s.name in set(names)]

    def lib_closure(self, lib: str) -> set[str]:
        """Every lib that depends on `lib`, directly or not, including itself."""
        closure = {lib}
        changed = True
        while changed:
            changed = False
            for spec in self.libs:
                if spec.name not in closure and closure & set(spec.libs):
                    closure.add(spec.name)
                    changed = True
        return closure

    def dependents_of_lib(self, lib: str) -> list[str]:
        """Services that depend on `lib`, directly or through other libs."""
        closure = self.lib_closure(lib)
        return [s.name for s in self.services if closure & set(s.libs)]


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
DOCKER_TARGET_BLOCK = "elice-docker"
DOCKER_TARGET_TYPE = "elice-docker-target"
"""The docker target's saved block and its type's slug (`blocks.docker_target`)."""


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


class Environments(BaseModel):
    """The ordered environments of the promotion path (plain data)."""

    environments: list[EnvironmentSpec] = Field(description="Environments, lowest first")

    @model_validator(mode="after")
    def _check(self) -> Environments:
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


def check_target(env: EnvironmentSpec, requested: str | None) -> None:
    """A caller's `--target` may only repeat `env`'s configured one: where an environment
    runs is configuration, not a choice made per run.

    Raises:
        ConfigError: `requested` differs from the configured target.
    """
    if requested is not None and requested != env.target:
        msg = (
            f"{env.name} deploys to its configured target {env.target!r}, not {requested!r}; "
            "change the environment's `target` in the pipeline configuration instead"
        )
        raise ConfigError(msg)


def local_address(env: EnvironmentSpec, service: ServiceSpec) -> str:
    """Where `service` of `env` answers on the docker target: http://127.0.0.1:<host port>.

    Pure: the docker deployer and the read commands (`cicd status`) share it.
    """
    return f"http://127.0.0.1:{env.host_port(service.port)}"

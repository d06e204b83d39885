"""The service catalog: which services and libs the monorepo holds, and how they depend."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Annotated, Protocol, TypeVar

from prefect.blocks.core import Block
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


class ServiceCatalog(Block):
    """The typed catalog of the monorepo's services and shared libraries."""

    _block_type_name = "Elice Service Catalog"
    _description = "The services of the monorepo: ports, health paths, lib dependencies."

    services: list[ServiceSpec] = Field(description="Every service the pipeline builds")
    libs: list[LibSpec] = Field(default_factory=list, description="Shared libraries under libs/")

    @model_validator(mode="after")
    def _check_references(self) -> ServiceCatalog:
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

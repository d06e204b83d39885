"""Loading the pipeline's configuration from YAML into plain models; no Prefect.

A checked-in file (`extends:` one base file), or a file as committed on a branch (read
through a callable). The saved blocks (`blocks.config.load_blocks`) hold the same models.
The bottom layer.
"""

from __future__ import annotations

import posixpath
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from core.catalog import Catalog, Environments, EnvironmentSpec, LibSpec, ServiceSpec
from core.errors import ConfigError
from core.settings import CHECKOUT

M = TypeVar("M", bound=BaseModel)

CATALOG_BLOCK = "elice-services"
ENVIRONMENTS_BLOCK = "elice-environments"
CATALOG_BLOCK_TYPE = "elice-service-catalog"
ENVIRONMENTS_BLOCK_TYPE = "elice-environments"
"""The saved configuration's block documents and their types' slugs (`blocks.config`)."""


def default_config_file() -> Path:
    """The embedded default configuration file."""
    return CHECKOUT / "config" / "pipeline.yaml"


class PerformancePolicy(BaseModel):
    """The bounded load probe and what counts as a regression."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    requests: int = Field(default=40, ge=5, le=10_000, description="Requests per probe")
    concurrency: int = Field(default=4, ge=1, le=64, description="Concurrent requests")
    max_p95_ratio: float = Field(default=3.0, gt=1.0, description="Allowed p95 growth factor")
    min_p95_slack_ms: float = Field(
        default=500.0, ge=0, description="p95 may always grow by this much (noise floor)"
    )
    max_error_rate: float = Field(default=0.01, ge=0, le=1, description="Allowed error rate")


class PipelineConfig(BaseModel):
    """Everything the flows need to know about services and environments."""

    model_config = ConfigDict(arbitrary_types_allowed=True)  # the blocks: subclasses

    catalog: Catalog
    environments: Environments
    performance: PerformancePolicy = Field(default_factory=PerformancePolicy)
    source: str = Field(default="", description="Where this configuration was loaded from")

    def service(self, name: str) -> ServiceSpec:
        """A service by name."""
        return self.catalog.get(name)

    def environment(self, name: str) -> EnvironmentSpec:
        """An environment by name."""
        return self.environments.get(name)


def _describe(source: str, error: ValidationError) -> str:
    problems = []
    for item in error.errors():
        where = ".".join(str(part) for part in item["loc"]) or "(top level)"
        problems.append(f"{source}: {where}: {item['msg']}")
    return "invalid configuration:\n  " + "\n  ".join(problems)


def _items(source: str, key: str, raw: Any, model: type[M]) -> list[M]:
    if raw is None:
        return []
    if not isinstance(raw, list):
        msg = f"{source}: {key}: expected a list, got {type(raw).__name__}"
        raise ConfigError(msg)
    items = []
    for index, item in enumerate(raw):
        try:
            items.append(model.model_validate(item))
        except ValidationError as exc:
            raise ConfigError(_describe(f"{source}: {key}[{index}]", exc)) from exc
    return items


def parse_config(data: Any, source: str) -> PipelineConfig:
    """Validate raw configuration data.

    Raises:
        ConfigError: naming `source`, the field path and the problem.
    """
    if not isinstance(data, dict):
        msg = f"{source}: expected a mapping at the top level, got {type(data).__name__}"
        raise ConfigError(msg)
    unknown = sorted(set(data) - {"services", "libs", "environments", "performance"})
    if unknown:
        msg = f"{source}: unknown top-level keys {unknown}"
        raise ConfigError(msg)
    for key in ("services", "environments"):
        if key not in data:
            msg = f"{source}: {key}: field required"
            raise ConfigError(msg)
    services = _items(source, "services", data["services"], ServiceSpec)
    libs = _items(source, "libs", data.get("libs"), LibSpec)
    environments = _items(source, "environments", data["environments"], EnvironmentSpec)
    try:
        catalog = Catalog(services=services, libs=libs)
        envs = Environments(environments=environments)
    except ValidationError as exc:
        raise ConfigError(_describe(source, exc)) from exc
    try:
        performance = PerformancePolicy.model_validate(data.get("performance") or {})
    except ValidationError as exc:
        raise ConfigError(_describe(f"{source}: performance", exc)) from exc
    return PipelineConfig(
        catalog=catalog, environments=envs, performance=performance, source=source
    )


def _parse_yaml(text: str, source: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        msg = f"{source}: not valid YAML: {exc}"
        raise ConfigError(msg) from exc


def _read_yaml(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        msg = f"{path}: cannot read configuration: {exc.strerror}"
        raise ConfigError(msg) from exc
    return _parse_yaml(text, str(path))


def _extended(data: Any, source: str, read_base: Callable[[str], Any]) -> Any:
    """`data` over the sections of the file its `extends:` names (`read_base` reads it)."""
    if not isinstance(data, dict) or "extends" not in data:
        return data
    data = dict(data)
    base_name = data.pop("extends")
    if not isinstance(base_name, str) or not base_name:
        msg = f"{source}: extends must name a configuration file, got {base_name!r}"
        raise ConfigError(msg)
    base = read_base(base_name)
    if not isinstance(base, dict) or "extends" in base:
        msg = f"{source}: extends {base_name}, which must be a mapping that extends nothing"
        raise ConfigError(msg)
    return {**base, **data}


def load_file(path: Path) -> PipelineConfig:
    """Load and validate a YAML configuration file.

    `extends: <file>` (relative to this file) takes that file's sections and replaces
    the ones this file names, whole: a setup that differs only in its environments
    does not repeat the services. The base may not extend another file.
    """
    data = _extended(_read_yaml(path), str(path), lambda name: _read_yaml(path.parent / name))
    return parse_config(data, str(path))


def load_committed(name: str, read: Callable[[str], str], where: str) -> PipelineConfig:
    """The configuration file `name` as `read` returns it (a path in a repository: a
    branch's file as committed); `extends` is read the same way, beside it.

    `where` names the place in messages ("config/pipeline.yaml on main of elice/monorepo").
    """

    def read_base(base: str) -> Any:
        path = posixpath.normpath(posixpath.join(posixpath.dirname(name), base))
        return _parse_yaml(read(path), f"{path} ({where})")

    data = _extended(_parse_yaml(read(name), where), where, read_base)
    return parse_config(data, where)


def config_from_blocks(catalog: Any, environments: Any, source: str) -> PipelineConfig:
    """The configuration from the saved blocks' data (`catalog`, `environments`: their
    documents' data as the API returns it).

    Raises:
        ConfigError: the data is no valid catalog or environments.
    """
    try:
        return PipelineConfig(
            catalog=Catalog.model_validate(catalog),
            environments=Environments.model_validate(environments),
            source=source,
        )
    except ValidationError as exc:
        raise ConfigError(_describe(source, exc)) from exc

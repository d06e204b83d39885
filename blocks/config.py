"""Load the pipeline's configuration: the checked-in file, or the saved Prefect blocks."""

from __future__ import annotations

import posixpath
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from blocks.catalog import LibSpec, ServiceCatalog, ServiceSpec
from blocks.environments import EnvironmentCatalog, EnvironmentSpec
from core.errors import ConfigError
from core.settings import CHECKOUT, Settings

M = TypeVar("M", bound=BaseModel)

CATALOG_BLOCK = "elice-services"
ENVIRONMENTS_BLOCK = "elice-environments"


def repo_root(settings: Settings | None = None) -> Path:
    """The monorepo the pipeline builds: `settings.repo` (ELICE_REPO), or this checkout.

    Without `settings`, the user settings are read here (a caller outside a run).
    """
    return (settings or Settings.from_environ()).repo


def default_config_file() -> Path:
    """The embedded default configuration file."""
    return CHECKOUT / "config" / "pipeline.yaml"


def state_dir(settings: Settings | None = None) -> Path:
    """Where state lives: `settings.state_dir` (ELICE_STATE_DIR, default <checkout>/.elice).

    Without `settings`, the user settings are read here (a caller outside a run).
    """
    return (settings or Settings.from_environ()).resolved_state_dir()


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

    model_config = ConfigDict(arbitrary_types_allowed=True)

    catalog: ServiceCatalog
    environments: EnvironmentCatalog
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
        catalog = ServiceCatalog(services=services, libs=libs)
        envs = EnvironmentCatalog(environments=environments)
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


def load_blocks() -> PipelineConfig:
    """Load the configuration from the saved Prefect blocks."""
    try:
        catalog = ServiceCatalog.load(CATALOG_BLOCK)
        envs = EnvironmentCatalog.load(ENVIRONMENTS_BLOCK)
    except ValueError as exc:
        msg = f"Prefect blocks: {exc}; run `cicd register-blocks` first"
        raise ConfigError(msg) from exc
    return PipelineConfig(
        catalog=catalog, environments=envs, source=f"blocks {CATALOG_BLOCK}, {ENVIRONMENTS_BLOCK}"
    )


def load_config(source: str | None = None) -> PipelineConfig:
    """The configuration from `source`: "blocks", a file path, or the embedded default.

    Without an argument, the user setting ELICE_CONFIG decides (read here when the caller
    did not resolve it: a flow passes `settings.config`), then the embedded default file.
    """
    choice = source or Settings.from_environ().config
    if choice == "blocks":
        return load_blocks()
    return load_file(Path(choice) if choice else default_config_file())


def save_as_blocks(config: PipelineConfig) -> list[str]:
    """Save the configuration as Prefect blocks; returns the block document names."""
    config.catalog.save(CATALOG_BLOCK, overwrite=True)
    config.environments.save(ENVIRONMENTS_BLOCK, overwrite=True)
    return [CATALOG_BLOCK, ENVIRONMENTS_BLOCK]

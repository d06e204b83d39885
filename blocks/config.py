"""Load the pipeline's configuration: the checked-in file, or the saved Prefect blocks."""

from __future__ import annotations

from pathlib import Path

from blocks.catalog import ServiceCatalog
from blocks.environments import EnvironmentCatalog
from core.config import (
    CATALOG_BLOCK,
    ENVIRONMENTS_BLOCK,
    PerformancePolicy,
    PipelineConfig,
    default_config_file,
    load_committed,
    load_file,
    parse_config,
)
from core.errors import ConfigError
from core.settings import Settings

__all__ = [
    "CATALOG_BLOCK",
    "ENVIRONMENTS_BLOCK",
    "PerformancePolicy",
    "PipelineConfig",
    "default_config_file",
    "load_blocks",
    "load_committed",
    "load_config",
    "load_file",
    "parse_config",
    "save_as_blocks",
]


def repo_root(settings: Settings | None = None) -> Path:
    """The monorepo the pipeline builds: `settings.repo` (ELICE_REPO), or this checkout.

    Without `settings`, the user settings are read here (a caller outside a run).
    """
    return (settings or Settings.from_environ()).repo


def state_dir(settings: Settings | None = None) -> Path:
    """Where state lives: `settings.state_dir` (ELICE_STATE_DIR, default <checkout>/.elice).

    Without `settings`, the user settings are read here (a caller outside a run).
    """
    return (settings or Settings.from_environ()).resolved_state_dir()


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
    ServiceCatalog.model_validate(config.catalog.model_dump()).save(CATALOG_BLOCK, overwrite=True)
    EnvironmentCatalog.model_validate(config.environments.model_dump()).save(
        ENVIRONMENTS_BLOCK, overwrite=True
    )
    return [CATALOG_BLOCK, ENVIRONMENTS_BLOCK]

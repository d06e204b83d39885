"""A run's configuration, from where its host's trust says: the protected branch on a worker.

    pipeline_config(settings, config_source)

On a host with a trust file (every run a trusted worker starts), the configuration is
the file the trust file names (`config`, default config/pipeline.yaml) as committed on
the protected branch of the pinned repository, freshly fetched: the services, the
environments with their targets and registries, the load-probe policy. Not a file the
run names, not ELICE_CONFIG, not the saved blocks: each of those is a change nobody
reviewed. On a person's machine (no trust file, or one with `config: null`) it is what
they choose: `--config`, ELICE_CONFIG, or the embedded default.
"""

from __future__ import annotations

from blocks.config import PipelineConfig, load_committed, load_config
from blocks.repository import trusted_repository
from core.errors import ConfigError
from core.settings import Settings
from tasks.workspace import read_protected_file


def pipeline_config(settings: Settings, config_source: str | None = None) -> PipelineConfig:
    """The configuration a run acts on: the protected branch's on a worker, else the chosen one.

    Raises:
        ConfigError: on a worker, a configuration was chosen (`config_source`,
            ELICE_CONFIG), or the branch has no such file; the configuration is invalid.
        ToolError: the repository cannot be reached.
    """
    roots = settings.trust_roots()
    if roots is None or roots.config is None:  # the host's choice (a person's machine)
        return load_config(config_source or settings.config)
    chosen = config_source or settings.config
    if chosen:
        msg = (
            f"configuration {chosen!r} refused: on a host with a trust file the configuration "
            f"is {roots.config} as committed on {roots.protected_branch}"
        )
        raise ConfigError(msg)
    repository = trusted_repository(roots)
    where = f"{roots.config} on {roots.protected_branch} of {repository.label}"
    fetched: list[str] = []

    def read(path: str) -> str:
        text = read_protected_file(repository, path, fetch=not fetched)
        fetched.append(path)
        return text

    return load_committed(roots.config, read, where)

"""One flow run's context: what it resolves once at its start and passes down.

    resolve_run(settings, config, env, ...)   the context of a run deploying into `env`

A promotion, a rollback and a health check each resolve, at their start: the user
settings (`core.settings`, read once), the configuration, the environment, its deploy
target and registry, and the ledger's and backups' stores (the storage block loaded
once). Tasks get the parts they act on (the target, the environment, a store), never a
name to look up again.

The deployer is not part of the context: it holds clients (a Docker engine's, the
Kubernetes API's) that are neither picklable nor shared safely between the threads of a
deploy wave, and Prefect hashes and may persist task parameters. A task builds it from
the resolved `DeployTarget` (plain data, the blocks already loaded) at most once per task
run.
"""

from __future__ import annotations

from prefect.filesystems import WritableFileSystem
from pydantic import BaseModel, ConfigDict, Field

from blocks.config import PipelineConfig
from blocks.environments import EnvironmentSpec
from blocks.storage import release_stores
from core.settings import Settings
from tasks.deploy.target import DeployTarget, environment_target
from tasks.images import EnvironmentRegistry, environment_registry


class RunContext(BaseModel):
    """What one flow run resolved at its start: frozen, passed down."""

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    settings: Settings = Field(description="The user settings, read once")
    config: PipelineConfig = Field(description="The pipeline configuration")
    env: EnvironmentSpec = Field(description="The environment the run acts on")
    deploy_target: DeployTarget = Field(description="Its deploy target, blocks loaded")
    registry: EnvironmentRegistry | None = Field(
        default=None, description="Its registry with a login for this run (None: not needed)"
    )
    ledger: WritableFileSystem = Field(description="Where the release ledger lives")
    backups: WritableFileSystem = Field(description="Where environment backups live")


def resolve_run(
    settings: Settings,
    config: PipelineConfig,
    env: EnvironmentSpec,
    *,
    target: str | None = None,
    drill_env: dict[str, dict[str, str]] | None = None,
    registry: bool = True,
) -> RunContext:
    """The context of a run acting on `env`: its registry (when `registry`), its target
    (pulling with that registry's login), the stores.

    Raises:
        ConfigError: the target or registry cannot be loaded, `target` differs from the
            configured one, or the storage block is missing.
        ToolError: ECR's API refused or is unreachable.
    """
    own = environment_registry(env, settings.trust_roots()) if registry else None
    pulls = [own.access] if own is not None else []
    deploy_target = environment_target(
        env,
        target,
        drill_env,
        pulls,
        settings.docker_host,
        roots=settings.trust_roots(),
        expires_at=own.expires_at if own is not None else None,
    )
    ledger, backups = release_stores(settings)
    return RunContext(
        settings=settings,
        config=config,
        env=env,
        deploy_target=deploy_target,
        registry=own,
        ledger=ledger,
        backups=backups,
    )

"""`cicd status`: what runs where, from the configuration and the ledger.

The usual path imports no Prefect (nor its AWS or Kubernetes integrations): the
configuration's plain models (`core.config`), the ledger read from its directory
(`tasks.local_store`), the docker target's address (`core.catalog.local_address`), and
the saved blocks, where a server is configured or the stack's answers, read over plain
HTTP (`cicd.light_api`). What needs Prefect's blocks and clients takes the full path
(`cicd.light.full_path_needed`), and so does an environment on the kubernetes target (its
address comes from the cluster's client).
"""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer

from cicd.light import full_path_needed, light_config, local_ledger, read_docker_target
from cicd.options import ConfigOption, TargetOption, cli_settings, fail
from core.catalog import (
    EnvironmentSpec,
    check_target,
    local_address,
)
from core.config import PipelineConfig
from core.errors import ConfigError, PipelineError
from core.ledger import EnvironmentState, ReleaseRecord
from core.records import short_digest
from core.settings import Settings
from tasks.local_store import LedgerReader

COLUMNS = ("environment", "service", "state", "release", "digest", "address")


def _row(
    env: EnvironmentSpec, service: str, address: str, record: ReleaseRecord | None
) -> dict[str, Any]:
    return {
        "environment": env.name,
        "service": service,
        "release": record.release_id if record else None,
        "digest": record.image.digest if record else None,
        "version": record.image.version if record else None,
        "address": address,
        "state": ("verified" if record.verified else "deployed") if record else "absent",
        "deployed_at": record.deployed_at.isoformat() if record else None,
    }


def status_rows(
    cfg: PipelineConfig,
    envs: list[EnvironmentSpec],
    current: dict[str, EnvironmentState],
    address: Any,
) -> list[dict[str, Any]]:
    """One row per environment and service: `current` (each environment's latest ledger
    revision) and `address(env, service)`."""
    return [
        _row(env, svc.name, address(env, svc), current[env.name].services.get(svc.name))
        for env in envs
        for svc in cfg.catalog.services
    ]


def _full_rows(
    cfg: PipelineConfig | None, config: str | None, environment: str | None, target: str | None
) -> list[dict[str, Any]]:
    """The rows through Prefect's blocks and the deployers (see the module's docstring)."""
    from blocks.storage import ledger_filesystem  # noqa: PLC0415 - Prefect only here
    from cicd.common import cli_config, read_api  # noqa: PLC0415
    from tasks.deploy.target import environment_target  # noqa: PLC0415
    from tasks.releases import Ledger  # noqa: PLC0415

    settings = cli_settings()
    cfg = cfg or cli_config(config, settings)
    with read_api():
        try:
            envs = [cfg.environment(environment)] if environment else cfg.environments.environments
            deployers = {
                env.name: environment_target(
                    env, target, docker_host=settings.docker_host, roots=settings.trust_roots()
                ).deployer()
                for env in envs
            }
        except PipelineError as exc:
            fail(str(exc))
        book = Ledger(ledger_filesystem(settings))
        current = {env.name: book.current(env.name) for env in envs}
        return status_rows(cfg, envs, current, lambda e, s: deployers[e.name].address(e, s))


def _light_rows(
    settings: Settings, config: str | None, environment: str | None, target: str | None
) -> list[dict[str, Any]]:
    """The rows without Prefect; the full path where a kubernetes environment is shown."""
    cfg, api = light_config(settings, config)
    try:
        envs = [cfg.environment(environment)] if environment else cfg.environments.environments
        for env in envs:
            check_target(env, target)
    except ConfigError as exc:
        fail(str(exc))
    if any(env.target != "docker" for env in envs):
        return _full_rows(cfg, config, environment, target)
    read_docker_target(api)
    book = LedgerReader(local_ledger(settings))
    current = {env.name: book.current(env.name) for env in envs}
    return status_rows(cfg, envs, current, local_address)


def status(
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
    environment: Annotated[str | None, typer.Option(help="Only this environment.")] = None,
    config: ConfigOption = None,
    target: TargetOption = None,
) -> None:
    """What runs where: per environment and service, the release, digest, address and state.

    Read from the ledger and the configuration; saved blocks only from a running server
    (the configured one or the stack's), never a temporary one.
    """
    settings = cli_settings()
    full = full_path_needed(settings)
    if full:
        rows = _full_rows(None, config, environment, target)
    else:
        rows = _light_rows(settings, config, environment, target)
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    from rich.console import Console  # noqa: PLC0415 - the table only
    from rich.table import Table  # noqa: PLC0415

    table = Table(title="Releases")
    for column in COLUMNS:
        table.add_column(column)
    for row in rows:
        table.add_row(
            str(row["environment"]),
            str(row["service"]),
            str(row["state"]),
            str(row["release"] or ""),
            short_digest(row["digest"] or ""),
            str(row["address"]),
        )
    Console().print(table)


def register(app: typer.Typer) -> None:
    """Add `status` to `app`."""
    app.command()(status)

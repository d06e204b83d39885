"""`cicd audit`: every decision about an environment's gated promotions, from the ledger's
store; like `cicd status`, without Prefect where the ledger is on this host's disk
(`cicd.light`)."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from cicd.light import full_path_needed, light_config, local_ledger
from cicd.options import cli_settings, fail
from core.errors import ConfigError, PipelineError
from core.settings import Settings
from tasks.audit_trail import AuditEntry, read_entries


def _full_entries(settings: Settings, environment: str) -> tuple[str, list[AuditEntry]]:
    """The environment's name and its entries: the configured storage, Prefect's blocks."""
    from blocks.storage import ledger_filesystem  # noqa: PLC0415 - Prefect only here
    from cicd.common import cli_config, read_api  # noqa: PLC0415
    from tasks.audit import read_audit  # noqa: PLC0415

    try:
        environment = cli_config(None, settings).environments.resolve(environment).name
    except ConfigError as exc:
        fail(str(exc))
    try:
        with read_api():
            return environment, read_audit(ledger_filesystem(settings), environment)
    except (PipelineError, ValueError) as exc:
        fail(str(exc), 2)


def _light_entries(settings: Settings, environment: str) -> tuple[str, list[AuditEntry]]:
    """The environment's name (a seed alias resolved) and its entries, without Prefect."""
    cfg, _ = light_config(settings, None)
    try:
        environment = cfg.environments.resolve(environment).name
        return environment, read_entries(local_ledger(settings), environment)
    except (PipelineError, ValueError) as exc:
        fail(str(exc), 2)


def audit_command(
    environment: Annotated[str, typer.Argument(help="The environment whose decisions to list.")],
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per entry.")] = False,
) -> None:
    """Every decision about the environment's gated promotions, oldest first."""
    settings = cli_settings()
    if full_path_needed(settings):
        environment, entries = _full_entries(settings, environment)
    else:
        environment, entries = _light_entries(settings, environment)
    if as_json:
        for entry in entries:
            typer.echo(json.dumps(entry.model_dump(mode="json")))
        return
    from rich.console import Console  # noqa: PLC0415 - the table only
    from rich.table import Table  # noqa: PLC0415

    table = Table(title=f"approval audit of {environment}")
    for column in ("at", "run", "release", "decision", "who", "proof", "detail"):
        table.add_column(column)
    for e in entries:
        table.add_row(
            f"{e.at:%Y-%m-%d %H:%M:%S}",
            e.run_id[:8],
            e.release_id,
            e.kind,
            e.who,
            e.proof or "-",
            e.detail,
        )
    Console().print(table)


def register(app: typer.Typer) -> None:
    """Add `audit` to `app`."""
    app.command("audit")(audit_command)

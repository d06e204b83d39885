"""`cicd metrics`: the pipeline's delivery metrics (DORA) per environment, from the ledger.

Exit codes: 0 printed; 2 bad input (unknown environment, a window that is not positive).
`--json` prints one object per environment; `--prometheus` the text exposition format
(for a Pushgateway or a textfile collector).

Like `cicd status`, the usual path imports no Prefect: the configuration's plain models
(`cicd.light`), the ledger's directory (`tasks.local_store`) and the plain metrics
(`tasks.delivery`). A host with a trust file, or ELICE_STORAGE=blocks, reads the
configuration and the ledger through Prefect's blocks (`cicd.light.full_path_needed`).
"""

from __future__ import annotations

import json
from typing import Annotated

import typer

from cicd.light import full_path_needed, light_config, local_ledger
from cicd.options import ConfigOption, cli_settings, fail, split_names
from core.errors import PipelineError
from core.settings import Settings
from tasks.delivery import (
    DeliveryMetrics,
    environment_metrics,
    git_commit_times,
    metrics_row,
    prometheus_text,
)
from tasks.local_store import LedgerReader


def _metrics(
    settings: Settings, config: str | None, environment: str | None, days: float
) -> list[DeliveryMetrics]:
    """Each chosen environment's metrics: the full path through Prefect's blocks where the
    host needs it, else the configuration and the ledger read here."""
    full = full_path_needed(settings)
    if full:
        from cicd.common import cli_config  # noqa: PLC0415 - Prefect only here

        cfg = cli_config(config, settings)
    else:
        cfg, _ = light_config(settings, config)
    try:
        names = split_names(environment) or cfg.environments.names()
        envs = [cfg.environment(name).name for name in names]
    except PipelineError as exc:
        fail(str(exc))
    times = git_commit_times(settings.repo)
    if not full:
        book = LedgerReader(local_ledger(settings))
        return environment_metrics(envs, window_days=days, ledger=book, commit_times=times)
    from blocks.storage import ledger_filesystem  # noqa: PLC0415 - Prefect only here
    from cicd.common import read_api  # noqa: PLC0415
    from tasks.releases import Ledger  # noqa: PLC0415

    with read_api():
        ledger = Ledger(ledger_filesystem(settings))
        return environment_metrics(envs, window_days=days, ledger=ledger, commit_times=times)


def metrics(
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
    prometheus: Annotated[
        bool, typer.Option("--prometheus", help="Prometheus text exposition format.")
    ] = False,
    environment: Annotated[
        str | None, typer.Option(help="Only these environments (comma-separated).")
    ] = None,
    days: Annotated[float, typer.Option(help="The window, in days before now.")] = 30.0,
    config: ConfigOption = None,
) -> None:
    """Deployment frequency, lead time, change failure rate and time to restore per environment."""
    if as_json and prometheus:
        fail("--json and --prometheus exclude each other")
    if days <= 0:
        fail(f"--days must be positive, got {days}")
    found = _metrics(cli_settings(), config, environment, days)
    if as_json:
        typer.echo(json.dumps([m.model_dump(mode="json") for m in found], indent=2))
        return
    if prometheus:
        typer.echo(prometheus_text(found), nl=False)
        return
    from rich.console import Console  # noqa: PLC0415 - the table only
    from rich.table import Table  # noqa: PLC0415

    rows = [metrics_row(m) for m in found]
    table = Table(title=f"Delivery metrics, last {days:g} days")
    for column in rows[0] if rows else ["environment"]:
        table.add_column(column)
    for row in rows:
        table.add_row(*row.values())
    Console().print(table)


def register(app: typer.Typer) -> None:
    """Add `metrics` to the `cicd` application."""
    app.command("metrics")(metrics)

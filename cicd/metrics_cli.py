"""`cicd metrics`: the pipeline's delivery metrics (DORA) per environment, from the ledger.

Exit codes: 0 printed; 2 bad input (unknown environment, a window that is not positive).
`--json` prints one object per environment; `--prometheus` the text exposition format
(for a Pushgateway or a textfile collector).
"""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from cicd.common import ConfigOption, cli_config, cli_settings, fail, read_api, split_names
from core.errors import PipelineError

console = Console()


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
    from blocks.storage import ledger_filesystem  # noqa: PLC0415 - Prefect only when needed
    from tasks.metrics import (  # noqa: PLC0415
        environment_metrics,
        git_commit_times,
        metrics_row,
        prometheus_text,
    )
    from tasks.releases import Ledger  # noqa: PLC0415

    if as_json and prometheus:
        fail("--json and --prometheus exclude each other")
    if days <= 0:
        fail(f"--days must be positive, got {days}")
    settings = cli_settings()
    cfg = cli_config(config, settings)
    try:
        names = split_names(environment) or cfg.environments.names()
        envs = [cfg.environment(name).name for name in names]
    except PipelineError as exc:
        fail(str(exc))
    with read_api():
        ledger = Ledger(ledger_filesystem(settings))
        times = git_commit_times(settings.repo)
        found = environment_metrics(envs, window_days=days, ledger=ledger, commit_times=times)
    if as_json:
        typer.echo(json.dumps([m.model_dump(mode="json") for m in found], indent=2))
        return
    if prometheus:
        typer.echo(prometheus_text(found), nl=False)
        return
    rows = [metrics_row(m) for m in found]
    table = Table(title=f"Delivery metrics, last {days:g} days")
    for column in rows[0] if rows else ["environment"]:
        table.add_column(column)
    for row in rows:
        table.add_row(*row.values())
    console.print(table)


def register(app: typer.Typer) -> None:
    """Add `metrics` to the `cicd` application."""
    app.command("metrics")(metrics)

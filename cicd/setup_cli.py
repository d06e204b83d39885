"""`cicd setup`: make a Prefect server ready for the pipeline, and show what changed.

Exit codes: 0 done (or, with --dry-run, planned); 2 nothing was attempted (no API,
prefect.yaml or the server's state cannot be reconciled, the server does not answer).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from prefect.settings import PREFECT_API_URL, temporary_settings
from rich.console import Console
from rich.table import Table

from cicd.common import ConfigOption, api_settings, cli_config, fail, prefect_api
from core.errors import PipelineError

if TYPE_CHECKING:
    from reconcile.setup import SetupChange

console = Console()
_COLORS = {"create": "green", "update": "yellow", "unchanged": "dim"}


def changes_table(changes: list[SetupChange], *, title: str) -> Table:
    """One row per item: kind, name, action, detail."""
    table = Table(title=title)
    for column in ("kind", "name", "action", "detail"):
        table.add_column(column, overflow="fold")
    for change in changes:
        color = _COLORS[change.action]
        table.add_row(
            change.kind, change.name, f"[{color}]{change.action}[/{color}]", change.detail
        )
    return table


def setup_command(
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print what would change; change nothing.")
    ] = False,
    api_url: Annotated[
        str | None,
        typer.Option(help="The Prefect API (default PREFECT_API_URL, else the local stack's)."),
    ] = None,
    process_pool: Annotated[
        bool,
        typer.Option(
            "--process-pool/--no-process-pool",
            help="Also the process pools elice-process (CI, dev, staging) and elice-production"
            " that the trusted workers poll.",
        ),
    ] = True,
    worker_image: Annotated[
        str | None,
        typer.Option(help="Default image of the Docker and Kubernetes pools' flow runs."),
    ] = None,
    config: ConfigOption = None,
    kubeconfig: Annotated[
        Path | None,
        typer.Option(help="Kubeconfig of the kubernetes target's cluster, saved as a secret."),
    ] = None,
    kube_context: Annotated[
        str | None, typer.Option(help="Its context (default: the kubeconfig's current one).")
    ] = None,
) -> None:
    """Work pools, concurrency limits, blocks and prefect.yaml's deployments, idempotently."""
    from reconcile.setup import ensure_setup  # noqa: PLC0415 - the reconciler only when asked

    cfg = cli_config(config) if config else None
    try:
        # the stack's server (the default, or named by --api-url) with the stack's credentials
        api = temporary_settings(updates=api_settings(api_url)) if api_url else prefect_api()
        with api:
            url = str(PREFECT_API_URL.value())
            changes = ensure_setup(
                url,
                dry_run=dry_run,
                local_worker_pool=process_pool,
                worker_image=worker_image,
                config=cfg,
                kubeconfig=kubeconfig,
                kube_context=kube_context,
            )
    except PipelineError as exc:
        fail(str(exc))
    title = f"setup of {url}" + (" (dry run: nothing changed)" if dry_run else "")
    console.print(changes_table(changes, title=title))
    counts = {a: sum(c.action == a for c in changes) for a in ("create", "update", "unchanged")}
    verb = "would " if dry_run else ""
    console.print(
        f"{verb}create {counts['create']}, {verb}update {counts['update']}, "
        f"{counts['unchanged']} unchanged"
    )


def register(app: typer.Typer) -> None:
    """Add `setup` to the `cicd` app."""
    app.command("setup")(setup_command)

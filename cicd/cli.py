"""`cicd`: run the pipeline from a terminal."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from blocks.config import save_as_blocks
from cicd import (
    github,
    health_cli,
    history_cli,
    metrics_cli,
    promote_cli,
    setup_cli,
    stack_cli,
    status_cli,
)
from cicd.common import (
    ConfigOption,
    cli_config,
    cli_settings,
    fail,
    prefect_api,
    split_names,
)
from cicd.stack_status_cli import STACK_HELP
from core.errors import PipelineError
from core.records import StageResult, short_digest
from tasks.source import check_refs, verify_ref

app = typer.Typer(
    name="cicd",
    help="elice-devops: CI/CD for the 12-service monorepo, as Prefect flows.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)
app.add_typer(stack_cli.app, name="stack", help=STACK_HELP)
app.add_typer(github.app, name="github", help="GitHub: the repository set up for the pipeline.")
promote_cli.register(app)
setup_cli.register(app)
metrics_cli.register(app)
history_cli.register(app)
console = Console()


def ci_table(results: list[StageResult]) -> Table:
    """One row per service: result, stage counts, digest, and the first failure."""
    table = Table(title="CI")
    for column in ("service", "result", "stages", "digest", "first failure"):
        table.add_column(column, overflow="fold")
    for service in dict.fromkeys(r.service for r in results):
        mine = [r for r in results if r.service == service]
        failed = [r for r in mine if r.status == "failed"]
        counts = {status: sum(r.status == status for r in mine) for status in ("passed", "cached")}
        digest = next((str(r.details["digest"]) for r in mine if r.details.get("digest")), "")
        table.add_row(
            service,
            "[red]failed[/red]" if failed else "[green]passed[/green]",
            f"{counts['passed']} passed, {counts['cached']} cached, {len(failed)} failed",
            short_digest(digest),
            f"{failed[0].stage}: {failed[0].summary}" if failed else "",
        )
    return table


@app.command()
def ci(
    all_services: Annotated[bool, typer.Option("--all", help="Every service.")] = False,
    services: Annotated[str | None, typer.Option(help="Comma-separated services.")] = None,
    base: Annotated[str, typer.Option(help="Diff base for change detection.")] = "HEAD~1",
    head: Annotated[
        str, typer.Option(help="The commit to check (of this checkout; resolved to its SHA).")
    ] = "HEAD",
    no_cache: Annotated[bool, typer.Option("--no-cache", help="Re-run every stage.")] = False,
    deliver: Annotated[
        bool, typer.Option("--deliver/--no-deliver", help="Build, push, deploy, health-check.")
    ] = True,
    environment: Annotated[str, typer.Option(help="Where CI deploys.")] = "dev",
    config: ConfigOption = None,
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Prefect's log stream, not the progress table.")
    ] = False,
) -> None:
    """Run the CI flow on a commit of this checkout: checks, image, push, deploy, health.

    The flow checks the commit in a worktree of its own: commit what you want checked.
    Only a commit on the protected branch (main) deploys; any other is checked only.
    Progress: a live services x stages table on a terminal, one line per finished stage
    otherwise; the run's UI link first and the failures' output last.
    """
    settings = cli_settings()
    cfg = cli_config(config, settings)
    chosen = split_names(services)
    checked = cfg.catalog.names() if all_services else None  # None: change detection says
    try:
        cfg.environment(environment)
        if chosen:
            checked = [s.name for s in cfg.catalog.select(chosen)]
        if not chosen and not all_services:
            check_refs(settings.repo, base, head)
        head = verify_ref(settings.repo, head)
    except PipelineError as exc:
        fail(str(exc))
    from prefect.client.schemas.objects import State  # noqa: PLC0415 - Prefect when needed

    from cicd.progress import CI_VIEW, run_flow  # noqa: PLC0415
    from flows.ci import ci as ci_flow  # noqa: PLC0415 - loads Prefect only when needed
    from flows.ci import ci_outcome  # noqa: PLC0415

    def stage_results(state: State[Any]) -> list[StageResult]:
        found = ci_outcome(state)
        return list(found.results) if found is not None else []

    with prefect_api(start_stack=True):
        state = run_flow(
            ci_flow,
            {
                "services": chosen,
                "all_services": all_services,
                "base": base,
                "head": head,
                "no_cache": no_cache,
                "deliver": deliver,
                "environment": environment,
                "config_source": config,
            },
            view=CI_VIEW,
            console=console,
            services=cfg.catalog.names(),
            run_services=checked,
            verbose=verbose,
            results=stage_results,
        )
    results = stage_results(state)
    if results:
        console.print(ci_table(results))
    if state.is_completed():
        console.print(f"[green]{state.message or 'CI passed'}[/green]")
        return
    fail(state.message or "CI failed", 1)


status_cli.register(app)  # here: the help lists the commands in the order they were added
health_cli.register(app)


@app.command("register-blocks")
def register_blocks(config: ConfigOption = None) -> None:
    """Save the configuration as Prefect blocks (then `--config blocks` loads them)."""
    cfg = cli_config(config)
    for name in save_as_blocks(cfg):
        console.print(f"saved block [bold]{name}[/bold]")

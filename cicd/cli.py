"""`cicd`: run the pipeline from a terminal."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from blocks.config import save_as_blocks
from cicd import promote_cli, stack_cli
from cicd.common import ConfigOption, cli_config, fail, split_names
from tasks.models import StageResult

app = typer.Typer(
    name="cicd",
    help="elice-devops: CI/CD for the 12-service monorepo, as Prefect flows.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)
app.add_typer(stack_cli.app, name="stack", help="The local stack: Prefect, registry, engine.")
promote_cli.register(app)
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
            digest.removeprefix("sha256:")[:12],
            f"{failed[0].stage}: {failed[0].summary}" if failed else "",
        )
    return table


@app.command()
def ci(
    all_services: Annotated[bool, typer.Option("--all", help="Every service.")] = False,
    services: Annotated[str | None, typer.Option(help="Comma-separated services.")] = None,
    base: Annotated[str, typer.Option(help="Diff base for change detection.")] = "HEAD~1",
    head: Annotated[str, typer.Option(help="Diff head for change detection.")] = "HEAD",
    no_cache: Annotated[bool, typer.Option("--no-cache", help="Re-run every stage.")] = False,
    deliver: Annotated[
        bool, typer.Option("--deliver/--no-deliver", help="Build, push, deploy, health-check.")
    ] = True,
    environment: Annotated[str, typer.Option(help="Where CI deploys.")] = "dev",
    config: ConfigOption = None,
) -> None:
    """Run the CI flow: change detection, lock, quality, tests, image, push, deploy, health."""
    cfg = cli_config(config)
    chosen = split_names(services)
    if chosen:
        try:
            cfg.catalog.select(chosen)
        except ValueError as exc:
            fail(str(exc))
    from flows.ci import ci as ci_flow  # noqa: PLC0415 - loads Prefect only when needed

    with promote_cli.prefect_api(start_stack=True):
        state = ci_flow(
            services=chosen,
            all_services=all_services,
            base=base,
            head=head,
            no_cache=no_cache,
            deliver=deliver,
            environment=environment,
            config_source=config,
            return_state=True,
        )
    outcome = state.result(raise_on_failure=False)
    results = getattr(outcome, "results", None)
    if results:
        console.print(ci_table(results))
    if state.is_completed():
        console.print(f"[green]{state.message or 'CI passed'}[/green]")
        return
    fail(state.message or "CI failed", 1)


@app.command()
def status(
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
    environment: Annotated[str | None, typer.Option(help="Only this environment.")] = None,
    config: ConfigOption = None,
) -> None:
    """What runs where: per environment and service, the release, digest, address and state."""
    from tasks.releases import Ledger  # noqa: PLC0415

    cfg = cli_config(config)
    envs = [cfg.environment(environment)] if environment else cfg.environments.environments
    rows = []
    book = Ledger()
    for env in envs:
        current = book.current(env.name)
        for svc in cfg.catalog.services:
            record = current.services.get(svc.name)
            rows.append(
                {
                    "environment": env.name,
                    "service": svc.name,
                    "release": record.release_id if record else None,
                    "digest": record.image.digest if record else None,
                    "version": record.image.version if record else None,
                    "address": f"http://127.0.0.1:{env.host_port(svc.port)}",
                    "state": ("verified" if record.verified else "deployed")
                    if record
                    else "absent",
                    "deployed_at": record.deployed_at.isoformat() if record else None,
                }
            )
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    table = Table(title="Releases")
    for column in ("environment", "service", "state", "release", "digest", "address"):
        table.add_column(column)
    for row in rows:
        digest = row["digest"] or ""
        table.add_row(
            str(row["environment"]),
            str(row["service"]),
            str(row["state"]),
            str(row["release"] or ""),
            digest.removeprefix("sha256:")[:12],
            str(row["address"]),
        )
    console.print(table)


@app.command()
def health(
    environment: Annotated[str, typer.Argument(help="dev, staging or production.")],
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Every check.")] = False,
    services: Annotated[str | None, typer.Option(help="Comma-separated services.")] = None,
    config: ConfigOption = None,
) -> None:
    """Health-check every service of an environment (the seed's health-check.sh)."""
    cfg = cli_config(config)
    try:
        cfg.environment(environment)
    except KeyError as exc:
        fail(str(exc.args[0]))
    from flows.health import health_check  # noqa: PLC0415

    with promote_cli.prefect_api(start_stack=True):
        state = health_check(
            environment=environment,
            services=split_names(services),
            config_source=config,
            return_state=True,
        )
    report = state.result(raise_on_failure=False)
    for result in getattr(report, "results", []) or []:
        mark = "[green]ok[/green]" if result.ok else "[red]FAIL[/red]"
        line = f"{mark} {result.service:14} {result.url}"
        if verbose or not result.ok:
            line += f"  ({result.attempts} attempts, {result.seconds:.1f}s)"
            if result.failures:
                line += "  " + "; ".join(result.failures)
        console.print(line)
    if not state.is_completed():
        fail(state.message or "unhealthy", 1)


@app.command("register-blocks")
def register_blocks(config: ConfigOption = None) -> None:
    """Save the configuration as Prefect blocks (then `--config blocks` loads them)."""
    cfg = cli_config(config)
    for name in save_as_blocks(cfg):
        console.print(f"saved block [bold]{name}[/bold]")

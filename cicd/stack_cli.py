"""`cicd stack up|down|status`: the local engine, registry, base image and Prefect server."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.table import Table

from cicd.stack import StackError, StackPart, ensure_stack, stack_status, stop_stack

app = typer.Typer(help="The local stack: container engine, OCI registry, base image, Prefect.")
console = Console()


def _table(parts: list[StackPart]) -> Table:
    table = Table(title="local stack")
    table.add_column("part")
    table.add_column("state")
    table.add_column("address")
    colors = {"running": "green", "present": "green", "external": "cyan"}
    for part in parts:
        color = colors.get(part.state, "red")
        table.add_row(part.name, f"[{color}]{part.state}[/{color}]", part.address)
    return table


@app.command()
def up(
    prefect: bool = typer.Option(False, "--prefect", help="Also start a Prefect server"),
) -> None:
    """Start what is not running; reuse what is."""
    try:
        info = ensure_stack(prefect=prefect)
    except StackError as exc:
        console.print(f"[red]stack up failed:[/red] {exc}")
        raise typer.Exit(1) from None
    console.print(_table(stack_status()))
    console.print(f"export DOCKER_HOST={info.docker_host}")
    if info.prefect_api_url:
        console.print(f"export PREFECT_API_URL={info.prefect_api_url}")


@app.command()
def down() -> None:
    """Stop the processes the stack started (containers and images are kept)."""
    stopped = stop_stack()
    console.print(f"stopped: {', '.join(stopped) or 'nothing was running'}")


@app.command()
def status() -> None:
    """Show each part, its state and address; exit 1 when engine or registry is down."""
    parts = stack_status()
    console.print(_table(parts))
    if any(p.state == "stopped" for p in parts if p.name in {"engine", "registry"}):
        raise typer.Exit(1)

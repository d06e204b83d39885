"""`cicd stack status`: each part of the local stack, its state and address; no Prefect.

The console script loads this module alone for `cicd stack status` (cicd/entry.py): the
checks read the stack's record, pid files and sockets and ask each part over plain HTTP
(stack/status.py), so the answer takes a fraction of a second instead of Prefect's import.
`cicd/stack_cli.py` registers the same command, and the same table after `stack up`.
"""

from __future__ import annotations

import typer
from rich.console import Console
from rich.table import Table

from stack.steps import StackPart

STACK_HELP = "The local stack: Prefect, registry, engine."


def parts_table(parts: list[StackPart]) -> Table:
    """The parts as a table, each state colored: green up, cyan external, red down."""
    table = Table(title="local stack")
    table.add_column("part")
    table.add_column("state")
    table.add_column("address")
    colors = {"running": "green", "present": "green", "external": "cyan"}
    for part in parts:
        color = colors.get(part.state, "red")
        table.add_row(part.name, f"[{color}]{part.state}[/{color}]", part.address)
    return table


def status() -> None:
    """Show each part, its state and address (Prometheus, Alertmanager and the alert log once
    started); exit 1 when engine or registry is down."""
    from stack.status import stack_status  # noqa: PLC0415 - only when asked

    parts = stack_status()
    Console().print(parts_table(parts))
    if any(p.state == "stopped" for p in parts if p.name in {"engine", "registry"}):
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    """Add the `stack` group with its `status` command alone to `app` (the light entry)."""
    group = typer.Typer(help=STACK_HELP)
    group.command()(status)
    app.add_typer(group, name="stack", help=STACK_HELP)

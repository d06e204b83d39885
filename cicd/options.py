"""What every `cicd` command shares and costs no Prefect import: options, errors, settings.

The read commands' light path (`cicd status`) is built on this alone; `cicd.common`
re-exports it beside what needs Prefect (the API a command talks to).
"""

from __future__ import annotations

from typing import Annotated, NoReturn

import typer

from core.settings import Settings

ConfigOption = Annotated[
    str | None,
    typer.Option("--config", help="A config file, or 'blocks' for the saved blocks."),
]

TargetOption = Annotated[
    str | None,
    typer.Option(help="Deploy target, only to confirm the environment's configured one."),
]


def fail(message: str, code: int = 2) -> NoReturn:
    """Print `message` to stderr, unwrapped, and exit with `code`."""
    typer.secho(message, err=True, fg=typer.colors.RED)
    raise typer.Exit(code)


def cli_settings() -> Settings:
    """The user settings (ELICE_CONFIG, ELICE_STATE_DIR, ...), read once by a command and
    passed down from there."""
    return Settings.from_environ()


def split_names(value: str | None) -> list[str] | None:
    """`a, b,c` -> ["a", "b", "c"]; empty -> None."""
    return [v.strip() for v in value.split(",") if v.strip()] if value else None

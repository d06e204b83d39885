"""What every `cicd` command shares: options, configuration, errors, the local stack."""

from __future__ import annotations

import os
from typing import Annotated, NoReturn

import typer

from blocks.config import ConfigError, PipelineConfig, load_config
from cicd.stack import StackInfo, ensure_stack

ConfigOption = Annotated[
    str | None,
    typer.Option("--config", help="A config file, or 'blocks' for the saved blocks."),
]


def fail(message: str, code: int = 2) -> NoReturn:
    """Print `message` to stderr, unwrapped, and exit with `code`."""
    typer.secho(message, err=True, fg=typer.colors.RED)
    raise typer.Exit(code)


def cli_config(source: str | None) -> PipelineConfig:
    """The configuration from `source`; an invalid one ends the command with exit code 2."""
    try:
        return load_config(source)
    except ConfigError as exc:
        fail(str(exc))


def split_names(value: str | None) -> list[str] | None:
    """`a, b,c` -> ["a", "b", "c"]; empty -> None."""
    return [v.strip() for v in value.split(",") if v.strip()] if value else None


def use_stack(*, prefect: bool = True) -> StackInfo:
    """Bring up the local stack and point this process (and its flows) at it."""
    info = ensure_stack(prefect=prefect)
    os.environ.setdefault("DOCKER_HOST", info.docker_host)
    os.environ.setdefault("ELICE_REGISTRY", info.registry)
    os.environ.setdefault("ELICE_BASE_IMAGE", info.base_image)
    if info.prefect_api_url and not os.environ.get("PREFECT_API_URL"):
        os.environ["PREFECT_API_URL"] = info.prefect_api_url
    return info

"""The `cicd` console script: the read commands load only their light modules.

`status`, `health`, `audit` and `metrics` answer from the configuration and the ledger
without Prefect (`cicd.light`); every other command (and `cicd --help`, and `cicd stack
status`, whose stack modules import it) loads the whole command line (`cicd.cli`), which
imports Prefect and the pipeline through its subcommands. Each light command still takes
the full path where its host needs Prefect (a trust file, ELICE_STORAGE=blocks; see each
command).
"""

from __future__ import annotations

import sys

LIGHT = ("status", "health", "audit", "metrics")


def _light_app(command: str) -> None:
    """`command` alone, as `cicd.cli` registers it: only its own modules are imported (the
    probes' HTTP client for `health`, say, never for `status`)."""
    import importlib  # noqa: PLC0415

    import typer  # noqa: PLC0415

    app = typer.Typer(name="cicd", no_args_is_help=True, pretty_exceptions_show_locals=False)

    @app.callback()
    def _group() -> None:
        """elice-devops: CI/CD for the 12-service monorepo, as Prefect flows."""

    importlib.import_module(f"cicd.{command}_cli").register(app)
    app()


def main() -> None:
    """Run the command named on the command line."""
    if sys.argv[1:2] and sys.argv[1] in LIGHT:
        _light_app(sys.argv[1])
        return
    from cicd.cli import app as full  # noqa: PLC0415 - Prefect and every command

    full()

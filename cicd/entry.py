"""The `cicd` console script: the read commands load only their light modules.

`status`, `audit`, `metrics`, `health` and `stack status` answer from the configuration,
the ledger and the stack's record without Prefect (`cicd.light`); every other command
(and `cicd --help`) loads the whole command line (`cicd.cli`), which imports Prefect and
the pipeline through its subcommands. Each light command still takes the full path where
its host needs Prefect (a trust file, ELICE_STORAGE=blocks; see each command).
"""

from __future__ import annotations

import sys

LIGHT = ("status", "health", "audit", "metrics")


def _light_app() -> None:
    """The light commands alone, as `cicd.cli` registers them."""
    import typer  # noqa: PLC0415

    from cicd import audit_cli, health_cli, metrics_cli, status_cli  # noqa: PLC0415

    app = typer.Typer(name="cicd", no_args_is_help=True, pretty_exceptions_show_locals=False)

    @app.callback()
    def _group() -> None:
        """elice-devops: CI/CD for the 12-service monorepo, as Prefect flows."""

    status_cli.register(app)
    health_cli.register(app)
    app.command("audit")(audit_cli.audit_command)
    metrics_cli.register(app)
    app()


def main() -> None:
    """Run the command named on the command line."""
    if sys.argv[1:2] and sys.argv[1] in LIGHT:
        _light_app()
        return
    from cicd.cli import app as full  # noqa: PLC0415 - Prefect and every command

    full()

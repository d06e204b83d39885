"""The `cicd` console script: `cicd status` and `cicd audit` load only their light modules.

Every other command (and `cicd --help`) loads the whole command line (`cicd.cli`), which
imports Prefect and the pipeline through its subcommands; `status` answers from the
configuration and the ledger in a fraction of that (`cicd.status_cli`).
"""

from __future__ import annotations

import sys

LIGHT = ("status", "audit")


def main() -> None:
    """Run the command named on the command line."""
    if sys.argv[1:2] and sys.argv[1] in LIGHT:
        import typer  # noqa: PLC0415

        from cicd import audit_cli, status_cli  # noqa: PLC0415

        app = typer.Typer(name="cicd", no_args_is_help=True, pretty_exceptions_show_locals=False)

        @app.callback()
        def _group() -> None:
            """elice-devops: CI/CD for the 12-service monorepo, as Prefect flows."""

        status_cli.register(app)
        app.command("audit")(audit_cli.audit_command)
        app()
        return
    from cicd.cli import app as full  # noqa: PLC0415 - Prefect and every command

    full()

"""The `cicd` console script: the read commands load only their light modules.

`status`, `health`, `audit` and `metrics` answer from the configuration and the ledger
without Prefect (`cicd.light`), and `cicd stack status` from the stack's record and its
parts' own answers (`cicd.stack_status_cli`); every other command (and `cicd --help`,
`cicd stack --help`) loads the whole command line (`cicd.cli`), which imports Prefect and
the pipeline through its subcommands. Each light command still takes the full path where
its host needs Prefect (a trust file, ELICE_STORAGE=blocks; see each command).
"""

from __future__ import annotations

import sys

LIGHT = ("status", "health", "audit", "metrics")
LIGHT_GROUPS = {("stack", "status"): "stack_status"}
"""A command of a group: its words, and the module (`cicd.<module>_cli`) that registers
the group with that command alone."""


def _light_app(module: str) -> None:
    """The command of `cicd.<module>_cli` alone, as `cicd.cli` registers it: only its own
    modules are imported (the probes' HTTP client for `health`, say, never for `status`)."""
    import importlib  # noqa: PLC0415

    import typer  # noqa: PLC0415

    app = typer.Typer(name="cicd", no_args_is_help=True, pretty_exceptions_show_locals=False)

    @app.callback()
    def _group() -> None:
        """elice-devops: CI/CD for the 12-service monorepo, as Prefect flows."""

    importlib.import_module(f"cicd.{module}_cli").register(app)
    app()


def main() -> None:
    """Run the command named on the command line."""
    if sys.argv[1:2] and sys.argv[1] in LIGHT:
        _light_app(sys.argv[1])
        return
    words = [*sys.argv[1:3], "", ""]
    group = LIGHT_GROUPS.get((words[0], words[1]))
    if group is not None:
        _light_app(group)
        return
    from cicd.cli import app as full  # noqa: PLC0415 - Prefect and every command

    full()

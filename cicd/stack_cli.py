"""`cicd stack up|down|status`: the local engine, registry, base image, Prefect server,
Prometheus and Alertmanager."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.status import Status

from blocks.stack import stack_auth_file
from cicd.common import service_ports
from cicd.stack_status_cli import parts_table, status
from core.errors import StackError
from stack.steps import StackStep

app = typer.Typer(
    help="The local stack: container engine, OCI registry, base image, Prefect, monitoring."
)
console = Console()


class StepPrinter:
    """Prints `ensure_stack`'s steps as they happen.

    On a terminal: a spinner names the running step, and each finished step leaves one
    line (`engine: starting podman API service ... ready in 1.2s`). Otherwise (a pipe, a
    CI log): plain lines, one when a step starts and one when it ends, no spinner.
    """

    def __init__(self, out: Console) -> None:
        self.out = out
        self._running: list[StackStep] = []
        self._status: Status | None = None

    def __call__(self, step: StackStep) -> None:
        if not self.out.is_terminal:
            self._print(step.line())
            return
        if step.state == "start":
            self._running.append(step)
        elif step.state == "info":
            self._print(step.line())
        else:
            begun = next((s for s in reversed(self._running) if s.part == step.part), None)
            if begun is not None:
                self._running.remove(begun)
                self._print(f"{begun.line()} {step.outcome()}")
            else:
                self._print(step.line())
        self._spin()

    def _print(self, line: str) -> None:
        self.out.print(line, markup=False, highlight=False, soft_wrap=True)

    def _spin(self) -> None:
        if self._running:
            text = self._running[-1].line()
            if self._status is None:
                self._status = self.out.status(text)
                self._status.start()
            else:
                self._status.update(text)
        else:
            self.close()

    def close(self) -> None:
        """Stop the spinner, if one runs."""
        if self._status is not None:
            self._status.stop()
            self._status = None


@app.command()
def up(
    prefect: bool = typer.Option(
        True, "--prefect/--no-prefect", help="A Prefect server, its deployments and a worker."
    ),
    monitoring: bool = typer.Option(
        True,
        "--monitoring/--no-monitoring",
        help="Prometheus and Alertmanager (alerts to Slack / PagerDuty, else to a log).",
    ),
    repository: str | None = typer.Option(
        None,
        "--repository",
        help="The repository the worker pins (clone URL or path): its main decides what runs "
        "and ships. Default: the one pinned before, else this checkout.",
    ),
) -> None:
    """Start what is not running; reuse what is. Says what it installs and starts, with timings.

    With Prefect (the default): the server, the work pool, limits, blocks and every
    deployment of prefect.yaml, a supervised process worker (`cicd stack down` stops it),
    and the Slack receiver for the approval buttons (secret and users from the server's
    Secret block and the protected approval policy; Slack reaches it through your HTTPS).
    With monitoring (the default): Prometheus scraping every service of every environment
    on the docker target, and Alertmanager sending to the saved Slack / PagerDuty blocks,
    else to `<stack dir>/logs/alerts.log` (`--no-monitoring` keeps running ones).
    """
    from stack.control import ensure_stack, stack_status  # noqa: PLC0415 - only when asked

    if repository and Path(repository).exists():  # a local path: the worker's cwd differs
        repository = str(Path(repository).resolve())

    printer = StepPrinter(console)
    try:
        info = ensure_stack(
            prefect=prefect,
            worker=prefect,
            monitoring=monitoring,
            progress=printer,
            repository=repository,
            service_ports=service_ports(),
        )
    except StackError as exc:
        printer.close()
        console.print("stack up failed:", style="red", highlight=False)
        console.print(str(exc), markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(1) from exc
    printer.close()
    console.print(parts_table(stack_status()))
    console.print(f"export DOCKER_HOST={info.docker_host}", highlight=False, soft_wrap=True)
    if info.prefect_api_url:
        console.print(f"export PREFECT_API_URL={info.prefect_api_url}", highlight=False)
        # the command that reads the auth string, never the string itself
        console.print(
            f'export PREFECT_API_AUTH_STRING="$(cat {stack_auth_file()})"',
            highlight=False,
            soft_wrap=True,
        )
    if info.prometheus_url:
        console.print(f"Prometheus {info.prometheus_url}", highlight=False)
    if info.alertmanager_url:
        console.print(f"Alertmanager {info.alertmanager_url}", highlight=False)
    if info.slack_receiver_url:
        console.print(f"Slack receiver {info.slack_receiver_url}/slack/actions", highlight=False)


@app.command()
def down() -> None:
    """Stop the processes the stack started (containers and images are kept); the engine's
    storage is unmounted once no container runs in it."""
    from stack.control import stop_stack  # noqa: PLC0415 - only when asked

    stopped = stop_stack(say=lambda note: console.print(note, markup=False, highlight=False))
    console.print(f"stopped: {', '.join(stopped) or 'nothing was running'}")


app.command()(status)  # cicd/stack_status_cli.py: also the console script's light entry

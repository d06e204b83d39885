"""`cicd health ENV`: is every deployed service of an environment healthy and on its release?

The health-check flow's decisions (`tasks.probes`: what to check, the report, when it
fails) without a flow run: the command reads and probes, and writes nothing (no run, no
artifact, no Slack or PagerDuty notice, no pull secret; the scheduled health-check
deployment does those). Like `cicd status`, the usual path imports no Prefect: the
configuration's plain models, the ledger's directory, the docker target's address, the
saved docker target read over plain HTTP where a server answers. The full path, through
Prefect's blocks and the deployers, stays for a host with a trust file (its configuration
from the protected branch, its pinned blocks and ledger), for ELICE_STORAGE=blocks (the
storage block's nested AWS credentials) and for an environment on the kubernetes target
(its address comes from the cluster's client).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Annotated

import typer

from cicd.light import full_path_needed, light_config, local_ledger, read_docker_target
from cicd.options import ConfigOption, cli_settings, fail, split_names
from core.catalog import (
    EnvironmentSpec,
    ServiceSpec,
    local_address,
)
from core.config import PipelineConfig
from core.errors import ConfigError, EnvironmentUnhealthy, PipelineError
from core.ledger import EnvironmentState
from core.records import HealthReport
from core.settings import Settings
from tasks.local_store import LedgerReader
from tasks.probes import checked_services, health_report, probe_all, raise_unhealthy

Checked = tuple[HealthReport, str]
"""The report and the failure's message ("" when healthy)."""


def _check(
    env: EnvironmentSpec,
    specs: list[ServiceSpec],
    named: list[str] | None,
    deadline: float,
    reads: Callable[[], tuple[EnvironmentState, Callable[[ServiceSpec], str]]],
) -> Checked:
    """Check `env` as the flow does; `reads()` gives its ledger revision and the services'
    addresses. A failure is the report and its message, as the flow's failed state."""
    try:
        ledger, address = reads()
        checked = checked_services(env.name, specs, ledger, named)
        outcomes = probe_all(address, checked, deadline, ledger)
        report = health_report(env.name, specs, outcomes, address, named)
        raise_unhealthy(report, ledger)
    except EnvironmentUnhealthy as exc:
        return exc.report or HealthReport(environment=env.name, results=[]), str(exc)
    except PipelineError as exc:  # the target, the storage: as the flow failed on them
        return HealthReport(environment=env.name, results=[]), str(exc)
    return report, ""


def _chosen(cfg: PipelineConfig, environment: str, named: list[str] | None) -> EnvironmentSpec:
    """The environment (a seed alias resolved), the named services checked to exist; exit
    2 naming what is unknown."""
    try:
        env = cfg.environments.resolve(environment)
        if named:
            cfg.catalog.select(named)
    except ConfigError as exc:
        fail(str(exc))
    return env


def _full(
    settings: Settings,
    config: str | None,
    environment: str,
    named: list[str] | None,
    deadline: float,
) -> Checked:
    """Through Prefect's blocks and the environment's deployer (see the module's docstring)."""
    from cicd.common import cli_config, read_api  # noqa: PLC0415 - Prefect only here
    from tasks.context import resolve_run  # noqa: PLC0415
    from tasks.deployment_check import require_trusted_environment  # noqa: PLC0415
    from tasks.releases import Ledger  # noqa: PLC0415

    cfg = cli_config(config, settings)
    env = _chosen(cfg, environment, named)
    specs = cfg.catalog.select(named) if named else cfg.catalog.services

    def reads() -> tuple[EnvironmentState, Callable[[ServiceSpec], str]]:
        require_trusted_environment(settings, env.name)  # the worker's trust file, if any
        context = resolve_run(settings, cfg, env, registry=False)
        deployer = context.deploy_target.deployer()
        return Ledger(context.ledger).current(env.name), lambda s: deployer.address(env, s)

    with read_api():
        return _check(env, specs, named, deadline, reads)


def _light(
    settings: Settings,
    config: str | None,
    environment: str,
    named: list[str] | None,
    deadline: float,
) -> Checked:
    """From the configuration and the ledger's directory; the full path for kubernetes."""
    cfg, api = light_config(settings, config)
    env = _chosen(cfg, environment, named)
    if env.target != "docker":
        return _full(settings, config, environment, named, deadline)
    specs = cfg.catalog.select(named) if named else cfg.catalog.services
    read_docker_target(api)

    def reads() -> tuple[EnvironmentState, Callable[[ServiceSpec], str]]:
        ledger = LedgerReader(local_ledger(settings)).current(env.name)
        return ledger, lambda s: local_address(env, s)

    return _check(env, specs, named, deadline, reads)


def health(
    environment: Annotated[
        str, typer.Argument(help="dev, staging or production (or the seed's stg, prod).")
    ],
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Every check.")] = False,
    services: Annotated[str | None, typer.Option(help="Comma-separated services.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="The report as JSON on stdout.")] = False,
    deadline: Annotated[
        float, typer.Option(min=0.1, help="Seconds each service may take to become healthy.")
    ] = 15.0,
    config: ConfigOption = None,
) -> None:
    """Health-check every deployed service of an environment (the seed's health-check.sh).

    Exit 0 healthy; 1 unhealthy or nothing deployed; 2 bad input, before anything starts.
    Reads and probes only: the scheduled health check notifies.
    """
    settings = cli_settings()
    named = split_names(services)
    path = _full if full_path_needed(settings) else _light
    report, message = path(settings, config, environment, named, deadline)
    if as_json:
        typer.echo(json.dumps({**report.as_json(), "message": message}, indent=2))
    else:
        _print(report, verbose=verbose)
    if not report.ok:  # the flow fails exactly then: nothing checked, or a service failed
        fail(message or "unhealthy", 1)
    if not as_json:
        from rich.console import Console  # noqa: PLC0415 - the text only

        healthy = f"{report.environment}: {len(report.results)} services healthy"
        Console().print(f"[green]{healthy}[/green]")


def _print(report: HealthReport, *, verbose: bool) -> None:
    """One line per service: ok or FAIL, its URL; the attempts and failures when failed
    (every check with `verbose`)."""
    from rich.console import Console  # noqa: PLC0415 - the text only
    from rich.markup import escape  # noqa: PLC0415

    console = Console()
    for result in report.results:
        mark = "[green]ok[/green]" if result.ok else "[red]FAIL[/red]"
        line = f"{result.service:14} {result.url}"
        if verbose or not result.ok:
            line += f"  ({result.attempts} attempts, {result.seconds:.1f}s)"
            if result.failures:
                line += "  " + "; ".join(result.failures)
        console.print(f"{mark} {escape(line)}", highlight=False, soft_wrap=True)


def register(app: typer.Typer) -> None:
    """Add `health` to `app`."""
    app.command()(health)

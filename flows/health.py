"""The health-check flow: is every service of an environment healthy and on its release?

A check of nothing is not a pass: an environment whose ledger records no release fails
with "nothing deployed". The seed's environment names (`dev`, `stg`, `prod`) are accepted
for dev, staging and production (`EnvironmentCatalog.resolve`), so a deployment's
parameters and `cicd health` get the same answer.
"""

from __future__ import annotations

from typing import Any

from prefect import Flow, flow, unmapped
from prefect.client.schemas.objects import FlowRun, State

from blocks.catalog import ServiceSpec
from blocks.environments import EnvironmentSpec
from core.ledger import EnvironmentState
from core.records import HealthReport, HealthResult
from core.settings import Settings
from tasks.context import resolve_run
from tasks.deploy import refresh_pull_credentials
from tasks.deploy.target import Deployer
from tasks.deployment_check import refuse_local_only, require_trusted_environment
from tasks.health import probe_service_health, publish_health_report
from tasks.notify import Notice, flow_run_url, notify, paged_environment
from tasks.probes import checked_services, health_report, raise_unhealthy
from tasks.releases import read_ledger
from tasks.trusted import pipeline_config


def _notify_health(flow_run: FlowRun, state: State[Any], *, healthy: bool) -> None:
    params = flow_run.parameters or {}
    name, paged = paged_environment(
        str(params.get("environment") or "dev"),
        Settings.from_environ(),
        params.get("config_source"),
    )
    notice = Notice(
        kind="healthy" if healthy else "failed",
        environment=name,
        flow_run_url=flow_run_url(str(flow_run.id)),
        message=state.message or ("healthy" if healthy else "health check failed"),
    )
    # Healthy: only PagerDuty hears it (it resolves the incident); Slack would hear it
    # every 15 minutes.
    notify(notice, slack=None if healthy else "saved", paged=(name,) if paged else ())


def notify_unhealthy(flow: Flow[..., Any], flow_run: FlowRun, state: State[Any]) -> None:  # noqa: ARG001
    """on_failure / on_crashed: Slack; PagerDuty triggers where the environment pages."""
    _notify_health(flow_run, state, healthy=False)


def resolve_incident(flow: Flow[..., Any], flow_run: FlowRun, state: State[Any]) -> None:  # noqa: ARG001
    """on_completion: a healthy environment resolves its PagerDuty incident, if any."""
    _notify_health(flow_run, state, healthy=True)


@flow(
    name="health-check",
    log_prints=False,
    on_completion=[resolve_incident],
    on_failure=[notify_unhealthy],
    on_crashed=[notify_unhealthy],
)
def health_check(
    environment: str = "dev",
    services: list[str] | None = None,
    deadline_s: float = 15.0,
    config_source: str | None = None,
    target: str | None = None,
    refresh_pull_secret: bool = False,
) -> HealthReport:
    """Check /health, /ready and the recorded digest of each deployed service.

    `environment` may be a seed alias (dev, stg, prod). Without `services`, every service
    the ledger records is checked; a named service that the ledger does not record fails.
    `refresh_pull_secret` (the scheduled deployments set it): first renew the pull
    credentials the environment keeps, if they no longer serve: on the kubernetes target
    the namespace's pull secret, whose ECR token would otherwise lapse 12 h after the
    last deploy wrote it (a pod rescheduled after that could not pull its image).

    Raises:
        ConfigError: an unknown environment or service, or a `target` other than the
            environment's configured one.
        EnvironmentUnhealthy: nothing deployed, or a service is unhealthy.
    """
    settings = Settings.from_environ()
    require_trusted_environment(settings, environment)  # the worker's trust file, if any
    refuse_local_only(settings, {"config_source": config_source})
    cfg = pipeline_config(settings, config_source)
    env = cfg.environments.resolve(environment)
    specs = cfg.catalog.select(services) if services else cfg.catalog.services
    context = resolve_run(settings, cfg, env, target=target, registry=refresh_pull_secret)
    if refresh_pull_secret:
        refresh_pull_credentials(context.deploy_target, env)
    deployer = context.deploy_target.deployer()
    ledger = read_ledger(context.ledger, env.name)
    checked = checked_services(env.name, specs, ledger, services)
    outcomes = _probe(deployer, env, checked, deadline_s, ledger)
    report = health_report(env.name, specs, outcomes, lambda s: deployer.address(env, s), services)
    publish_health_report(report)
    raise_unhealthy(report, ledger)
    return report


def _probe(
    deployer: Deployer,
    env: EnvironmentSpec,
    checked: list[ServiceSpec],
    deadline_s: float,
    ledger: EnvironmentState,
) -> dict[str, HealthResult]:
    """Each checked service's health on the digest the ledger records (a probe that could
    not run counts as unhealthy)."""
    states = probe_service_health.map(
        [deployer.address(env, s) for s in checked],
        checked,
        unmapped(deadline_s),
        [ledger.services[s.name].image.digest for s in checked],
        return_state=True,
    )
    return {
        spec.name: state.result()
        if state.is_completed()
        else HealthResult(
            service=spec.name,
            url=deployer.address(env, spec),
            ok=False,
            attempts=0,
            seconds=0.0,
            failures=[state.message or "health check failed"],
        )
        for spec, state in zip(checked, states, strict=True)
    }

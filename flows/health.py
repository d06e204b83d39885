"""The health-check flow: is every service of an environment healthy and on its release?"""

from __future__ import annotations

from prefect import flow, unmapped
from prefect.artifacts import create_table_artifact
from pydantic import BaseModel

from blocks.config import load_config
from tasks.deploy import make_deployer
from tasks.health import HealthResult, check_service_health
from tasks.releases import Ledger


class HealthReport(BaseModel):
    """Every service's health in one environment."""

    environment: str
    results: list[HealthResult]

    @property
    def failed(self) -> list[HealthResult]:
        """The unhealthy services."""
        return [r for r in self.results if not r.ok]


@flow(name="health-check", log_prints=False)
def health_check(
    environment: str = "dev",
    services: list[str] | None = None,
    deadline_s: float = 15.0,
    config_source: str | None = None,
    target: str = "docker",
) -> HealthReport:
    """Check /health, /ready and the recorded digest of each deployed service."""
    cfg = load_config(config_source)
    env = cfg.environment(environment)
    specs = cfg.catalog.select(services) if services else cfg.catalog.services
    deployer = make_deployer(target)
    deployed = Ledger().current(env.name).services
    specs = [s for s in specs if s.name in deployed]
    states = check_service_health.map(
        [deployer.address(env, s) for s in specs],
        specs,
        unmapped(deadline_s),
        [deployed[s.name].image.digest for s in specs],
        return_state=True,
    )
    results = [
        state.result()
        if state.is_completed()
        else HealthResult(
            service=spec.name,
            url=deployer.address(env, spec),
            ok=False,
            attempts=0,
            seconds=0.0,
            failures=[state.message or "health check failed"],
        )
        for spec, state in zip(specs, states, strict=True)
    ]
    report = HealthReport(environment=env.name, results=results)
    create_table_artifact(
        key=f"health-{env.name}",
        table=[
            {"service": r.service, "ok": r.ok, "url": r.url, "failures": "; ".join(r.failures)}
            for r in results
        ],
        description=f"Health of {env.name}",
    )
    if report.failed:
        names = ", ".join(f"{r.service} ({'; '.join(r.failures)})" for r in report.failed)
        msg = f"{env.name}: unhealthy: {names}"
        raise RuntimeError(msg)
    return report
